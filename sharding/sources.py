"""Where inputs come from: listing them (streaming, in a deterministic order) and fetching bytes.

An input reference is a local path, an ``s3://`` URL or an ``http(s)://`` URL. ``iter_sources``
expands the user's inputs (folders, list files, S3 prefixes, single files/URLs) into
``Source(ref, label)`` records one at a time, so listing a billion-object prefix needs
memory for one page or one directory, never the whole corpus. ``fetch`` turns a reference
into bytes or raises ``FetchError`` carrying the reject reason.
"""

from __future__ import annotations

import csv
import http.client
import io
import logging
import os
import posixpath
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

from seerlike import storage
from seerlike.config import ConfigError
from sharding.config import IngestConfig

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".txt", ".lst", ".csv", ".tsv", ".parquet")
PATH_COLUMNS = ("path", "url", "file", "filename")


class Source(NamedTuple):
    ref: str
    """Local absolute path, s3:// URL or http(s):// URL."""
    label: str | None


class FetchError(Exception):
    """Fetching an input failed; ``reason`` is the manifest's reject reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------- listing


def normalize_ref(ref: str) -> str:
    """URLs stay as they are; local paths become absolute (so every worker and rerun agrees)."""
    if storage.is_s3_url(ref) or storage.is_http_url(ref):
        return ref
    return os.path.abspath(os.path.expanduser(ref))


def _has_ext(name: str, exts: tuple[str, ...]) -> bool:
    return name.lower().endswith(tuple(e.lower() for e in exts))


def _hidden(path: str, root: str) -> bool:
    rel = os.path.relpath(path, root) if not storage.is_s3_url(path) else path[len(root) :]
    return any(part.startswith(".") for part in rel.replace("\\", "/").split("/") if part)


def check_inputs(cfg: IngestConfig) -> None:
    """Fail early, naming the input, when a local input does not exist."""
    if not cfg.inputs:
        raise ConfigError("no inputs: pass folders, list files, s3://bucket/prefix or http(s) URLs")
    for ref in cfg.inputs:
        if not (storage.is_s3_url(ref) or storage.is_http_url(ref)) and not os.path.exists(ref):
            raise ConfigError(f"input {ref!r} does not exist (expected a folder, a list file or an image)")


def iter_sources(cfg: IngestConfig) -> Iterator[Source]:
    """Every input image reference, in order: inputs in the order given, each expanded."""
    for ref in cfg.inputs:
        yield from _expand(normalize_ref(ref), cfg)


def _expand(ref: str, cfg: IngestConfig) -> Iterator[Source]:
    if storage.is_http_url(ref):
        yield Source(ref, None)
    elif _has_ext(ref, LIST_SUFFIXES):
        yield from _iter_list_file(ref, cfg)
    elif storage.is_s3_url(ref) and _has_ext(ref, cfg.extensions):
        yield Source(ref, None)
    elif storage.is_s3_url(ref) or os.path.isdir(ref):
        root = ref if storage.is_s3_url(ref) else ref.rstrip(os.sep) or os.sep
        skipped = 0
        for path, _size in storage.list_files(root, endpoint_url=cfg.endpoint_url or None):
            if _has_ext(path, cfg.extensions) and not _hidden(path, root):
                yield Source(path, None)
            else:
                skipped += 1
        if skipped:
            log.info("%s: skipped %d files without an image extension (or hidden)", ref, skipped)
    else:
        yield Source(ref, None)


def _resolve_entry(entry: str, base: str) -> str:
    """Entries of a list file: URLs and absolute paths as they are, others relative to the list."""
    entry = entry.strip()
    if storage.is_s3_url(entry) or storage.is_http_url(entry) or os.path.isabs(entry):
        return entry if not os.path.isabs(entry) else os.path.normpath(entry)
    if storage.is_s3_url(base):
        bucket, key = storage.split_s3_url(base)
        return f"s3://{bucket}/" + posixpath.normpath(posixpath.join(key, entry)).lstrip("/")
    return os.path.normpath(os.path.join(base, entry))


def _iter_list_file(ref: str, cfg: IngestConfig) -> Iterator[Source]:
    if storage.is_s3_url(ref):
        base = ref.rsplit("/", 1)[0]
        with tempfile.TemporaryDirectory() as tmp:
            dest = storage.local_path_for(tmp, ref.rsplit("/", 1)[-1], what=ref)
            local = storage.get_file(ref, dest, endpoint_url=cfg.endpoint_url or None)
            yield from _iter_list_entries(str(local), ref, base, cfg)
    else:
        yield from _iter_list_entries(ref, ref, os.path.dirname(ref), cfg)


def _pick_column(columns: list[str], ref: str, cfg: IngestConfig) -> str:
    if cfg.list_column:
        if cfg.list_column not in columns:
            raise ConfigError(f"{ref}: no column {cfg.list_column!r} (columns: {columns}); set list_column=NAME")
        return cfg.list_column
    for name in PATH_COLUMNS:
        if name in columns:
            return name
    raise ConfigError(f"{ref}: none of the columns {list(PATH_COLUMNS)} found (columns: {columns}); set list_column=NAME")


def _iter_list_entries(local: str, ref: str, base: str, cfg: IngestConfig) -> Iterator[Source]:
    lower = local.lower()
    if lower.endswith((".txt", ".lst")):
        with open(local, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip() and not line.lstrip().startswith("#"):
                    yield Source(_resolve_entry(line, base), None)
    elif lower.endswith((".csv", ".tsv")):
        with open(local, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if lower.endswith(".tsv") else ",")
            column = _pick_column(list(reader.fieldnames or []), ref, cfg)
            has_label = cfg.label_column in (reader.fieldnames or [])
            for row in reader:
                if row[column]:
                    yield Source(_resolve_entry(row[column], base), row[cfg.label_column] if has_label else None)
    else:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(local, pre_buffer=False, buffer_size=1 << 20)  # a billion-row list file: one row group held
        names = pf.schema_arrow.names
        column = _pick_column(names, ref, cfg)
        cols = [column] + ([cfg.label_column] if cfg.label_column in names and cfg.label_column != column else [])
        for batch in pf.iter_batches(columns=cols, batch_size=65536):
            paths = batch.column(column).to_pylist()
            labels = batch.column(cfg.label_column).to_pylist() if len(cols) > 1 else [None] * len(paths)
            for p, lab in zip(paths, labels):
                if p:
                    yield Source(_resolve_entry(str(p), base), None if lab is None else str(lab))


# ---------------------------------------------------------------- fetching


def fetch(ref: str, cfg: IngestConfig) -> bytes:
    """The bytes of one input; raises FetchError(reason) for too_many_bytes / fetch_failed."""
    if storage.is_http_url(ref):
        return _fetch_http(ref, cfg)
    if storage.is_s3_url(ref):
        endpoint = cfg.endpoint_url or None
        try:
            size = storage.size_of(ref, endpoint_url=endpoint)
            if size > cfg.max_bytes:
                raise FetchError("too_many_bytes", f"{ref}: {size} bytes > max_bytes")
            return storage.read_bytes(ref, endpoint_url=endpoint)
        except FetchError:
            raise
        except Exception as e:  # noqa: BLE001 - any S3 failure is this input's fetch failure
            raise FetchError("fetch_failed", f"{ref}: {type(e).__name__}: {e}") from None
    try:
        size = os.path.getsize(ref)
        if size > cfg.max_bytes:
            raise FetchError("too_many_bytes", f"{ref}: {size} bytes > max_bytes {cfg.max_bytes}")
        with open(ref, "rb") as f:
            return f.read()
    except OSError as e:
        raise FetchError("fetch_failed", f"{ref}: {e.strerror or e}") from None


def _retryable_http(e: Exception) -> bool:
    if isinstance(e, urllib.error.HTTPError):
        return e.code == 429 or e.code >= 500
    return isinstance(e, (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException))


def _fetch_http(url: str, cfg: IngestConfig) -> bytes:
    shown = storage.redact_url(url)
    last: Exception | None = None
    for attempt in range(cfg.http_retries + 1):
        if attempt:
            time.sleep(cfg.http_backoff_s * 2 ** (attempt - 1))
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "seerlike-ingest/0.1"})
            with urllib.request.urlopen(req, timeout=cfg.http_timeout_s) as resp:
                declared = resp.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > cfg.max_bytes:
                    raise FetchError("too_many_bytes", f"{shown}: Content-Length {declared} > max_bytes {cfg.max_bytes}")
                buf = io.BytesIO()
                while piece := resp.read(1 << 16):
                    buf.write(piece)
                    if buf.tell() > cfg.max_bytes:
                        raise FetchError("too_many_bytes", f"{shown}: more than max_bytes {cfg.max_bytes}")
                return buf.getvalue()
        except FetchError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below
            last = e
            if not _retryable_http(e):
                break
            log.debug("GET %s failed (%s), attempt %d", shown, e, attempt + 1)
    detail = f"HTTP {last.code}" if isinstance(last, urllib.error.HTTPError) else f"{type(last).__name__}: {last}"
    raise FetchError("fetch_failed", f"{shown}: {detail}")


def prefetch(sources: Iterable[Source], cfg: IngestConfig) -> Iterator[tuple[Source, bytes | FetchError]]:
    """Inputs' bytes in input order. S3/HTTP inputs are fetched ahead on ``cfg.fetch_threads``
    threads (a bounded window in flight); local files are read inline, where a thread hop
    would cost more than the read."""

    def one(src: Source) -> bytes | FetchError:
        try:
            return fetch(src.ref, cfg)
        except FetchError as e:
            return e

    window = 4 * cfg.fetch_threads
    it = iter(sources)
    with ThreadPoolExecutor(cfg.fetch_threads, thread_name_prefix="fetch") as ex:
        pending: deque[tuple[Source, Future | None]] = deque()

        def push(src: Source) -> None:
            remote = storage.is_s3_url(src.ref) or storage.is_http_url(src.ref)
            pending.append((src, ex.submit(one, src) if remote else None))

        for src in it:
            push(src)
            if len(pending) >= window:
                break
        while pending:
            src, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                push(nxt)
            yield src, (fut.result() if fut is not None else one(src))
