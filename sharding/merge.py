"""The merge's pieces that see one chunk at a time: summaries, shard index rows, manifest assembly.

The merge (``sharding.ingest.merge``) is split so that no process holds the corpus and
the shard rewrites spread over many tasks (docs/scale.md, "Steps that see the whole
corpus"):

1. ``merge_prepare``: cross-chunk dedup (hash-partitioned, bounded memory) writes the
   duplicates of every group of ``DUP_GROUP`` chunks to ``_ingest/dups/{g:06d}.parquet``
   and a digest of the whole result to ``_ingest/dedup.json``;
2. ``merge_chunk(k)`` for every chunk, in any order and on any machine: marks chunk
   ``k``'s later copies, rewrites the shards that held them, writes the chunk's final
   rows (``_ingest/merged/{k:06d}.parquet``, only when something changed) and last its
   marker (``_ingest/merged/{k:06d}.json``: the chunk's counts and its shards' index rows);
3. ``merge_finish``: streams the chunks' rows into ``manifest.parquet`` (row groups of
   ``ROW_GROUP`` rows, whatever the chunk size), writes the shard index
   ``shards.parquet`` from the markers, then ``summary.json``.

Every step is a deterministic function of the chunk parts, so a rerun after a stop at
any point gives the same files; a marker records the dedup digest and the chunk's done
marker it was made from, so a stale one is redone rather than trusted.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sharding.manifest import SCHEMA, SHARD_INDEX_SCHEMA

DUP_GROUP = 64
"""Chunks whose cross-chunk duplicates share one file of ``_ingest/dups``."""
ROW_GROUP = 1 << 18
"""Rows per row group of manifest.parquet: a footer of ~4,000 row groups at a billion rows."""
DUP_SCHEMA = pa.schema([("dup", pa.int64()), ("win", pa.int64())])


def _value_counts(arr: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    return {d["values"]: d["counts"] for d in pc.value_counts(arr).to_pylist() if d["values"] is not None}


def chunk_summary(t: pa.Table, row_offset: int) -> dict:
    """Counts, bytes and the shard index rows of one chunk's final manifest rows.

    ``row_offset`` is the chunk's first row in manifest.parquet (rows are in input order,
    so chunk ``k`` starts at ``k x chunk_size``).
    """
    status = t["status"]
    written = pc.equal(status, "written")
    w = t.filter(written)
    rej = t.filter(pc.equal(status, "rejected"))
    counts = _value_counts(status)
    summary = {
        "rows": t.num_rows,
        "counts": {s: counts.get(s, 0) for s in ("written", "duplicate", "rejected")},
        "reasons": _value_counts(rej["reason"]),
        "bytes_in": int(pc.sum(t["orig_bytes"]).as_py() or 0),
        "bytes_written": int(pc.sum(w["size"]).as_py() or 0),
        "kept_original": int(pc.sum(pc.cast(pc.fill_null(w["kept_original"], False), pa.int64())).as_py() or 0),
    }
    rows = np.flatnonzero(written.to_numpy(zero_copy_only=False)) if t.num_rows else np.empty(0, np.int64)
    shard_names = w["shard"].to_numpy(zero_copy_only=False)
    names, first, inverse = np.unique(shard_names, return_index=True, return_inverse=True)
    last = np.zeros(len(names), np.int64)
    np.maximum.at(last, inverse, np.arange(len(inverse)))
    sizes = np.bincount(inverse, weights=w["size"].to_numpy(zero_copy_only=False).astype(np.float64),
                        minlength=len(names)) if len(names) else np.zeros(0)
    keys = w["key"].to_numpy(zero_copy_only=False)
    count = np.bincount(inverse, minlength=len(names))
    summary["shards"] = [
        {"shard": str(names[i]), "count": int(count[i]), "bytes": int(sizes[i]),
         "first_key": str(keys[first[i]]), "last_key": str(keys[last[i]]),
         "row_start": int(row_offset + rows[first[i]]), "row_end": int(row_offset + rows[last[i]] + 1)}
        for i in range(len(names))
    ]
    return summary


def shard_index_table(chunk_markers: list[dict]) -> pa.Table:
    """shards.parquet: one row per written shard, in name order, from the chunks' markers."""
    rows = sorted((s for m in chunk_markers for s in (dict(e, chunk=m["chunk"]) for e in m["shards"])),
                  key=lambda e: e["shard"])
    return pa.table({name: [e[name] for e in rows] for name in SHARD_INDEX_SCHEMA.names}, schema=SHARD_INDEX_SCHEMA)


class ManifestAssembler:
    """Writes chunk tables into one parquet file in row groups of exactly ``ROW_GROUP`` rows (the last shorter)."""

    def __init__(self, path, row_group: int = ROW_GROUP):
        self.writer = pq.ParquetWriter(path, SCHEMA, compression="zstd")
        self.row_group = row_group
        self.buf: list[pa.Table] = []
        self.rows = 0

    def add(self, t: pa.Table) -> None:
        self.buf.append(t)
        self.rows += t.num_rows
        if self.rows >= self.row_group:
            whole = pa.concat_tables(self.buf)
            n = (self.rows // self.row_group) * self.row_group
            self.writer.write_table(whole.slice(0, n), row_group_size=self.row_group)
            self.buf, self.rows = [whole.slice(n)], self.rows - n

    def close(self) -> None:
        if self.rows:
            self.writer.write_table(pa.concat_tables(self.buf), row_group_size=self.row_group)
        self.writer.close()
