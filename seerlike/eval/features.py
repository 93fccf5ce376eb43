"""The on-disk format of extracted features (written by ``seerlike extract``, read by cluster/eval).

A features directory holds, per work unit (one input shard, or one slice of a file list):

- ``features-{unit}.npy``: float32 or float16 array ``(n, dim)``, row i is sample i of the unit;
- ``features-{unit}.parquet``: the index of that chunk, columns ``key`` (str), ``row`` (int32)
  and ``label`` (str, null when the source has no labels). It is written after the ``.npy``
  and atomically, so its presence marks the chunk complete (resume skips it);
- ``meta.json``: layer, dim, dtype, model, data and, once every rank finished, ``num_samples``
  and the sorted list of ``chunks``;
- ``index.parquet``: ``key, label, chunk, row`` over all chunks (written last by rank 0).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from seerlike.storage import atomic_write

META = "meta.json"
INDEX = "index.parquet"


def chunk_paths(out_dir: Path, unit: str) -> tuple[Path, Path]:
    return out_dir / f"features-{unit}.npy", out_dir / f"features-{unit}.parquet"


def chunk_done(out_dir: Path, unit: str) -> bool:
    npy, idx = chunk_paths(out_dir, unit)
    return npy.exists() and idx.exists()


def _atomic(path: Path, write) -> None:
    with atomic_write(path) as tmp:
        write(tmp)


def write_chunk(out_dir: Path, unit: str, keys: list[str], feats: np.ndarray, labels: list[str | None] | None = None) -> None:
    """Write one chunk: features first, then its index (the completion marker)."""
    if len(keys) != feats.shape[0]:
        raise ValueError(f"chunk {unit}: {len(keys)} keys but {feats.shape[0]} feature rows")
    out_dir.mkdir(parents=True, exist_ok=True)
    npy, idx = chunk_paths(out_dir, unit)

    def save_npy(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, feats)

    _atomic(npy, save_npy)
    table = pa.table({
        "key": pa.array(keys, pa.string()),
        "row": pa.array(np.arange(len(keys), dtype=np.int32)),
        "label": pa.array(labels if labels is not None else [None] * len(keys), pa.string()),
    })
    _atomic(idx, lambda tmp: pq.write_table(table, tmp))


def write_meta(out_dir: Path, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic(out_dir / META, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))


INDEX_ROW_GROUP = 1 << 18
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("label", pa.string()), ("chunk", pa.string()), ("row", pa.int32())])


def finalize(out_dir: Path, meta: dict) -> dict:
    """Merge the chunk indexes into ``index.parquet`` and complete ``meta.json``.

    The chunks are streamed into the index one at a time (memory: one chunk, whatever the
    corpus size); ``meta["duplicate_keys"]`` says whether a key occurs twice (see
    :func:`duplicate_keys`).
    """
    units = sorted(p.name[len("features-"):-len(".parquet")] for p in out_dir.glob("features-*.parquet"))
    ranges = []
    with atomic_write(out_dir / INDEX) as tmp, pq.ParquetWriter(tmp, INDEX_SCHEMA) as w:
        # row groups of ~256k rows, not one per chunk: the writer keeps every row group's
        # metadata until it closes (a million chunks would make a footer of gigabytes)
        pending, rows = [], 0
        for unit in units:
            t = pq.read_table(chunk_paths(out_dir, unit)[1])
            t = t.append_column("chunk", pa.array([unit] * t.num_rows, pa.string())).select(INDEX_SCHEMA.names)
            pending.append(t.cast(INDEX_SCHEMA))
            rows += t.num_rows
            ranges.append(_key_range(t["key"]))
            if rows >= INDEX_ROW_GROUP:
                w.write_table(pa.concat_tables(pending), row_group_size=rows)
                pending, rows = [], 0
        if pending:
            w.write_table(pa.concat_tables(pending), row_group_size=max(rows, 1))
    num = sum(r[0] for r in ranges)
    meta = {**meta, "num_samples": num, "chunks": units,
            "duplicate_keys": duplicate_keys(ranges, lambda: pq.read_table(out_dir / INDEX, columns=["key"])["key"])}
    write_meta(out_dir, meta)
    return meta


def _key_range(keys: pa.ChunkedArray) -> tuple[int, str | None, str | None, bool]:
    """(rows, smallest key, largest key, whether the keys are distinct) of one chunk."""
    if len(keys) == 0:
        return 0, None, None, True
    mm = pc.min_max(keys)
    return len(keys), mm["min"].as_py(), mm["max"].as_py(), pc.count_distinct(keys).as_py() == len(keys)


def duplicate_keys(ranges: list[tuple[int, str | None, str | None, bool]], all_keys) -> bool:
    """Whether any key occurs twice, from per-chunk ``(rows, min, max, distinct)``.

    Chunks with distinct keys and disjoint key ranges (every ingest dataset: keys are
    positions, one shard per chunk) prove it without holding the keys; otherwise
    ``all_keys()`` is loaded and counted.
    """
    if not all(r[3] for r in ranges):
        return True
    spans = sorted((lo, hi) for n, lo, hi, _ in ranges if n)
    if all(a[1] < b[0] for a, b in zip(spans, spans[1:])):
        return False
    keys = all_keys()
    return pc.count_distinct(keys).as_py() != len(keys)


@dataclass
class Chunk:
    unit: str
    keys: list[str]
    labels: list[str | None]
    features: np.ndarray


class FeatureStore:
    """Read access to a features directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / META
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.path} is not a features directory (no {META}); produce one with `seerlike extract`")
        self.meta = json.loads(meta_path.read_text())
        if "chunks" not in self.meta:
            raise ValueError(f"features in {self.path} are incomplete (extraction did not finish); rerun `seerlike extract` to resume it")
        self.units: list[str] = list(self.meta["chunks"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def __len__(self) -> int:
        return int(self.meta["num_samples"])

    def index(self) -> pa.Table:
        return pq.read_table(self.path / INDEX)

    def chunk_sizes(self) -> list[int]:
        return [pq.ParquetFile(chunk_paths(self.path, u)[1]).metadata.num_rows for u in self.units]

    def features(self, unit: str, mmap: bool = True) -> np.ndarray:
        return np.load(chunk_paths(self.path, unit)[0], mmap_mode="r" if mmap else None)

    def chunks(self) -> Iterator[Chunk]:
        for unit in self.units:
            t = pq.read_table(chunk_paths(self.path, unit)[1])
            yield Chunk(unit, t["key"].to_pylist(), t["label"].to_pylist(), np.asarray(self.features(unit, mmap=False)))

    def load(self) -> Chunk:
        """Everything in memory, in chunk order (small data sets: eval, tests)."""
        parts = list(self.chunks())
        feats = np.concatenate([c.features for c in parts]) if parts else np.zeros((0, self.dim), np.float32)
        return Chunk("all", [k for c in parts for k in c.keys], [lb for c in parts for lb in c.labels], feats)
