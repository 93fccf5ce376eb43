"""Read a shard as one stream: local path, ``file://`` or ``s3://`` with Range-resume.

An S3 shard is one streaming GET through ``storage.S3Reader``, the reader every S3 read
uses: when the connection resets, times out, or the server answers 5xx / throttles, it
waits (``storage.RetryPolicy``: exponential backoff with jitter) and issues a new GET with
``Range: bytes=<offset>-`` at the byte it had reached, so the consumer (a tar reader) sees
every byte exactly once.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
from typing import IO

from seerlike import storage

log = logging.getLogger(__name__)


class ShardReadError(storage.StorageError):
    """A shard could not be read even after the retries (names the shard and the cause)."""


class S3Stream(storage.S3Reader):
    """``storage.S3Reader`` with the shard options (data.s3_retries / s3_backoff_s), raising ShardReadError."""

    def __init__(self, url: str, *, endpoint_url: str | None = None, retries: int = 8,
                 backoff_s: float = 0.2, max_backoff_s: float = 10.0, start: int = 0):
        policy = storage.RetryPolicy(retries=retries, backoff_s=backoff_s, max_backoff_s=max_backoff_s)
        super().__init__(url, endpoint_url=endpoint_url, retry=policy, start=start)

    def _error(self, message: str, cause: BaseException) -> Exception:
        return ShardReadError(str(super()._error(message, cause)))


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
