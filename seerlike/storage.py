"""Local paths and S3 URLs behind one small set of functions.

Every function here takes either a local path or an ``s3://bucket/key`` URL, so callers
(ingest, data loading, checkpoints, launchers) never branch on where data lives:

- read: ``read_bytes(url)``, ``open_read(url)`` (a streaming binary file object),
  ``get_file(url, local)``, ``get_tree(prefix, dest)`` (every object under a prefix),
  ``exists``, ``size_of``, ``list_files(prefix)`` (paginated on S3, recursive locally).
- write: ``write_bytes(url, data)`` (atomic: temp + rename locally, one PUT on S3),
  ``put_file(local, url)`` (rename/copy locally, multipart upload on S3), ``remove``,
  ``remove_tree(prefix)``.
- paths: ``join(base, *parts)``; ``join_within(root, rel)`` and ``local_path_for(dest, rel)``
  for names that come from data (manifests, S3 keys), which must stay below their root.
- ``atomic_write(path)``: the one write-then-rename helper of the project (temp file beside
  the destination, umask permissions, fsync); ``DiskFullError`` for a full disk.
- ``redact_url`` (logs, errors) and ``strip_credentials`` (saved configs, job records).

Every S3 request goes through one retry policy (``RetryPolicy``): connection resets,
timeouts, truncated bodies, 5xx and throttling are retried with exponential backoff and
jitter; an interrupted read resumes with ``Range: bytes=<offset>-`` at the byte it had
reached (``S3Reader``); a multipart upload retries the part that failed. Anything else
(403, 404, bad credentials) fails at once. botocore's own retries are off, so a dead
endpoint fails after exactly this policy. docs/cluster.md, "S3 faults", lists each case.

Credentials come from boto3's standard chain (env, profile, instance role). An endpoint
URL may carry ``user:password@`` (e.g. MinIO); those are split off before the endpoint
reaches boto3, so no botocore message or log line can show them, and they are never
saved: a resumed run takes its credentials from the environment.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import random
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

log = logging.getLogger(__name__)

T = TypeVar("T")

MULTIPART_THRESHOLD = 64 * 1024 * 1024
"""Files larger than this go up as a multipart upload (S3's single PUT limit is 5 GB)."""
PART_SIZE = 32 * 1024 * 1024
"""Multipart part size; S3 requires >= 5 MiB for every part but the last."""
MIN_PART_SIZE = 5 * 1024 * 1024
"""S3's smallest part (all but the last); multipart_upload refuses smaller part sizes."""
CHUNK = 1 << 20
"""Bytes per read when streaming an object to memory or to a file."""
PIECE = 16 * 1024
"""Bytes per read from an S3 response body: a read blocks until its piece is complete, so a
dropped connection loses at most this much of what had arrived (~0.5 s of CPU per GB)."""


class StorageError(OSError):
    """An S3 request failed for good (names the object and the cause), or a key was refused."""


class StorageNotFound(StorageError, FileNotFoundError):
    """The object does not exist (404 / NoSuchKey)."""


class UnsafeKeyError(StorageError):
    """A name read from data (an S3 key, a manifest entry) would leave its destination folder."""


# ---------------------------------------------------------------- URLs


def is_s3_url(url: str | os.PathLike) -> bool:
    return isinstance(url, str) and url.startswith("s3://")


def is_http_url(url: str | os.PathLike) -> bool:
    return isinstance(url, str) and url.startswith(("http://", "https://"))


def absolute(ref: str | os.PathLike) -> str:
    """A local path made absolute (so a record of it holds from any directory); URLs (``scheme://``) unchanged."""
    ref = os.fspath(ref)
    if "://" in ref or not ref:
        return ref
    return os.path.abspath(os.path.expanduser(ref))


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the key may be empty (bucket root)."""
    if not is_s3_url(url):
        raise ValueError(f"not an S3 URL: {url!r} (expected s3://bucket/key)")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"S3 URL without a bucket: {url!r} (expected s3://bucket/key)")
    return bucket, key


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path components onto a local path or an S3 URL (trusted parts only: see join_within)."""
    if is_s3_url(base):
        out = str(base).rstrip("/")
        for p in parts:
            out = f"{out}/{p.strip('/')}"
        return out
    return os.path.join(os.fspath(base), *parts)


def _check_relative(rel: str, root: str | os.PathLike, what: str) -> str:
    """``rel`` if it is a canonical relative path (no empty, ``.`` or ``..`` parts), else raise.

    Canonical, not merely normalised: ``a/../b`` would land inside ``root`` but could
    overwrite ``b`` with another object's bytes, so it is refused too.
    """
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel or any(p in ("", ".", "..") for p in parts):
        raise UnsafeKeyError(
            f"refusing {what}: {rel!r} is not a plain relative path below {root} (it has an empty, '.' or '..' "
            "part, or is absolute) and would be written or read outside it; seerlike never writes such names, "
            "so the data was made or changed by something else: remove that object or entry")
    return rel


def join_within(root: str | os.PathLike, rel: str, *, what: str = "") -> str:
    """``join(root, rel)`` for a ``rel`` read from data (a manifest's shard column), refusing escapes."""
    return join(root, _check_relative(rel, root, what or repr(rel)))


def local_path_for(dest: str | os.PathLike, rel: str, *, what: str = "") -> Path:
    """The local file ``dest/rel`` for an object named ``rel`` below a downloaded prefix.

    Every download into a folder goes through here: ``rel`` comes from an S3 listing, which
    anyone with write access to the bucket controls.
    """
    dest = Path(dest)
    path = dest.joinpath(*_check_relative(rel, dest, what or repr(rel)).split("/"))
    if not path.resolve().is_relative_to(dest.resolve()):  # a symlink already inside dest
        raise UnsafeKeyError(f"refusing {what or repr(rel)}: {path} resolves outside {dest}")
    return path


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")


def strip_credentials(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it removed (for saved configs, argv)."""
    return _USERINFO.sub(r"\g<scheme>", text)


def redact_url(url: str) -> str:
    """Drop ``user:password@`` and the query string (presigned signatures) from a URL."""
    try:
        s = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if not s.scheme or s.scheme == "s3":
        return url
    netloc = s.hostname or ""
    if s.port:
        netloc = f"{netloc}:{s.port}"
    return urlunsplit((s.scheme, netloc, s.path, "", ""))


def split_endpoint(endpoint: str) -> tuple[str, tuple[str, str] | None]:
    """``http://KEY:SECRET@host:9000`` -> (``http://host:9000``, (KEY, SECRET)); no userinfo: (endpoint, None)."""
    s = urlsplit(endpoint)
    if "@" not in s.netloc:
        return endpoint, None
    clean = urlunsplit((s.scheme, s.netloc.rpartition("@")[2], s.path, s.query, s.fragment))
    if not s.password:  # a user without a secret is no credential: drop it rather than send it
        return clean, None
    return clean, (unquote(s.username or ""), unquote(s.password))


# ---------------------------------------------------------------- retry policy


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How every S3 request and every interrupted S3 read is retried."""

    retries: int = 8
    """Retries after the first try; a read that made progress since its last failure starts counting again."""
    backoff_s: float = 0.2
    """First delay; doubled on each further retry, times a random 0.5-1 (jitter)."""
    max_backoff_s: float = 10.0
    """Upper bound of one delay."""

    def delay(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)


DEFAULT_RETRY = RetryPolicy()
"""The policy of every S3 call that is not given one (the shard reader passes data.s3_retries / s3_backoff_s)."""

_RETRY_CODES = {"500", "502", "503", "504", "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable"}


def retryable(e: BaseException) -> bool:
    """Transient: connection errors, timeouts, truncated bodies, 5xx, 429 and S3's throttling codes."""
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return err.get("Code", "") in _RETRY_CODES or status.startswith("5") or status == "429"
    if isinstance(e, StorageError):
        return False
    return isinstance(e, (BotoConnectionError, HTTPClientError, IncompleteReadError, Urllib3Error, ConnectionError,
                          TimeoutError, OSError))


def _error_code(e: BaseException) -> str:
    """S3's error code of a ClientError ("NoSuchKey", "SlowDown", ...); empty for other errors."""
    response = getattr(e, "response", None)
    return response.get("Error", {}).get("Code", "") if isinstance(response, dict) else ""


def _is_missing(e: BaseException) -> bool:
    return _error_code(e) in ("404", "NoSuchKey", "NotFound")


def storage_error(message: str, cause: BaseException) -> StorageError:
    """The error for a failed S3 request: not-found, missing credentials, or the cause as text."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    text = f"{message}: {type(cause).__name__}: {cause}"
    if _is_missing(cause):
        return StorageNotFound(text)
    if isinstance(cause, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(
            f"{message}: no S3 credentials found: export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE). A user:password inside an endpoint URL is never saved (config.yaml holds the "
            "endpoint without it), so a resumed run takes its credentials from the environment "
            "(docs/cluster.md, S3 and credentials)")
    return StorageError(text)


def with_retries(fn: Callable[[], T], *, what: str, retry: RetryPolicy | None = None) -> T:
    """Call ``fn`` (one S3 request) under the retry policy; the final failure is a StorageError naming ``what``."""
    policy = retry or DEFAULT_RETRY
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified by retryable()
            if attempt >= policy.retries or not retryable(e):
                tries = f" after {attempt} retries" if attempt else ""
                raise storage_error(f"{what} failed{tries}", e) from e
            delay = policy.delay(attempt)
            log.warning("%s: %s; retry %d/%d in %.2fs", what, _error_code(e) or type(e).__name__, attempt + 1,
                        policy.retries, delay)
            time.sleep(delay)
            attempt += 1


# ---------------------------------------------------------------- S3 client

_clients: dict[tuple[int, str], Any] = {}
_clients_lock = threading.Lock()


def endpoint_from_env(endpoint_url: str | None = None) -> str | None:
    """The explicit endpoint, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else None (AWS)."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client, cached per process and endpoint; botocore's own retries are off.

    Credentials: the endpoint's ``user:password@`` if it has one (split off here, so the
    endpoint boto3 sees, and every message it formats, is clean), else the standard chain.
    boto3 clients are thread-safe (one is shared by fetch threads) but not fork-safe,
    hence the pid in the cache key.
    """
    import boto3
    from botocore.config import Config

    endpoint = endpoint_from_env(endpoint_url)
    key = (os.getpid(), endpoint or "")
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            clean, creds = split_endpoint(endpoint) if endpoint else (None, None)
            extra = {}
            if creds is not None:
                extra = {"aws_access_key_id": creds[0], "aws_secret_access_key": creds[1]}
                log.warning("S3 endpoint %s carries credentials in its URL: using them in this process; they are "
                            "not saved, so export AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for a resumed run",
                            redact_url(clean))
            cfg = Config(retries={"total_max_attempts": 1, "mode": "standard"}, max_pool_connections=32)
            client = boto3.session.Session().client("s3", endpoint_url=clean, config=cfg, **extra)
            _clients[key] = client
    return client


# ---------------------------------------------------------------- read


class S3Reader(io.RawIOBase):
    """A forward-only file object over one S3 object that survives dropped connections.

    One streaming GET; when it fails (reset, timeout, truncated body, 5xx, throttling) the
    reader waits per the retry policy and sends ``GET`` with ``Range: bytes=<offset>-`` and
    ``If-Match: <etag>``, so the consumer sees every byte exactly once and an object
    replaced mid-read is an error rather than a splice of two versions.
    """

    def __init__(self, url: str, *, endpoint_url: str | None = None, retry: RetryPolicy | None = None,
                 start: int = 0):
        self.url = url
        self.bucket, self.key = split_s3_url(url)
        self.endpoint_url = endpoint_url
        self.retry = retry or DEFAULT_RETRY
        self.offset = start
        self.size: int | None = None
        self.etag: str | None = None
        self.resumes = 0
        self._body = None

    def readable(self) -> bool:
        return True

    def open(self) -> "S3Reader":
        """Send the first GET now (learns the size); reads do this themselves when needed."""
        self._with_retries(lambda: self._open() if self._body is None else None)
        return self

    def _open(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if self.offset:
            kwargs["Range"] = f"bytes={self.offset}-"
        if self.etag:
            kwargs["IfMatch"] = self.etag
        resp = s3_client(self.endpoint_url).get_object(**kwargs)
        if self.size is None:
            self.size = int(resp["ContentRange"].rsplit("/", 1)[1]) if self.offset else int(resp["ContentLength"])
            self.etag = resp.get("ETag")
        self._body = resp["Body"]

    def _error(self, message: str, cause: BaseException) -> Exception:
        """The exception raised once the retries are spent (the shard reader raises its own type)."""
        if _error_code(cause) == "PreconditionFailed":
            return StorageError(f"{self.url} changed while it was being read (ETag {self.etag}); read it again")
        return storage_error(message, cause)

    def _with_retries(self, fn: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified by retryable()
                self._wait_to_resume(attempt, e)
                attempt += 1

    def _wait_to_resume(self, attempt: int, e: Exception) -> None:
        """Raise if ``e`` is permanent or the retries are spent; else drop the connection and back off."""
        if attempt >= self.retry.retries or not retryable(e):
            raise self._error(f"reading {self.url} failed at byte {self.offset} after {attempt} retries", e) from e
        delay = self.retry.delay(attempt)
        log.warning("reading %s: %s at byte %d; resuming with a Range request in %.2fs (retry %d/%d)",
                    self.url, _error_code(e) or type(e).__name__, self.offset, delay, attempt + 1, self.retry.retries)
        self._close_body()
        self.resumes += 1
        time.sleep(delay)

    def _close_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close; it is dropped anyway
                self._body.close()
        self._body = None

    def readinto(self, buf) -> int:
        """Fill ``buf`` from the body PIECE bytes at a time; a failure after some bytes returns those."""
        view = memoryview(buf).cast("B")
        if not len(view) or (self.size is not None and self.offset >= self.size):
            return 0
        got = attempt = 0
        while got < len(view):
            try:
                if self._body is None:
                    self._open()
                if self.offset >= self.size:
                    break
                data = self._body.read(min(PIECE, len(view) - got))
                if not data:
                    raise ConnectionError(f"body ended at byte {self.offset} of {self.size}")
            except Exception as e:  # noqa: BLE001 - classified by retryable()
                self._wait_to_resume(0 if got else attempt, e)
                if got:  # keep what arrived: the next read resumes at self.offset
                    break
                attempt += 1
                continue
            view[got:got + len(data)] = data
            got += len(data)
            self.offset += len(data)
            attempt = 0
        return got

    def close(self) -> None:
        self._close_body()
        super().close()


def _copy(src: IO[bytes], dst: IO[bytes]) -> None:
    while chunk := src.read(CHUNK):
        dst.write(chunk)


def read_bytes(url: str | os.PathLike, *, endpoint_url: str | None = None, retry: RetryPolicy | None = None) -> bytes:
    """The whole object / file (S3: one GET, resumed at the byte reached if the connection drops)."""
    if is_s3_url(url):
        with S3Reader(str(url), endpoint_url=endpoint_url, retry=retry).open() as src:
            out = io.BytesIO()
            _copy(src, out)
            return out.getvalue()
    return Path(url).read_bytes()


def open_read(url: str | os.PathLike, *, endpoint_url: str | None = None,
              retry: RetryPolicy | None = None) -> IO[bytes]:
    """A buffered, streaming binary file object (S3: an S3Reader)."""
    if is_s3_url(url):
        return io.BufferedReader(S3Reader(str(url), endpoint_url=endpoint_url, retry=retry), buffer_size=CHUNK)
    return open(url, "rb")


def get_file(url: str | os.PathLike, local: str | os.PathLike, *, endpoint_url: str | None = None,
             retry: RetryPolicy | None = None) -> Path:
    """Copy ``url`` to the local path ``local`` (atomically; the caller chose ``local``)."""
    local = Path(local)
    if is_s3_url(url):
        with atomic_write(local) as tmp, S3Reader(str(url), endpoint_url=endpoint_url, retry=retry) as src, \
                open(tmp, "wb") as out:
            _copy(src, out)
    else:
        with atomic_write(local) as tmp:
            shutil.copyfile(url, tmp)
    return local


def get_tree(prefix: str, dest: str | os.PathLike, *, endpoint_url: str | None = None,
             retry: RetryPolicy | None = None) -> list[Path]:
    """Download every object under the S3 "folder" ``prefix`` into ``dest``; returns the files.

    Every key is checked (local_path_for) before anything is written, so a prefix holding
    one key with ``..`` or an absolute part fails without leaving files behind it.
    """
    base = prefix.rstrip("/") + "/"
    bucket, _ = split_s3_url(base)
    plan = []
    for url, size in list_files(base, endpoint_url=endpoint_url, retry=retry):
        if url.endswith("/") and size == 0:  # a "folder" marker some tools create: nothing to write
            continue
        key = split_s3_url(url)[1]
        plan.append((url, local_path_for(dest, url[len(base):], what=f"key {key!r} of bucket {bucket!r}")))
    for url, path in plan:
        get_file(url, path, endpoint_url=endpoint_url, retry=retry)
    return [path for _, path in plan]


def exists(url: str | os.PathLike, *, endpoint_url: str | None = None, retry: RetryPolicy | None = None) -> bool:
    if is_s3_url(url):
        try:
            size_of(url, endpoint_url=endpoint_url, retry=retry)
            return True
        except StorageNotFound:
            return False
    return os.path.exists(url)


def size_of(url: str | os.PathLike, *, endpoint_url: str | None = None, retry: RetryPolicy | None = None) -> int:
    """Bytes in the object / file; StorageNotFound (a FileNotFoundError) when there is none on S3."""
    if is_s3_url(url):
        bucket, key = split_s3_url(str(url))
        head = with_retries(lambda: s3_client(endpoint_url).head_object(Bucket=bucket, Key=key),
                            what=f"HEAD {url}", retry=retry)
        return int(head["ContentLength"])
    return os.path.getsize(url)


# ---------------------------------------------------------------- listing


def list_files(
    prefix: str | os.PathLike, *, endpoint_url: str | None = None, page_size: int = 1000,
    retry: RetryPolicy | None = None,
) -> Iterator[tuple[str, int]]:
    """Yield ``(url_or_path, size)`` under a prefix in lexicographic order, streaming.

    S3: ``list_objects_v2`` page by page (1000 keys per request, each page retried), so a
    billion-object prefix is never held in memory. Local: a sorted recursive walk (one
    directory's entries in memory at a time).
    """
    if is_s3_url(prefix):
        bucket, key = split_s3_url(str(prefix))
        client = s3_client(endpoint_url)
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key, "MaxKeys": page_size}
        while True:
            page = with_retries(lambda: client.list_objects_v2(**kwargs), what=f"listing {prefix}", retry=retry)
            for obj in page.get("Contents", []):
                yield f"s3://{bucket}/{obj['Key']}", int(obj["Size"])
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]
    root = os.fspath(prefix)
    if os.path.isfile(root):
        yield root, os.path.getsize(root)
        return
    yield from _walk_sorted(root)


def _walk_sorted(root: str) -> Iterator[tuple[str, int]]:
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_sorted(entry.path)
        elif entry.is_file():
            yield entry.path, entry.stat().st_size


# ---------------------------------------------------------------- write


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """Out of space (or quota) while writing ``filename``; ``str()`` is one line naming it and the fix."""

    def __str__(self) -> str:
        return self.strerror


def disk_full(path: str | os.PathLike, hint: str = "free space or choose another --out") -> DiskFullError:
    return DiskFullError(errno.ENOSPC, f"disk full while writing {os.fspath(path)}: {hint}", os.fspath(path))


def is_disk_full(e: BaseException | None) -> bool:
    """Whether ``e``, or an error it was raised from or while handling, is out of space or quota.

    The chain matters: torch.save, writing to a Python file, turns the file's ENOSPC into a
    RuntimeError raised while handling it.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def reporting_disk_full(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an out-of-space error from the block as ``DiskFullError`` naming ``path``."""
    try:
        yield
    except BaseException as e:
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise disk_full(path) from e
        raise


def _create_beside(path: Path) -> Path:
    """A new empty hidden ``.NAME.RANDOM.tmp`` beside ``path``, created the way ``open()`` creates
    files: mode 0666 minus the umask (``tempfile.mkstemp`` would make it 0600, unreadable to a team)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temp name beside {path}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it over ``path``.

    Readers see either the old file or the complete new one, never a partial write. The temp
    file sits in the destination's folder (so the rename never crosses filesystems) and gets
    the permissions ``open()`` would give (0644 under umask 022). On an exception it is
    removed and ``path`` is untouched; running out of space raises ``DiskFullError`` naming
    ``path``.
    """
    path = Path(path)
    with reporting_disk_full(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_beside(path)
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_bytes(url: str | os.PathLike, data: bytes, *, endpoint_url: str | None = None,
                retry: RetryPolicy | None = None) -> None:
    """Write a whole object: atomic rename locally, one PUT (retried whole) on S3."""
    if is_s3_url(url):
        bucket, key = split_s3_url(str(url))
        client = s3_client(endpoint_url)
        with_retries(lambda: client.put_object(Bucket=bucket, Key=key, Body=data), what=f"PUT {url}", retry=retry)
        return
    with atomic_write(url) as tmp:
        tmp.write_bytes(data)


def put_file(
    local: str | os.PathLike, url: str | os.PathLike, *, endpoint_url: str | None = None, move: bool = False,
    retry: RetryPolicy | None = None,
) -> None:
    """Publish a finished local file at ``url``: rename/copy locally, (multipart) upload on S3.

    The object appears only once complete (S3 makes a multipart object visible at
    CompleteMultipartUpload; locally the final step is a rename). ``move`` deletes the
    local file afterwards (S3) or renames instead of copying (local).
    """
    local = Path(local)
    if is_s3_url(url):
        size = local.stat().st_size
        if size > MULTIPART_THRESHOLD:
            multipart_upload(local, str(url), endpoint_url=endpoint_url, retry=retry)
        else:
            write_bytes(url, local.read_bytes(), endpoint_url=endpoint_url, retry=retry)
        if move:
            local.unlink()
        return
    dest = Path(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if move:
        try:
            os.replace(local, dest)
            return
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
    # a copy (or a move across filesystems): staged beside the destination, then renamed
    with atomic_write(dest) as tmp:
        shutil.copyfile(local, tmp)
    if move:
        local.unlink()


def _multipart_etag(parts: list[dict]) -> str:
    """The ETag S3 gives a completed multipart object: md5 of the parts' md5s, then ``-N``."""
    digest = hashlib.md5(b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in parts), usedforsecurity=False)
    return f"{digest.hexdigest()}-{len(parts)}"


def multipart_upload(
    local: str | os.PathLike,
    url: str,
    *,
    part_size: int = PART_SIZE,
    endpoint_url: str | None = None,
    retry: RetryPolicy | None = None,
) -> None:
    """Upload ``local`` to ``url`` part by part, retrying each part whole; abort on failure.

    Nothing is visible at ``url`` until CompleteMultipartUpload succeeds; a failed upload
    is aborted so no orphaned parts are billed. A Complete whose answer was lost is retried;
    S3 then says NoSuchUpload, and the object's ETag tells whether that was this upload.
    """
    if part_size < MIN_PART_SIZE:
        raise ValueError(f"part_size {part_size} is below S3's {MIN_PART_SIZE} byte minimum")
    bucket, key = split_s3_url(url)
    client = s3_client(endpoint_url)
    upload_id = with_retries(lambda: client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"],
                             what=f"starting the upload of {url}", retry=retry)
    try:
        parts = []
        with open(local, "rb") as f:
            number = 1
            while (chunk := f.read(part_size)) or not parts:  # an empty file is one empty part
                resp = with_retries(
                    lambda: client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                               Body=chunk),
                    what=f"uploading part {number} of {url}", retry=retry)
                parts.append({"PartNumber": number, "ETag": resp["ETag"]})
                number += 1
                if not chunk:
                    break
        tries = 0

        def complete() -> None:
            nonlocal tries
            tries += 1
            try:
                client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                                 MultipartUpload={"Parts": parts})
            except Exception as e:
                if tries > 1 and _error_code(e) == "NoSuchUpload":
                    head = client.head_object(Bucket=bucket, Key=key)
                    if head["ETag"].strip('"') == _multipart_etag(parts):
                        return  # an earlier try completed it; only its answer was lost
                raise

        with_retries(complete, what=f"completing the upload of {url}", retry=retry)
    except BaseException:
        with contextlib.suppress(Exception):
            with_retries(lambda: client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id),
                         what=f"aborting the upload of {url}", retry=retry)
        raise


