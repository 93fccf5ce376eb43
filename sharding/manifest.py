"""The manifest: one row per input (written, duplicate or rejected), as zstd parquet.

Dataset layout (a local folder or an ``s3://bucket/prefix``)::

    shards/{chunk:06d}-{j:04d}.tar   WebDataset shards: KEY.jpg + KEY.json
    manifest.parquet                 every input, in input order (this module's SCHEMA)
    summary.json                     counts per status and reason, bytes, throughput
    _ingest/                         work state: plan, chunk lists, per-chunk parts, done markers

Readers use ``shard_urls(dataset)`` for the shard list and ``read_manifest(dataset)`` for
rows; ``offset``/``size`` locate a sample's JPEG bytes inside its shard (one range read).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from seerlike import storage

MANIFEST = "manifest.parquet"
SUMMARY = "summary.json"
WORK = "_ingest"

SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # sample key in the shards: {chunk:06d}_{index:07d}
        pa.field("chunk", pa.int32(), nullable=False),
        pa.field("index", pa.int32(), nullable=False),  # position within the chunk's input list
        pa.field("source", pa.string(), nullable=False),  # local absolute path, s3:// or http(s):// URL
        pa.field("label", pa.string()),  # from a list file's label column, else null
        pa.field("status", pa.string(), nullable=False),  # written | duplicate | rejected
        pa.field("reason", pa.string()),  # reject reason (sharding.process.REASONS), else null
        pa.field("duplicate_of", pa.string()),  # key of the written copy, for duplicates
        pa.field("shard", pa.string()),  # dataset-relative shard path, for written rows
        pa.field("offset", pa.int64()),  # byte offset of the JPEG data inside the shard
        pa.field("size", pa.int64()),  # JPEG bytes stored
        pa.field("width", pa.int32()),  # stored image size (after EXIF rotation and resize)
        pa.field("height", pa.int32()),
        pa.field("orig_width", pa.int32()),  # size declared by the input's header
        pa.field("orig_height", pa.int32()),
        pa.field("orig_format", pa.string()),  # JPEG, PNG, GIF, ... as Pillow names it
        pa.field("orig_bytes", pa.int64()),  # input size in bytes
        pa.field("sha256", pa.string()),  # of the input bytes: the exact-dedup key
        pa.field("phash", pa.uint64()),  # 64-bit DCT perceptual hash (phash=true), else null
        pa.field("kept_original", pa.bool_()),  # stored bytes are the input bytes unchanged
    ]
)
STATUSES = ("written", "duplicate", "rejected")


def table_to_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def read_table(url: str, columns: list[str] | None = None, *, endpoint_url: str | None = None) -> pa.Table:
    if storage.is_s3_url(url):
        return pq.read_table(io.BytesIO(storage.read_bytes(url, endpoint_url=endpoint_url)), columns=columns)
    return pq.read_table(url, columns=columns)


def manifest_url(dataset: str) -> str:
    """The manifest of a dataset folder/prefix (or the manifest path itself)."""
    return dataset if dataset.endswith(".parquet") else storage.join(dataset, MANIFEST)


def dataset_root(manifest_or_dataset: str) -> str:
    s = str(manifest_or_dataset)
    if s.endswith(".parquet"):
        return s.rsplit("/", 1)[0] if storage.is_s3_url(s) else os.path.dirname(s) or "."
    return s.rstrip("/") if storage.is_s3_url(s) else s


def iter_manifest(dataset: str, columns: list[str] | None = None, *, endpoint_url: str | None = None) -> Iterator[pa.RecordBatch]:
    """The manifest as record batches (bounded memory for any corpus size)."""
    url = manifest_url(dataset)
    if storage.is_s3_url(url):
        src = pa.BufferReader(storage.read_bytes(url, endpoint_url=endpoint_url))
        pf = pq.ParquetFile(src)
    else:
        if not storage.exists(url):
            raise FileNotFoundError(f"no manifest at {url}: is {dataset!r} an ingested dataset (run `seerlike ingest`)?")
        pf = pq.ParquetFile(url)
    yield from pf.iter_batches(columns=columns, batch_size=65536)


def read_manifest(dataset: str, columns: list[str] | None = None, *, endpoint_url: str | None = None) -> pa.Table:
    batches = list(iter_manifest(dataset, columns, endpoint_url=endpoint_url))
    schema = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])
    return pa.Table.from_batches(batches, schema=schema)


def shard_urls(dataset_url: str, *, endpoint_url: str | None = None) -> list[str]:
    """The written shards of a dataset (local paths or s3:// URLs), in name order.

    ``dataset_url`` is the dataset folder / ``s3://`` prefix or its manifest.parquet. Only
    shards holding at least one written sample are listed, read from the manifest, so a
    half-finished ingest (no manifest yet) is never read by mistake.
    """
    root = dataset_root(dataset_url)
    shards: set[str] = set()
    for batch in iter_manifest(manifest_url(dataset_url), ["shard", "status"], endpoint_url=endpoint_url):
        d = batch.to_pydict()
        shards.update(s for s, st in zip(d["shard"], d["status"]) if st == "written" and s)
    return [storage.join_within(root, s, what=f"shard {s!r} of the manifest of {dataset_url}") for s in sorted(shards)]


def read_summary(dataset: str, *, endpoint_url: str | None = None) -> dict:
    return json.loads(storage.read_bytes(storage.join(dataset_root(dataset), SUMMARY), endpoint_url=endpoint_url))
