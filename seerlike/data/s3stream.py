"""Read a shard as one stream: local path, ``file://`` or ``s3://`` with Range-resume.

An S3 shard is one streaming GET. When the connection resets, times out, or the server
answers 5xx / throttles, the reader waits (exponential backoff with jitter) and issues a
new GET with ``Range: bytes=<offset>-`` at the byte it had reached, so the consumer (a
tar reader) sees every byte exactly once. ``register_webdataset_opener()`` makes
webdataset's ``url_opener`` use the same reader for ``s3://`` URLs.
"""

from __future__ import annotations

import io
import logging
import queue
import random
import threading
import time
from typing import IO

from seerlike import storage

log = logging.getLogger(__name__)

_RETRY_CODES = {"500", "502", "503", "504", "SlowDown", "Throttling", "ThrottlingException",
                "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable"}


class ShardReadError(IOError):
    """A shard could not be read even after the retries (names the shard and the cause)."""


def _retryable(e: BaseException) -> bool:
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return err.get("Code", "") in _RETRY_CODES or status.startswith("5") or status == "429"
    return isinstance(e, (BotoConnectionError, HTTPClientError, IncompleteReadError, Urllib3Error, ConnectionError,
                          TimeoutError, OSError))


class S3Stream(io.RawIOBase):
    """A read-only, forward-only file object over one S3 object, resuming at the byte offset."""

    def __init__(self, url: str, *, endpoint_url: str | None = None, retries: int = 8,
                 backoff_s: float = 0.2, max_backoff_s: float = 10.0, start: int = 0):
        self.url = url
        self.bucket, self.key = storage.split_s3_url(url)
        self.endpoint_url = endpoint_url
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.offset = start
        self.size: int | None = None
        self.resumes = 0
        self._body = None

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        client = storage.s3_client(self.endpoint_url)
        kwargs = {"Bucket": self.bucket, "Key": self.key}
        if self.offset:
            kwargs["Range"] = f"bytes={self.offset}-"
        resp = client.get_object(**kwargs)
        if self.size is None:
            if self.offset:
                self.size = int(resp["ContentRange"].rsplit("/", 1)[1])
            else:
                self.size = int(resp["ContentLength"])
        self._body = resp["Body"]

    def _retry(self, attempt: int, e: BaseException) -> None:
        if attempt >= self.retries or not _retryable(e):
            raise ShardReadError(f"reading {self.url} failed at byte {self.offset} after {attempt} "
                                 f"retries: {type(e).__name__}: {e}") from e
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
        log.warning("reading %s: %s at byte %d; resuming with a Range request in %.2fs (retry %d/%d)",
                    self.url, type(e).__name__, self.offset, delay, attempt + 1, self.retries)
        self._close_body()
        self.resumes += 1
        time.sleep(delay)

    def _close_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                pass
        self._body = None

    def readinto(self, buf) -> int:
        want = len(buf)
        if want == 0 or (self.size is not None and self.offset >= self.size):
            return 0
        attempt = 0
        while True:
            try:
                if self._body is None:
                    self._open()
                    if self.offset >= self.size:
                        return 0
                data = self._body.read(want)
                if not data and self.offset < self.size:
                    raise ConnectionError(f"body ended at byte {self.offset} of {self.size}")
                n = len(data)
                buf[:n] = data
                self.offset += n
                return n
            except ShardReadError:
                raise
            except Exception as e:  # noqa: BLE001 - classified by _retryable
                self._retry(attempt, e)
                attempt += 1

    def close(self) -> None:
        self._close_body()
        super().close()


class ReadAhead(io.RawIOBase):
    """Reads a stream in a background thread, ``depth`` chunks ahead of the consumer.

    The network wait of a shard then overlaps the decoding of the samples already read
    (socket reads release the GIL). Errors surface in the consumer's next read.
    """

    def __init__(self, raw: io.RawIOBase, chunk: int = 1 << 20, depth: int = 8):
        self._raw, self._chunk = raw, chunk
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pending = memoryview(b"")
        self._eof = False
        self._thread = threading.Thread(target=self._run, name="shard-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._raw.read(self._chunk)
                self._put(data)
                if not data:
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if not self._pending:
            if self._eof:
                return 0
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if not item:
                self._eof = True
                return 0
            self._pending = memoryview(item)
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._raw.close()
        super().close()


def open_shard(url: str, *, endpoint_url: str | None = None, retries: int = 8, backoff_s: float = 0.2,
               buffer_size: int = 1 << 20, read_ahead: int = 8) -> IO[bytes]:
    """A buffered binary stream over a shard: local path, ``file://`` URL or ``s3://`` URL.

    S3 shards are read ``read_ahead`` MiB ahead in a background thread (0: no thread).
    """
    if url.startswith("file://"):
        url = url[len("file://"):]
    if storage.is_s3_url(url):
        raw = S3Stream(url, endpoint_url=endpoint_url, retries=retries, backoff_s=backoff_s)
        if read_ahead:
            raw = ReadAhead(raw, chunk=1 << 20, depth=read_ahead)
        return io.BufferedReader(raw, buffer_size=buffer_size)
    try:
        return open(url, "rb", buffering=buffer_size)
    except OSError as e:
        raise ShardReadError(f"cannot open shard {url}: {e}") from e


def register_webdataset_opener(endpoint_url: str | None = None) -> None:
    """Route webdataset's ``s3://`` URLs through :func:`open_shard` (one GET, Range-resume)."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the package re-exports a function of that name

    def _gopen_s3(url, mode="rb", bufsize=8192, **kw):
        if mode[0] != "r":
            raise ValueError(f"{url}: only reading is supported for s3:// in webdataset")
        return open_shard(url, endpoint_url=endpoint_url)

    gopen.gopen_schemes["s3"] = _gopen_s3
