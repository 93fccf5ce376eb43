"""The pseudo-labels `seerlike cluster` writes, read back: ``key -> cluster`` for ClusterFit training.

A cluster output dir holds ``labels/features-{unit}.parquet`` parts with columns ``key`` (str),
``cluster`` (int32) and ``distance`` (float32), one per feature chunk (see
seerlike.eval.cluster), and ``labels_index.parquet``: per part its rows and its smallest and
largest key.

``label_map`` is what training joins on. When the parts' key ranges are disjoint (every
ingest dataset: keys are positions and a part holds one shard) it returns a
``PseudoLabels`` mapping that finds a key's part by binary search over the ranges and
loads only that part, keeping a few: a reader holds a few shards' labels, not the
corpus's (docs/scale.md, "Steps that see the whole corpus"). Otherwise the labels are
loaded into a dict. This module depends on nothing else of seerlike, so the data pipeline
can join labels by key without importing the clustering code.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from seerlike import storage

log = logging.getLogger(__name__)

INDEX = "labels_index.parquet"
INDEX_SCHEMA = pa.schema([("part", pa.string()), ("rows", pa.int64()), ("min_key", pa.string()),
                          ("max_key", pa.string())])


def _labels_dir(path: Path) -> Path:
    return path / "labels" if (path / "labels").is_dir() else path


def read_labels(path: str | os.PathLike) -> pa.Table:
    """The pseudo-labels (``key, cluster, distance``) of a cluster output dir, labels dir or parquet file.

    Everything in memory: for small outputs and tests; training uses ``label_map``.
    """
    path = _labels_dir(Path(path))
    if not path.exists():
        raise FileNotFoundError(f"no pseudo-labels at {path}; produce them with `seerlike cluster`")
    if path.is_dir():
        parts = sorted(path.glob("*.parquet"))
        if not parts:
            raise FileNotFoundError(f"no parquet parts in {path}")
        return pa.concat_tables([pq.read_table(p) for p in parts])
    return pq.read_table(path)


def write_index(out: str | os.PathLike, k: int) -> tuple[np.ndarray, float, int]:
    """Write ``labels_index.parquet`` of a cluster output; returns (cluster sizes, sum of distances, rows).

    One pass over the parts, one part in memory at a time.
    """
    out = Path(out)
    sizes = np.zeros(k, np.int64)
    total, n = 0.0, 0
    rows = {name: [] for name in INDEX_SCHEMA.names}
    for p in sorted((out / "labels").glob("*.parquet")):
        t = pq.read_table(p, columns=["key", "cluster", "distance"])
        sizes += np.bincount(t["cluster"].to_numpy(), minlength=k)[:k]
        total += float(pc.sum(t["distance"].cast(pa.float64())).as_py() or 0.0)
        n += t.num_rows
        mm = pc.min_max(t["key"]) if t.num_rows else None
        for name, v in zip(INDEX_SCHEMA.names, (p.name, t.num_rows, mm and mm["min"].as_py(), mm and mm["max"].as_py())):
            rows[name].append(v)
    with storage.atomic_write(out / INDEX) as tmp:
        pq.write_table(pa.table(rows, schema=INDEX_SCHEMA), tmp)
    return sizes, total, n


class PseudoLabels(Mapping):
    """``key -> cluster`` over label parts with disjoint key ranges, loading a part when a key needs it.

    ``get`` bisects the sorted smallest keys, checks the part's largest key, and looks the
    key up in that part (the ``cache`` most recently used parts stay loaded): a stream
    that reads shard after shard loads each part once.
    """

    def __init__(self, folder: Path, parts: list[str], min_keys: list[str], max_keys: list[str], rows: list[int],
                 cache: int = 8):
        order = sorted(range(len(parts)), key=lambda i: min_keys[i])
        self.folder = folder
        self.parts = [parts[i] for i in order]
        self._lo = [min_keys[i] for i in order]
        self._hi = [max_keys[i] for i in order]
        self._rows = sum(rows)
        self._cache_size = cache
        self._cache: OrderedDict[int, dict[str, int]] = OrderedDict()

    @classmethod
    def from_ranges(cls, folder: Path, index: pa.Table, cache: int = 8) -> PseudoLabels | None:
        """The mapping, or None when two parts' key ranges overlap (a key could be in either)."""
        t = index.filter(pc.greater(index["rows"], 0))
        lo, hi = t["min_key"].to_pylist(), t["max_key"].to_pylist()
        spans = sorted(zip(lo, hi))
        if any(a[1] >= b[0] for a, b in zip(spans, spans[1:])):
            return None
        return cls(folder, t["part"].to_pylist(), lo, hi, t["rows"].to_pylist(), cache)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": OrderedDict()}  # DataLoader workers start with an empty cache

    def _part(self, i: int) -> dict[str, int]:
        got = self._cache.get(i)
        if got is None:
            t = pq.read_table(self.folder / self.parts[i], columns=["key", "cluster"])
            got = dict(zip(t["key"].to_pylist(), t["cluster"].to_pylist()))
            self._cache[i] = got
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(i)
        return got

    def get(self, key, default=None):
        i = bisect.bisect_right(self._lo, key) - 1
        if i < 0 or key > self._hi[i]:
            return default
        return self._part(i).get(key, default)

    def __getitem__(self, key: str) -> int:
        got = self.get(key)
        if got is None:
            raise KeyError(key)
        return got

    def __contains__(self, key) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        return self._rows

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self.parts)):
            yield from pq.read_table(self.folder / self.parts[i], columns=["key"])["key"].to_pylist()


def _ranges(folder: Path) -> pa.Table:
    """The index of a labels folder without one, read part by part (older cluster outputs)."""
    rows = {name: [] for name in INDEX_SCHEMA.names}
    for p in sorted(folder.glob("*.parquet")):
        keys = pq.read_table(p, columns=["key"])["key"]
        mm = pc.min_max(keys) if len(keys) else None
        for name, v in zip(INDEX_SCHEMA.names, (p.name, len(keys), mm and mm["min"].as_py(), mm and mm["max"].as_py())):
            rows[name].append(v)
    return pa.table(rows, schema=INDEX_SCHEMA)


def label_map(path: str | os.PathLike) -> Mapping[str, int]:
    """``key -> cluster`` of the pseudo-labels at ``path`` (what ClusterFit training joins on).

    A cluster output or labels dir gives a ``PseudoLabels`` (one part loaded at a time) when
    its parts' key ranges are disjoint; a single parquet file, or parts whose ranges
    overlap, a dict of every label.
    """
    path = Path(path)
    folder = _labels_dir(path)
    if folder.is_dir():
        index = folder.parent / INDEX
        table = pq.read_table(index) if index.is_file() else _ranges(folder)
        if table.num_rows:
            lookup = PseudoLabels.from_ranges(folder, table)
            if lookup is not None:
                return lookup
            log.warning("the label parts in %s have overlapping key ranges: loading all %d labels into memory",
                        folder, sum(table["rows"].to_pylist()))
    t = read_labels(path)
    return dict(zip(t["key"].to_pylist(), t["cluster"].to_pylist()))
