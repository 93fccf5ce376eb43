"""Synthetic billion-image corpora at the metadata level: no image is made or decoded.

What the corpus-wide steps read is generated chunk by chunk, vectorised, from a few
stateless hash functions of the global row id, so any chunk can be made on its own and a
100M-row corpus needs memory for one chunk:

- the input listing (``listing.parquet``: ``path``, ``label``), sorted by site like a crawl;
- an ingest output after its chunks ran: ``_ingest/plan.json``, per-chunk manifest parts
  (``sharding.manifest.SCHEMA``), done markers and ``_ingest/config.json``, ready for
  ``sharding.ingest.merge`` (its shard rewrites are stubbed by the harness: no tar exists);
- a features directory (``seerlike.eval.features`` layout, one unit per shard);
- a pseudo-label directory (``labels/features-shard-*.parquet``: ``key, cluster, distance``, with
  ``labels_index.parquet`` and the sizes in ``cluster_stats.json``).

Shape, per row: a 14-character key ``{chunk:06d}_{index:07d}``, a 67-character source URL
(``https://imgNN.cdn-example.com/sNNNNNNN/YYYYMM/<16 hex>.jpg``, sites Zipf-sized and in
listing order), a class label ``nNNNNNNNN`` with Zipf skew over 1,000 classes, 6% rejects
(``fetch_failed`` without a hash, others with one), 3% byte-exact duplicates of a uniformly
drawn earlier row (so most fall in other chunks, as in a shuffled crawl; those in the same
chunk are already ``duplicate`` in the part, the merge finds the rest), stored sizes
log-normal around 90 KB and 1,000 written samples per shard.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SIZES = {"100k": 100_000, "1M": 1_000_000, "10M": 10_000_000, "100M": 100_000_000}

REJECT_REASONS = ("fetch_failed", "too_small", "not_an_image", "truncated", "extreme_aspect", "unreadable")
REJECT_WEIGHTS = np.array([0.45, 0.25, 0.1, 0.1, 0.05, 0.05])
N_CLASSES = 1000


@dataclass(frozen=True)
class Spec:
    """One synthetic corpus; equal specs make byte-identical files."""

    n: int
    chunk_size: int = 10_000
    shard_size: int = 1000
    dup_rate: float = 0.03
    reject_rate: float = 0.06
    dim: int = 32
    seed: int = 0

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk_size)

    def chunk_rows(self, k: int) -> range:
        return range(k * self.chunk_size, min((k + 1) * self.chunk_size, self.n))


# ---------------------------------------------------------------- stateless hashing


def mix(x: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of ``x`` (uint64) with a salt: a fixed pseudo-random function of the row id."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64((0x9E3779B97F4A7C15 * (salt + 1)) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform(x: np.ndarray, salt: int) -> np.ndarray:
    return (mix(x, salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def content_of(g: np.ndarray, spec: Spec) -> np.ndarray:
    """The content id of each row: its own id, or for a duplicate the id of the earlier original."""
    g = g.astype(np.int64)
    content = g.copy()
    dup = (uniform(g, 1) < spec.dup_rate) & (g > 0)
    target = (uniform(g, 2) * g).astype(np.int64)  # uniform over the earlier rows
    for hop in range(4):  # an earlier duplicate points further back; 4 hops leave ~1e-6 unresolved
        again = dup & (uniform(target, 1) < spec.dup_rate) & (target > 0)
        target = np.where(again, (uniform(target, 3 + hop) * target).astype(np.int64), target)
    return np.where(dup, target, content)


# ---------------------------------------------------------------- fixed-width strings, vectorised


def _digits(values: np.ndarray, width: int) -> np.ndarray:
    v = values.astype(np.int64)
    out = np.empty((len(v), width), np.uint8)
    for p in range(width):
        out[:, width - 1 - p] = 48 + (v // 10**p) % 10
    return out


def _hex(values: np.ndarray, nbytes: int) -> np.ndarray:
    """Lower-case hex of ``nbytes`` bytes per row (from uint64 words), as a uint8 matrix."""
    words = values.reshape(len(values), -1)
    raw = words.astype(">u8").view(np.uint8).reshape(len(values), -1)[:, :nbytes]
    table = np.frombuffer(b"0123456789abcdef", np.uint8)
    out = np.empty((len(values), 2 * nbytes), np.uint8)
    out[:, 0::2] = table[raw >> 4]
    out[:, 1::2] = table[raw & 15]
    return out


def strings(*parts) -> pa.Array:
    """Concatenate bytes constants and uint8 matrices row-wise into a string array."""
    n = next(len(p) for p in parts if isinstance(p, np.ndarray))
    cols = [np.broadcast_to(np.frombuffer(p, np.uint8), (n, len(p))) if isinstance(p, bytes) else p for p in parts]
    mat = np.ascontiguousarray(np.concatenate(cols, axis=1))
    return pa.array(mat.view(f"S{mat.shape[1]}").ravel()).cast(pa.string())


def keys_of(g: np.ndarray, chunk_size: int) -> pa.Array:
    return strings(_digits(g // chunk_size, 6), b"_", _digits(g % chunk_size, 7))


def sha_of(content: np.ndarray) -> pa.Array:
    words = np.stack([mix(content, 100 + i) for i in range(4)], axis=1)
    return strings(_hex(words, 32))


def sources_of(g: np.ndarray, spec: Spec) -> pa.Array:
    # Sites in listing order, Zipf-sized: site = floor(n_sites * u^3) over the sorted position.
    u = g.astype(np.float64) / max(spec.n, 1)
    site = (u**3 * max(spec.n // 200, 1)).astype(np.int64)
    month = 201001 + (site % 12) + 100 * ((site // 12) % 15)
    return strings(b"https://img", _digits(site % 100, 2), b".cdn-example.com/s", _digits(site, 7), b"/",
                   _digits(month, 6), b"/", _hex(mix(g, 7), 8), b".jpg")


def classes_of(content: np.ndarray) -> np.ndarray:
    """Zipf-skewed class index (the largest class ~30x the median) of each content id."""
    u = uniform(content, 9)
    return np.minimum((N_CLASSES * u**2.2).astype(np.int64), N_CLASSES - 1)


def labels_of(content: np.ndarray) -> pa.Array:
    return strings(b"n", _digits(classes_of(content), 8))


# ---------------------------------------------------------------- one chunk's manifest part


def chunk_part(spec: Spec, k: int) -> tuple[pa.Table, dict]:
    """Chunk ``k``'s manifest part as the chunk worker writes it, and its done marker."""
    from sharding.manifest import SCHEMA

    rows = spec.chunk_rows(k)
    g = np.arange(rows.start, rows.stop, dtype=np.int64)
    m = len(g)
    content = content_of(g, spec)
    # Rejection is a property of the bytes: every copy of a content is rejected alike.
    u_rej = uniform(content, 4)
    rejected = u_rej < spec.reject_rate
    reason_idx = np.searchsorted(np.cumsum(REJECT_WEIGHTS), u_rej / spec.reject_rate * 0.999999)
    reason_idx = np.minimum(reason_idx, len(REJECT_REASONS) - 1)
    fetched = ~(rejected & (reason_idx == 0))
    in_chunk_dup = (content != g) & (content >= rows.start) & ~rejected
    written = ~rejected & ~in_chunk_dup
    n_written = int(written.sum())
    # Stored bytes: log-normal around 90 KB; a member header, json member and padding per sample.
    size = np.exp(11.4 + 0.5 * (uniform(content, 5) - 0.5) * 3.4).astype(np.int64)
    wrank = np.cumsum(written) - 1
    shard_j = np.where(written, wrank // spec.shard_size, -1)
    stride = size + 1536 + 512
    offset = np.zeros(m, np.int64)
    for j in range(-(-n_written // spec.shard_size)):
        sel = np.flatnonzero(shard_j == j)
        offset[sel] = 512 + np.concatenate([[0], np.cumsum(stride[sel])[:-1]])
    shard = strings(b"shards/", _digits(np.full(m, k), 6), b"-", _digits(np.maximum(shard_j, 0), 4), b".tar")
    keys = keys_of(g, spec.chunk_size)
    status = np.where(rejected, "rejected", np.where(in_chunk_dup, "duplicate", "written"))
    w = pa.array(written)
    nullw = lambda a, t: pa.array(a, t, mask=~written)  # noqa: E731 - written-only columns
    width = (256 + uniform(content, 6) * 256).astype(np.int32)
    height = (width * (0.6 + uniform(content, 8) * 0.8)).astype(np.int32)
    orig_bytes = (size * (1.0 + uniform(content, 10) * 2)).astype(np.int64)
    table = pa.table(
        {
            "key": keys,
            "chunk": pa.array(np.full(m, k, np.int32)),
            "index": pa.array((g - rows.start).astype(np.int32)),
            "source": sources_of(g, spec),
            "label": labels_of(content),
            "status": pa.array(status),
            "reason": pa.array(np.asarray(REJECT_REASONS, dtype=object)[reason_idx], pa.string(), mask=~rejected),
            "duplicate_of": pa.array(keys_of(content, spec.chunk_size).to_numpy(zero_copy_only=False), pa.string(),
                                     mask=~in_chunk_dup),
            "shard": pa.compute.if_else(w, shard, pa.scalar(None, pa.string())),
            "offset": nullw(offset, pa.int64()),
            "size": nullw(size, pa.int64()),
            "width": nullw(width, pa.int32()),
            "height": nullw(height, pa.int32()),
            "orig_width": pa.array(width * 2, pa.int32(), mask=~fetched),
            "orig_height": pa.array(height * 2, pa.int32(), mask=~fetched),
            "orig_format": pa.array(np.full(m, "JPEG", object), pa.string(), mask=~fetched),
            "orig_bytes": pa.array(orig_bytes, pa.int64(), mask=~fetched),
            "sha256": pa.compute.if_else(pa.array(fetched), sha_of(content), pa.scalar(None, pa.string())),
            "phash": nullw(mix(content, 11), pa.uint64()),
            "kept_original": nullw(uniform(content, 12) < 0.3, pa.bool_()),
        },
        schema=SCHEMA,
    )
    counts: dict[str, int] = {"written": n_written}
    if in_chunk_dup.any():
        counts["duplicate"] = int(in_chunk_dup.sum())
    for r, c in zip(*np.unique(np.asarray(REJECT_REASONS)[reason_idx[rejected]], return_counts=True)):
        counts[f"rejected:{r}"] = int(c)
    marker = {"chunk": k, "seen": m, "counts": dict(sorted(counts.items())),
              "shards": -(-n_written // spec.shard_size), "seconds": 100.0, "cpu_seconds": 100.0}
    return table, marker


def write_ingest_output(spec: Spec, out: str | Path) -> Path:
    """An ingest output folder whose chunks are all done: what ``merge`` starts from."""
    from sharding.config import IngestConfig
    from sharding.manifest import table_to_bytes

    out = Path(out)
    work = out / "_ingest"
    for d in ("parts", "done", "chunks"):
        (work / d).mkdir(parents=True, exist_ok=True)
    for k in range(spec.n_chunks):
        table, marker = chunk_part(spec, k)
        (work / "parts" / f"{k:06d}.parquet").write_bytes(table_to_bytes(table))
        (work / "done" / f"{k:06d}.json").write_text(json.dumps(marker))
    (work / "plan.json").write_text(json.dumps({"n_inputs": spec.n, "n_chunks": spec.n_chunks,
                                                "chunk_size": spec.chunk_size}))
    cfg = IngestConfig(inputs=(str(out / "listing.parquet"),), out=str(out), chunk_size=spec.chunk_size,
                       shard_max_samples=spec.shard_size)
    want = {k: v for k, v in cfg.output_fields().items() if k != "out"}
    want["inputs"] = list(cfg.inputs)
    (work / "config.json").write_text(json.dumps(want, indent=1))
    (out / "spec.json").write_text(json.dumps(asdict(spec)))
    return out


def ingest_config(out: str | Path):
    """The IngestConfig of a folder made by ``write_ingest_output``."""
    from sharding.config import IngestConfig

    spec = Spec(**json.loads((Path(out) / "spec.json").read_text()))
    return IngestConfig(inputs=(str(Path(out) / "listing.parquet"),), out=str(out), chunk_size=spec.chunk_size,
                        shard_max_samples=spec.shard_size, progress=False)


# ---------------------------------------------------------------- listing, features, pseudo-labels


def write_listing(spec: Spec, path: str | Path, batch: int = 1_000_000) -> Path:
    """The crawl's list file (``path``, ``label``), sorted by site as a crawl listing comes."""
    path = Path(path)
    schema = pa.schema([("path", pa.string()), ("label", pa.string())])
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        for lo in range(0, spec.n, batch):
            g = np.arange(lo, min(lo + batch, spec.n), dtype=np.int64)
            w.write_table(pa.table({"path": sources_of(g, spec), "label": labels_of(content_of(g, spec))}, schema=schema))
    return path


def _written_keys(spec: Spec) -> "Iterator[tuple[str, pa.Array]]":  # noqa: F821
    """(shard name, keys of its written samples) in shard order, without a manifest."""
    for k in range(spec.n_chunks):
        part, _ = chunk_part(spec, k)
        part = part.filter(pa.compute.equal(part["status"], "written"))
        shards = part["shard"].to_numpy(zero_copy_only=False)
        bounds = np.flatnonzero(shards[1:] != shards[:-1]) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(shards)]):
            yield shards[lo].removeprefix("shards/").removesuffix(".tar"), part["key"].slice(lo, hi - lo)


def write_pseudo_labels(spec: Spec, out: str | Path, k: int = 16000) -> Path:
    """A `seerlike cluster` output's labels: one part per shard, Zipf-skewed cluster sizes."""
    out = Path(out)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    for name, keys in _written_keys(spec):
        h = mix(np.frombuffer(name.encode(), np.uint8).astype(np.uint64).sum() * 1_000_003
                + np.arange(len(keys), dtype=np.uint64), 13)
        u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        table = pa.table({"key": keys, "cluster": pa.array(np.minimum(k * u**1.5, k - 1).astype(np.int32)),
                          "distance": pa.array((0.5 + u).astype(np.float32))})
        pq.write_table(table, out / "labels" / f"features-shard-{name}.parquet")
    write_cluster_index(out, k)
    return out


def write_cluster_index(out: str | Path, k: int = 16000) -> None:
    """What `seerlike cluster` writes beside the labels: their index and the cluster sizes (older code ignores both)."""
    from seerlike.pseudo_labels import write_index

    sizes, _, _ = write_index(out, k)
    (Path(out) / "cluster_stats.json").write_text(json.dumps({"num_clusters": k, "sizes": sizes.tolist()}))


def write_features(spec: Spec, out: str | Path, dim: int | None = None) -> Path:
    """A features directory (one unit per shard) of ``dim``-d float32 features, 64 planted clusters."""
    from seerlike.eval import features as fstore

    out = Path(out)
    dim = dim or spec.dim
    centres = np.random.default_rng(spec.seed).standard_normal((64, dim)).astype(np.float32)
    for i, (name, keys) in enumerate(_written_keys(spec)):
        rng = np.random.default_rng([spec.seed, i])
        feats = centres[rng.integers(0, 64, len(keys))] + 0.3 * rng.standard_normal((len(keys), dim), np.float32)
        npy, idx = fstore.chunk_paths(out, f"shard-{name}")
        out.mkdir(parents=True, exist_ok=True)
        with open(npy, "wb") as f:
            np.save(f, feats)
        pq.write_table(pa.table({"key": keys, "row": pa.array(np.arange(len(keys), dtype=np.int32)),
                                 "label": pa.nulls(len(keys), pa.string())}), idx)
    fstore.write_meta(out, {"layer": "res5", "dim": dim, "dtype": "float32", "model": "synthetic"})
    return out


def size_of(name: str) -> int:
    if name not in SIZES:
        raise SystemExit(f"unknown size {name!r}; choose from {', '.join(SIZES)}")
    return SIZES[name]


def du(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if os.path.isdir(path) else os.path.getsize(path)
