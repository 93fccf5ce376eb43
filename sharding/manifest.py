"""The manifest: one row per input (written, duplicate or rejected), as zstd parquet.

Dataset layout (a local folder or an ``s3://bucket/prefix``)::

    shards/{chunk:06d}-{j:04d}.tar   WebDataset shards: KEY.jpg + KEY.json
    manifest.parquet                 every input, in input order (this module's SCHEMA)
    shards.parquet                   one row per written shard (SHARD_INDEX_SCHEMA)
    summary.json                     counts per status and reason, bytes, throughput
    _ingest/                         work state: plan, chunk lists, per-chunk parts, done markers

Readers use ``shard_urls(dataset)`` for the shard list and ``read_manifest(dataset)`` for
rows; ``offset``/``size`` locate a sample's JPEG bytes inside its shard (one range read).
The shard index gives the shard list, the sample counts and each shard's row range in the
manifest without reading the manifest (a billion rows); datasets without one (made before
it existed, or by hand) are scanned instead.
"""

from __future__ import annotations

import io
import json
import os
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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

SHARDS = "shards.parquet"
SHARD_INDEX_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),  # dataset-relative, as in the manifest
        pa.field("chunk", pa.int32(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),  # written samples in the shard
        pa.field("bytes", pa.int64(), nullable=False),  # JPEG bytes stored
        pa.field("first_key", pa.string(), nullable=False),  # smallest and largest sample key in it
        pa.field("last_key", pa.string(), nullable=False),
        pa.field("row_start", pa.int64(), nullable=False),  # manifest rows [row_start, row_end) hold its samples
        pa.field("row_end", pa.int64(), nullable=False),
    ]
)


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
    """The manifest as record batches (bounded memory for any corpus size; S3: ranged GETs, no download)."""
    yield from open_manifest(dataset, endpoint_url=endpoint_url).iter_batches(columns=columns, batch_size=65536)


def read_manifest(dataset: str, columns: list[str] | None = None, *, endpoint_url: str | None = None) -> pa.Table:
    batches = list(iter_manifest(dataset, columns, endpoint_url=endpoint_url))
    schema = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])
    return pa.Table.from_batches(batches, schema=schema)


def read_shard_index(dataset: str, *, endpoint_url: str | None = None) -> pa.Table | None:
    """The dataset's shards.parquet (one row per written shard, in name order), or None without one."""
    url = storage.join(dataset_root(dataset), SHARDS)
    if not storage.exists(url, endpoint_url=endpoint_url):
        return None
    return read_table(url, endpoint_url=endpoint_url)


def shard_counts(dataset: str, *, endpoint_url: str | None = None) -> list[tuple[str, int]]:
    """``(dataset-relative shard, written samples)`` of every shard holding one, in name order.

    From the shard index when the dataset has one (its size grows with the shards, not the
    samples); otherwise from one streaming pass over the manifest's shard and status columns.
    """
    index = read_shard_index(dataset, endpoint_url=endpoint_url)
    if index is not None:
        if not storage.exists(manifest_url(dataset), endpoint_url=endpoint_url):
            raise FileNotFoundError(f"no manifest at {manifest_url(dataset)}: the ingest of {dataset!r} did not finish")
        return [(s, c) for s, c in zip(index["shard"].to_pylist(), index["count"].to_pylist()) if c]
    counts: dict[str, int] = {}
    for batch in iter_manifest(dataset, ["shard", "status"], endpoint_url=endpoint_url):
        written = batch.filter(pc.equal(batch.column("status"), "written")).column("shard")
        for d in pc.value_counts(written.drop_null()).to_pylist():
            counts[d["values"]] = counts.get(d["values"], 0) + d["counts"]
    return sorted((s, c) for s, c in counts.items() if s)


def shard_urls(dataset_url: str, *, endpoint_url: str | None = None) -> list[str]:
    """The written shards of a dataset (local paths or s3:// URLs), in name order.

    ``dataset_url`` is the dataset folder / ``s3://`` prefix or its manifest.parquet. Only
    shards holding at least one written sample are listed, read from the shard index or
    the manifest, so a half-finished ingest (no manifest yet) is never read by mistake.
    """
    root = dataset_root(dataset_url)
    return [storage.join_within(root, s, what=f"shard {s!r} of the manifest of {dataset_url}")
            for s, _ in shard_counts(dataset_url, endpoint_url=endpoint_url)]