def remove(url: str | os.PathLike, *, endpoint_url: str | None = None, retry: RetryPolicy | None = None) -> None:
    """Delete a file or object; a missing one is not an error (idempotent)."""
    if is_s3_url(url):
        bucket, key = split_s3_url(str(url))
        with_retries(lambda: s3_client(endpoint_url).delete_object(Bucket=bucket, Key=key),
                     what=f"DELETE {url}", retry=retry)
        return
    Path(url).unlink(missing_ok=True)


def remove_tree(prefix: str | os.PathLike, *, endpoint_url: str | None = None, retry: RetryPolicy | None = None) -> int:
    """Delete every file / object under a folder or S3 "folder" prefix; returns how many.

    S3: DeleteObjects in batches of 1000 keys, each batch retried; a key S3 reports as not
    deleted fails the call (naming it) rather than being left behind silently.
    """
    if not is_s3_url(prefix):
        n = sum(1 for _ in _walk_sorted(os.fspath(prefix)))
        shutil.rmtree(prefix, ignore_errors=True)
        return n
    base = str(prefix).rstrip("/") + "/"
    bucket, _ = split_s3_url(base)
    client = s3_client(endpoint_url)
    keys = [split_s3_url(url)[1] for url, _ in list_files(base, endpoint_url=endpoint_url, retry=retry)]
    for i in range(0, len(keys), 1000):
        batch = {"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
        resp = with_retries(lambda: client.delete_objects(Bucket=bucket, Delete=batch),
                            what=f"deleting {len(batch['Objects'])} objects under {base}", retry=retry)
        if resp.get("Errors"):
            err = resp["Errors"][0]
            raise StorageError(f"deleting s3://{bucket}/{err.get('Key')} failed: {err.get('Code')}: "
                               f"{err.get('Message')} ({len(resp['Errors'])} objects under {base} not deleted)")
    return len(keys)

