"""`seerlike ingest-stats DATASET_OR_MANIFEST [--verify [--part I/N]]`: what an ingested dataset holds.

Statistics are computed from the manifest in streaming batches (bounded memory); sizes
are summarised by quantiles of a bounded reservoir. ``--verify`` also reads every shard
and checks it against the manifest: same keys, JPEG bytes at the recorded offsets; it
holds one chunk's rows at a time (``verify``), and ``--part I/N`` splits it over N jobs by
chunk range.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seerlike import storage
from seerlike.config import ConfigError
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


def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"`` (0 <= I < N) as ``(I, N)``: which share of a verify this process checks."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--part {text!r}: expected I/N, e.g. 0/8 (part I of N, counted from 0)") from None
    if not 0 <= i < n:
        raise ConfigError(f"--part {text!r}: I must be in 0..N-1 (got I={i}, N={n})")
    return i, n


_INGEST_SHARD = re.compile(r"^shards/(?P<chunk>\d+)-")


def _shard_chunk(name: str) -> int | None:
    """The chunk an ingest shard's name carries (``shards/CCCCCC-SSSS.tar``), None for other names."""
    m = _INGEST_SHARD.match(name)
    return int(m.group("chunk")) if m else None


def _named_chunks(shards: pa.Array, chunks: list[int]) -> dict[int, int]:
    """``{row: chunk its shard's name carries}`` for the rows whose shard is named for another chunk than theirs."""
    found = pc.extract_regex(shards, _INGEST_SHARD.pattern)  # null where a name is not an ingest shard's
    if found.null_count == len(found):
        return {}
    named = pc.if_else(pc.is_valid(found), found.field("chunk"), "-1").cast(pa.int64()).to_numpy()
    rows = np.flatnonzero((named >= 0) & (named != np.asarray(chunks)))
    return {int(i): int(named[i]) for i in rows}


