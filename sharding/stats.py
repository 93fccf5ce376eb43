"""`seerlike ingest-stats DATASET_OR_MANIFEST [--verify]`: what an ingested dataset holds.

Statistics are computed from the manifest in streaming batches (bounded memory); sizes
are summarised by quantiles of a bounded reservoir. ``--verify`` also reads every shard
and checks it against the manifest: same keys, JPEG bytes at the recorded offsets; it
holds one chunk's rows at a time (``verify``).
"""

from __future__ import annotations

import argparse
import io
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seerlike import storage
from sharding.manifest import SUMMARY, dataset_root, iter_manifest, open_manifest
from sharding.writer import iter_tar

_RESERVOIR = 100_000


def _count(counter: Counter, column: pa.Array, skip_empty: bool = True) -> None:
    """Add a string column's values (non-empty ones when ``skip_empty``) to ``counter``, in first-seen order."""
    vc = pc.value_counts(column)
    for value, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
        if value or not skip_empty:
            counter[value] += n


def manifest_stats(dataset: str, *, endpoint_url: str | None = None, seed: int = 0) -> dict:
    """Counts per status / reason / format and quantiles of stored sizes, from the manifest.

    Vectorised per record batch. The quantiles come from a uniform sample of at most
    ``_RESERVOIR`` written rows (those with the smallest of a seeded uniform draw per row:
    every row when there are fewer); min and max are exact.
    """
    rng = np.random.default_rng(seed)
    status: Counter = Counter()
    reasons: Counter = Counter()
    formats: Counter = Counter()
    shards: set[str] = set()
    kept = 0
    names = ("width", "height", "size")
    sample = np.zeros((0, len(names)))
    draws = np.zeros(0)
    lo, hi = np.full(len(names), np.inf), np.full(len(names), -np.inf)
    cols = ["status", "reason", "orig_format", "shard", "width", "height", "size", "kept_original"]
    for batch in iter_manifest(dataset, cols, endpoint_url=endpoint_url):
        _count(status, batch.column("status"), skip_empty=False)
        _count(reasons, batch.column("reason"))
        _count(formats, batch.column("orig_format"))
        written = batch.filter(pc.equal(batch.column("status"), "written"))
        if not written.num_rows:
            continue
        shards.update(pc.unique(written.column("shard")).to_pylist())
        kept += int(pc.sum(written.column("kept_original")).as_py() or 0)
        values = np.stack([written.column(n).to_numpy(zero_copy_only=False).astype(float) for n in names], axis=1)
        lo, hi = np.fmin(lo, values.min(axis=0)), np.fmax(hi, values.max(axis=0))
        sample = np.concatenate([sample, values])
        draws = np.concatenate([draws, rng.random(len(values))])
        if len(draws) > _RESERVOIR:  # keep the smallest draws: a uniform sample of fixed size
            keep = np.sort(np.argpartition(draws, _RESERVOIR - 1)[:_RESERVOIR])
            sample, draws = sample[keep], draws[keep]
    q = (0.05, 0.5, 0.95)
    quantiles = {
        name: dict(zip(("min", "p5", "p50", "p95", "max"),
                       np.round([lo[i], *np.quantile(sample[:, i], q), hi[i]], 1).tolist()))
        for i, name in enumerate(names)
        if len(sample)
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


def _in_chunk_order(dataset: str, endpoint_url: str | None) -> bool:
    """Whether the manifest has a ``chunk`` column in non-decreasing order (every ingest manifest)."""
    if "chunk" not in open_manifest(dataset, endpoint_url=endpoint_url).schema_arrow.names:
        return False
    last = -1
    for batch in iter_manifest(dataset, ["chunk"], endpoint_url=endpoint_url):
        c = batch.column("chunk").to_numpy(zero_copy_only=False)
        if len(c) and (c[0] < last or (np.diff(c) < 0).any()):
            return False
        last = int(c[-1]) if len(c) else last
    return True


def verify(dataset: str, *, endpoint_url: str | None = None) -> list[str]:
    """Problems found checking every shard against the manifest; empty when consistent.

    An ingest manifest lists chunk after chunk and a shard holds one chunk's samples, so a
    shard is checked as soon as the manifest moves past its chunk: memory is one chunk's
    rows plus the shard names, not the corpus (docs/scale.md). Other manifests are checked
    once they are read whole.
    """
    root = dataset_root(dataset)
    problems: list[str] = []
    streaming = _in_chunk_order(dataset, endpoint_url)
    listed: set[str] = set()
    pending: dict[str, dict[str, tuple[int, int]]] = {}  # shard -> key -> (offset, size), rows still to check
    chunk_of: dict[str, int] = {}  # chunk of each pending shard
    cols = ["key", "status", "shard", "offset", "size"] + (["chunk"] if streaming else [])
    for batch in iter_manifest(dataset, cols, endpoint_url=endpoint_url):
        d = batch.to_pydict()
        chunks = d["chunk"] if streaming else [0] * len(d["key"])
        for key, st, shard, off, size, chunk in zip(d["key"], d["status"], d["shard"], d["offset"], d["size"], chunks):
            if st == "written":
                pending.setdefault(shard, {})[key] = (off, size)
                chunk_of[shard] = chunk
                listed.add(shard)
            elif shard is not None:
                problems.append(f"{key}: status {st} but has shard {shard}")
        if streaming and chunks:
            # the rows of a chunk are consecutive: a shard of an earlier chunk than the last row's is whole
            for shard in sorted(s for s, c in chunk_of.items() if c < chunks[-1]):
                del chunk_of[shard]
                problems += _check_shard(root, shard, pending.pop(shard), endpoint_url)
    for shard in sorted(pending):
        problems += _check_shard(root, shard, pending.pop(shard), endpoint_url)
    for url, _ in storage.list_files(storage.join(root, "shards") + ("/" if storage.is_s3_url(root) else ""), endpoint_url=endpoint_url):
        name = "shards/" + url.rsplit("/", 1)[-1]
        if name.endswith(".tar") and name not in listed:
            problems.append(f"{name}: shard not in the manifest")
    return problems


def _check_shard(root: str, shard: str, keys: dict[str, tuple[int, int]], endpoint_url: str | None) -> list[str]:
    """One shard against its manifest rows: same keys, the JPEG bytes at the recorded offsets."""
    url = storage.join_within(root, shard, what=f"shard {shard!r} of the manifest")
    if not storage.exists(url, endpoint_url=endpoint_url):
        return [f"{shard}: missing"]
    problems = []
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