def read_summary(dataset: str, *, endpoint_url: str | None = None) -> dict:
    return json.loads(storage.read_bytes(storage.join(dataset_root(dataset), SUMMARY), endpoint_url=endpoint_url))


class _S3RangeFile(io.RawIOBase):
    """A seekable read-only S3 object: a read away from the current position starts a ranged GET.

    What pyarrow needs to read a footer and a few row groups of a large manifest without
    downloading it; each GET resumes through dropped connections like every S3 read here.
    """

    def __init__(self, url: str, endpoint_url: str | None = None):
        self.url, self.endpoint_url = url, endpoint_url
        # the size from the first GET's answer (kept open for reads from the start)
        self._reader: storage.S3Reader | None = storage.S3Reader(url, endpoint_url=endpoint_url).open()
        self.size = self._reader.size
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def readinto(self, buf) -> int:
        if self.pos >= self.size:
            return 0
        if self._reader is None or self._reader.offset != self.pos:
            if self._reader is not None:
                self._reader.close()
            self._reader = storage.S3Reader(self.url, endpoint_url=self.endpoint_url, start=self.pos)
        n = self._reader.readinto(buf)
        self.pos += n
        return n

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        super().close()


def open_parquet(source) -> pq.ParquetFile:
    """A ParquetFile that forgets what it has read: a full scan holds one row group, not the file.

    pyarrow's default ``pre_buffer=True`` keeps every column chunk a reader fetched until the
    reader is gone, so one pass over a manifest grows by its compressed size (6 bytes per
    row measured: 6 GB at a billion rows; docs/scale.md).
    """
    return pq.ParquetFile(source, pre_buffer=False, buffer_size=1 << 20)


def open_manifest(dataset: str, *, endpoint_url: str | None = None) -> pq.ParquetFile:
    """The manifest as a ParquetFile: row groups are read on demand (S3: ranged GETs)."""
    url = manifest_url(dataset)
    if storage.is_s3_url(url):
        return open_parquet(io.BufferedReader(_S3RangeFile(url, endpoint_url), buffer_size=1 << 20))
    if not storage.exists(url):
        raise FileNotFoundError(f"no manifest at {url}: is {dataset!r} an ingested dataset (run `seerlike ingest`)?")
    return open_parquet(url)


class ShardRows:
    """The manifest rows of one shard at a time, found through the shard index (no scan).

    ``rows(i)`` reads the row groups holding index entry ``i``'s row range (the last two
    row-group reads are kept: neighbouring shards share them) and returns its rows.
    Pickles without its open file, so DataLoader workers reopen it.
    """

    def __init__(self, dataset: str, index: pa.Table, columns: list[str], *, endpoint_url: str | None = None):
        self.dataset, self.columns, self.endpoint_url = dataset, columns, endpoint_url
        self.starts = index["row_start"].to_numpy()
        self.ends = index["row_end"].to_numpy()
        self._pf: pq.ParquetFile | None = None
        self._group_starts: np.ndarray | None = None
        self._cache: OrderedDict[tuple[int, ...], tuple[int, pa.Table]] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pf": None, "_cache": OrderedDict()}

    def rows(self, i: int) -> pa.Table:
        if self._pf is None:
            self._pf = open_manifest(self.dataset, endpoint_url=self.endpoint_url)
            md = self._pf.metadata
            self._group_starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
        lo, hi = int(self.starts[i]), int(self.ends[i])
        first = int(np.searchsorted(self._group_starts, lo, side="right")) - 1
        last = int(np.searchsorted(self._group_starts, hi - 1, side="right")) - 1
        groups = tuple(range(first, last + 1))
        got = self._cache.get(groups)
        if got is None:
            got = (int(self._group_starts[first]), self._pf.read_row_groups(list(groups), columns=self.columns))
            self._cache[groups] = got
            if len(self._cache) > 2:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(groups)
        base, table = got
        return table.slice(lo - base, hi - lo)