class _Part:
    """Part ``i`` of ``n`` of a manifest in chunk order: a contiguous range of chunks and the row groups holding it.

    The chunks 0..C-1 (C from the row groups' statistics of ``chunk``) are cut into ``n``
    ranges; the first range is open below and the last open above, so every row and every
    shard name falls in exactly one part.
    """

    def __init__(self, pf, part: tuple[int, int]):
        i, n = part
        md = pf.metadata
        col = pf.schema_arrow.get_field_index("chunk")
        if col < 0:
            raise ConfigError("--part needs an ingest manifest (with a chunk column); check this one without --part")
        stats = [md.row_group(g).column(col).statistics for g in range(md.num_row_groups)]
        ranges = [(st.min, st.max) if st is not None and st.has_min_max else None for st in stats]
        if any(r is None for r in ranges) or any(a[1] > b[0] for a, b in zip(ranges, ranges[1:])):
            raise ConfigError("--part needs a manifest in chunk order with row-group statistics (as `seerlike "
                              "ingest` writes it); check this one without --part")
        chunks = max((r[1] for r in ranges), default=-1) + 1
        self.lo = i * chunks // n if i > 0 else -np.inf
        self.hi = (i + 1) * chunks // n if i < n - 1 else np.inf
        self.groups = [g for g, (a, b) in enumerate(ranges) if b >= self.lo and a < self.hi]

    def owns(self, shard_name: str) -> bool:
        c = _shard_chunk(shard_name)
        return self.lo == -np.inf if c is None else self.lo <= c < self.hi

    def rows(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        c = batch.column("chunk")
        return batch.filter(pc.and_(pc.greater_equal(c, max(self.lo, -1)), pc.less(c, min(self.hi, 2**31))))


def _written_in_manifest(pf, name: str) -> bool:
    """Whether a written row lists shard ``name``: reads only the row groups whose shard range holds it."""
    md = pf.metadata
    col = pf.schema_arrow.get_field_index("shard")
    for g in range(md.num_row_groups):
        st = md.row_group(g).column(col).statistics
        if st is not None and st.has_min_max and not st.min <= name <= st.max:
            continue
        t = pf.read_row_group(g, columns=["shard", "status"])
        if pc.any(pc.and_(pc.equal(t["shard"], name), pc.equal(t["status"], "written"))).as_py():
            return True
    return False


def verify(dataset: str, *, endpoint_url: str | None = None, part: tuple[int, int] | None = None) -> list[str]:
    """Problems found checking every shard against the manifest; empty when consistent.

    An ingest manifest lists chunk after chunk and a shard holds one chunk's samples, so a
    shard is checked as soon as the manifest moves past its chunk: memory is one chunk's
    rows plus the shard names, not the corpus (docs/scale.md). Other manifests are checked
    once they are read whole.

    ``part=(i, n)`` checks only the i-th of n contiguous chunk ranges of an ingest manifest
    (its rows, the shards they list, and the unlisted shard files named for its chunks),
    reading only the row groups that hold them: the n parts' problems together are the
    problems of the whole check, so an array of n jobs can share it (docs/scale.md). (A
    shard whose name carries no chunk, listed by rows of several parts, is checked by each
    against its rows: then the parts may word its problems differently.)
    """
    root = dataset_root(dataset)
    problems: list[str] = []
    cols = ["key", "status", "shard", "offset", "size"]
    if part is None:
        streaming = _in_chunk_order(dataset, endpoint_url)
        cols += ["chunk"] if streaming else []
        batches = iter_manifest(dataset, cols, endpoint_url=endpoint_url)
        owner = None
    else:
        pf = open_manifest(dataset, endpoint_url=endpoint_url)
        owner, streaming = _Part(pf, part), True
        cols.append("chunk")
        batches = (owner.rows(b) for b in pf.iter_batches(row_groups=owner.groups, columns=cols, batch_size=65536))
    listed: set[str] = set()
    pending: dict[str, dict[str, tuple[int, int]]] = {}  # shard -> key -> (offset, size), rows still to check
    chunk_of: dict[str, int] = {}  # chunk of each pending shard
    last = -1
    for batch in batches:
        d = batch.to_pydict()
        chunks = d["chunk"] if streaming else [0] * len(d["key"])
        if streaming and chunks and (chunks[0] < last or (np.diff(chunks) < 0).any()):
            raise ConfigError(f"the manifest of {root} is not in chunk order: check it without --part")
        named = _named_chunks(batch.column("shard"), chunks) if streaming else {}
        for i, (key, st, shard, off, size, chunk) in enumerate(zip(d["key"], d["status"], d["shard"], d["offset"],
                                                                     d["size"], chunks)):
            if st == "written":
                if i in named:  # an ingest shard holds its own chunk's samples only
                    problems.append(f"{key}: a row of chunk {chunk} lists shard {shard} of chunk {named[i]}")
                    continue
                pending.setdefault(shard, {})[key] = (off, size)
                chunk_of[shard] = chunk
                listed.add(shard)
            elif shard is not None:
                problems.append(f"{key}: status {st} but has shard {shard}")
        if streaming and chunks:
            last = chunks[-1]
            # the rows of a chunk are consecutive: a shard of an earlier chunk than the last row's is whole
            for shard in sorted(s for s, c in chunk_of.items() if c < chunks[-1]):
                del chunk_of[shard]
                problems += _check_shard(root, shard, pending.pop(shard), endpoint_url)
    for shard in sorted(pending):
        problems += _check_shard(root, shard, pending.pop(shard), endpoint_url)
    for url, _ in storage.list_files(storage.join(root, "shards") + ("/" if storage.is_s3_url(root) else ""), endpoint_url=endpoint_url):
        name = "shards/" + url.rsplit("/", 1)[-1]
        if not name.endswith(".tar") or name in listed or (owner is not None and not owner.owns(name)):
            continue
        # a part knows the shards its own chunks list; a shard not named for a chunk may be listed by any part's rows
        if owner is None or _shard_chunk(name) is not None or not _written_in_manifest(pf, name):
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
    try:
        for member, data in iter_tar(io.BytesIO(blob)):
            key, _, ext = member.partition(".")
            if ext == "jpg":
                found.add(key)
                off, size = keys.get(key, (None, None))
                if off is None:
                    problems.append(f"{shard}: {key} is not a written row of the manifest")
                elif blob[off : off + size] != data:
                    problems.append(f"{shard}: {key} bytes differ at offset {off}")
    except (tarfile.TarError, EOFError) as e:  # a truncated or damaged shard: what was read is checked
        problems.append(f"{shard}: not a readable tar after {len(found)} samples ({e}); rewrite it from its sources")
    for key in sorted(set(keys) - found):
        problems.append(f"{shard}: {key} listed in the manifest but absent")
    return problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="dataset folder, s3://bucket/prefix, or its manifest.parquet")
    parser.add_argument("--verify", action="store_true", help="read every shard and check it against the manifest")
    parser.add_argument("--part", default=None, metavar="I/N",
                        help="with --verify: check only part I of N (counted from 0) of the dataset's chunks, "
                             "e.g. --part $SLURM_ARRAY_TASK_ID/64 in an array of 64 jobs; the parts' problems "
                             "together are the whole check's. Prints only this part's check (no statistics)")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL, else AWS)")


def run(args: argparse.Namespace) -> int:
    root = dataset_root(args.dataset)
    out: dict = {"dataset": root}
    if args.part is not None:
        if not args.verify:
            raise ConfigError("--part splits a --verify: add --verify")
        part = parse_part(args.part)
        problems = verify(args.dataset, endpoint_url=args.endpoint_url, part=part)
        out["verify"] = {"part": f"{part[0]}/{part[1]}", "ok": not problems, "problems": problems[:50],
                         "n_problems": len(problems)}
        print(json.dumps(out, indent=1))
        return 0 if not problems else 1
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
