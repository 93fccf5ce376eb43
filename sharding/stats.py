"""`seerlike ingest-stats DATASET_OR_MANIFEST [--verify]`: what an ingested dataset holds.

Statistics are computed from the manifest in streaming batches (bounded memory); sizes
are summarised by quantiles of a bounded reservoir. ``--verify`` also reads every shard
and checks it against the manifest: same keys, JPEG bytes at the recorded offsets.
"""

from __future__ import annotations

import argparse
import io
import json
from collections import Counter

import numpy as np

from seerlike import storage
from sharding.manifest import SUMMARY, dataset_root, iter_manifest
from sharding.writer import iter_tar

_RESERVOIR = 100_000


def manifest_stats(dataset: str, *, endpoint_url: str | None = None, seed: int = 0) -> dict:
    """Counts per status / reason / format and quantiles of stored sizes, from the manifest."""
    rng = np.random.default_rng(seed)
    status: Counter = Counter()
    reasons: Counter = Counter()
    formats: Counter = Counter()
    shards: set[str] = set()
    kept = 0
    seen_written = 0
    sample: dict[str, list] = {"width": [], "height": [], "size": []}
    cols = ["status", "reason", "orig_format", "shard", "width", "height", "size", "kept_original"]
    for batch in iter_manifest(dataset, cols, endpoint_url=endpoint_url):
        d = batch.to_pydict()
        status.update(d["status"])
        reasons.update(r for r in d["reason"] if r)
        formats.update(f for f in d["orig_format"] if f)
        for st, shard, w, h, size, ko in zip(d["status"], d["shard"], d["width"], d["height"], d["size"], d["kept_original"]):
            if st != "written":
                continue
            shards.add(shard)
            kept += bool(ko)
            seen_written += 1
            # Reservoir sampling keeps the quantiles' memory fixed for any corpus size.
            slot = seen_written - 1 if seen_written <= _RESERVOIR else int(rng.integers(seen_written))
            if slot < _RESERVOIR:
                for name, v in (("width", w), ("height", h), ("size", size)):
                    if slot == len(sample[name]):
                        sample[name].append(v)
                    else:
                        sample[name][slot] = v
    q = (0.0, 0.05, 0.5, 0.95, 1.0)
    quantiles = {
        name: dict(zip(("min", "p5", "p50", "p95", "max"), np.quantile(np.asarray(v, float), q).round(1).tolist()))
        for name, v in sample.items()
        if v
    }
    return {
        "rows": sum(status.values()),
        "status": dict(status),
        "rejected_by_reason": dict(reasons.most_common()),
        "orig_formats": dict(formats.most_common()),
        "shards": len(shards),
        "kept_original": kept,
        "stored": quantiles,
    }


def verify(dataset: str, *, endpoint_url: str | None = None) -> list[str]:
    """Problems found checking every shard against the manifest; empty when consistent."""
    root = dataset_root(dataset)
    expected: dict[str, dict[str, tuple[int, int]]] = {}
    problems = []
    for batch in iter_manifest(dataset, ["key", "status", "shard", "offset", "size"], endpoint_url=endpoint_url):
        d = batch.to_pydict()
        for key, st, shard, off, size in zip(d["key"], d["status"], d["shard"], d["offset"], d["size"]):
            if st == "written":
                expected.setdefault(shard, {})[key] = (off, size)
            elif shard is not None:
                problems.append(f"{key}: status {st} but has shard {shard}")
    for url, _ in storage.list_files(storage.join(root, "shards") + ("/" if storage.is_s3_url(root) else ""), endpoint_url=endpoint_url):
        name = "shards/" + url.rsplit("/", 1)[-1]
        if name.endswith(".tar") and name not in expected:
            problems.append(f"{name}: shard not in the manifest")
    for shard, keys in sorted(expected.items()):
        url = storage.join_within(root, shard, what=f"shard {shard!r} of the manifest")
        if not storage.exists(url, endpoint_url=endpoint_url):
            problems.append(f"{shard}: missing")
            continue
        blob = storage.read_bytes(url, endpoint_url=endpoint_url)
        found = set()
        for member, data in iter_tar(io.BytesIO(blob)):
            key, _, ext = member.partition(".")
            if ext == "jpg":
                found.add(key)
                off, size = keys.get(key, (None, None))
                if off is None:
                    problems.append(f"{shard}: {key} is not a written row of the manifest")
                elif blob[off : off + size] != data:
                    problems.append(f"{shard}: {key} bytes differ at offset {off}")
        for key in sorted(set(keys) - found):
            problems.append(f"{shard}: {key} listed in the manifest but absent")
    return problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="dataset folder, s3://bucket/prefix, or its manifest.parquet")
    parser.add_argument("--verify", action="store_true", help="read every shard and check it against the manifest")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL, else AWS)")


def run(args: argparse.Namespace) -> int:
    root = dataset_root(args.dataset)
    out: dict = {"dataset": root}
    summary_url = storage.join(root, SUMMARY)
    if storage.exists(summary_url, endpoint_url=args.endpoint_url):
        s = json.loads(storage.read_bytes(summary_url, endpoint_url=args.endpoint_url))
        out["summary"] = {k: v for k, v in s.items() if k != "config"}
    out["manifest"] = manifest_stats(args.dataset, endpoint_url=args.endpoint_url)
    if args.verify:
        problems = verify(args.dataset, endpoint_url=args.endpoint_url)
        out["verify"] = {"ok": not problems, "problems": problems[:50], "n_problems": len(problems)}
    print(json.dumps(out, indent=1))
    return 0 if not args.verify or not out["verify"]["problems"] else 1
