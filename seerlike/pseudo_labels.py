"""The pseudo-labels `seerlike cluster` writes, read back: ``key -> cluster`` for ClusterFit training.

A cluster output dir holds ``labels/features-{unit}.parquet`` parts with columns ``key`` (str),
``cluster`` (int32) and ``distance`` (float32); see seerlike.eval.cluster for how they are made.
This reader depends on nothing else of seerlike, so the data pipeline can join labels by key
without importing the clustering code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def read_labels(path: str | os.PathLike) -> pa.Table:
    """The pseudo-labels (``key, cluster, distance``) of a cluster output dir, labels dir or parquet file."""
    path = Path(path)
    if (path / "labels").is_dir():
        path = path / "labels"
    if not path.exists():
        raise FileNotFoundError(f"no pseudo-labels at {path}; produce them with `seerlike cluster`")
    if path.is_dir():
        parts = sorted(path.glob("*.parquet"))
        if not parts:
            raise FileNotFoundError(f"no parquet parts in {path}")
        return pa.concat_tables([pq.read_table(p) for p in parts])
    return pq.read_table(path)


def label_map(path: str | os.PathLike) -> dict[str, int]:
    """``{key: cluster}`` of the pseudo-labels at ``path`` (what ClusterFit training joins on)."""
    t = read_labels(path)
    return dict(zip(t["key"].to_pylist(), t["cluster"].to_pylist()))
