"""Local paths and S3 URLs behind one small set of functions.

Every function here takes either a local path or an ``s3://bucket/key`` URL, so callers
(ingest, data loading, checkpoints, launchers) never branch on where data lives:

- ``read_bytes(url)``, ``write_bytes(url, data)`` (atomic: temp + rename locally, a single
  PUT on S3), ``put_file(local, url)`` (rename/copy locally, multipart upload on S3),
  ``get_file(url, local)``, ``open_read(url)`` (a streaming binary file object),
  ``exists``, ``remove``, ``list_files(prefix)`` (paginated on S3, recursive locally),
  ``join(base, *parts)``.
- S3 plumbing: ``s3_client(endpoint_url=None)`` (standard boto3 credential chain; the
  endpoint comes from the argument, else ``AWS_ENDPOINT_URL``, else AWS), ``split_s3_url``,
  ``multipart_upload`` (per-part retries with backoff, aborted on failure so no partial
  object is ever visible).
- ``atomic_write(path)``: the one write-then-rename helper of the project (temp file beside
  the destination, umask permissions, fsync); ``DiskFullError`` for a full disk; and
  ``redact_url`` for logs and errors.

Credentials are never read here: boto3 finds them (env, profile, instance role). Nothing
in this module logs or formats a secret; endpoint URLs are redacted before they appear
in a message.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

T = TypeVar("T")

MULTIPART_THRESHOLD = 64 * 1024 * 1024
"""Files larger than this go up as a multipart upload (S3's single PUT limit is 5 GB)."""
PART_SIZE = 32 * 1024 * 1024
"""Multipart part size; S3 requires >= 5 MiB for every part but the last."""

# ---------------------------------------------------------------- URLs


def is_s3_url(url: str | os.PathLike) -> bool:
    return isinstance(url, str) and url.startswith("s3://")


def is_http_url(url: str | os.PathLike) -> bool:
    return isinstance(url, str) and url.startswith(("http://", "https://"))


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the key may be empty (bucket root)."""
    if not is_s3_url(url):
        raise ValueError(f"not an S3 URL: {url!r} (expected s3://bucket/key)")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"S3 URL without a bucket: {url!r} (expected s3://bucket/key)")
    return bucket, key


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path components onto a local path or an S3 URL."""
    if is_s3_url(base):
        out = str(base).rstrip("/")
        for p in parts:
            out = f"{out}/{p.strip('/')}"
        return out
    return os.path.join(os.fspath(base), *parts)


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


# ---------------------------------------------------------------- S3 client

_clients: dict[tuple[int, str], Any] = {}
_clients_lock = threading.Lock()


def endpoint_from_env(endpoint_url: str | None = None) -> str | None:
    """The explicit endpoint, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else None (AWS)."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client(endpoint_url: str | None = None, *, max_attempts: int = 8) -> Any:
    """A boto3 S3 client from the standard credential chain, cached per process and endpoint.

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
            cfg = Config(retries={"max_attempts": max_attempts, "mode": "standard"}, max_pool_connections=32)
            client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)
            _clients[key] = client
    return client


def with_retries(fn: Callable[[], T], *, what: str, attempts: int = 5, base_delay: float = 0.5) -> T:
    """Call ``fn`` until it succeeds, sleeping ``base_delay * 2**i`` (+ jitter) between tries."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - any transport error is retried, the last one raised
            if i == attempts - 1:
                raise
            delay = base_delay * 2**i * (1 + random.random() / 2)
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(e).__name__, e, i + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _is_missing(e: Exception) -> bool:
    code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
    return code in ("404", "NoSuchKey", "NotFound")


# ---------------------------------------------------------------- listing


def list_files(
    prefix: str | os.PathLike, *, endpoint_url: str | None = None, page_size: int = 1000
) -> Iterator[tuple[str, int]]:
    """Yield ``(url_or_path, size)`` under a prefix in lexicographic order, streaming.

    S3: ``list_objects_v2`` page by page (1000 keys per request), so a billion-object
    prefix is never held in memory. Local: a sorted recursive walk (one directory's
    entries in memory at a time).
    """
    if is_s3_url(prefix):
        bucket, key = split_s3_url(str(prefix))
        client = s3_client(endpoint_url)
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=key, PaginationConfig={"PageSize": page_size}
        )
        for page in pages:
            for obj in page.get("Contents", []):
                yield f"s3://{bucket}/{obj['Key']}", int(obj["Size"])
        return
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


# ---------------------------------------------------------------- read


def read_bytes(url: str | os.PathLike, *, endpoint_url: str | None = None) -> bytes:
    if is_s3_url(url):
        bucket, key = split_s3_url(str(url))
        client = s3_client(endpoint_url)
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(url).read_bytes()


def open_read(url: str | os.PathLike, *, endpoint_url: str | None = None) -> IO[bytes]:
    """A streaming binary file object (S3: the GET body, read as it arrives)."""
    if is_s3_url(url):
        bucket, key = split_s3_url(str(url))
        return s3_client(endpoint_url).get_object(Bucket=bucket, Key=key)["Body"]
    return open(url, "rb")


def exists(url: str | os.PathLike, *, endpoint_url: str | None = None) -> bool:
    if is_s3_url(url):
        bucket, key = split_s3_url(str(url))
        try:
            s3_client(endpoint_url).head_object(Bucket=bucket, Key=key)
            return True
        except Exception as e:  # noqa: BLE001
            if _is_missing(e):
                return False
            raise
    return os.path.exists(url)


def get_file(url: str | os.PathLike, local: str | os.PathLike, *, endpoint_url: str | None = None) -> Path:
    """Copy ``url`` to the local path ``local`` (atomically)."""
    local = Path(local)
    if is_s3_url(url):
        bucket, key = split_s3_url(str(url))
        with atomic_write(local) as tmp:
            s3_client(endpoint_url).download_file(bucket, key, str(tmp))
    else:
        with atomic_write(local) as tmp:
            shutil.copyfile(url, tmp)
    return local


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


def write_bytes(url: str | os.PathLike, data: bytes, *, endpoint_url: str | None = None) -> None:
    """Write a whole object: atomic rename locally, one PUT (retried) on S3."""
    if is_s3_url(url):
        bucket, key = split_s3_url(str(url))
        client = s3_client(endpoint_url)
        with_retries(lambda: client.put_object(Bucket=bucket, Key=key, Body=data), what=f"PUT {url}")
        return
    with atomic_write(url) as tmp:
        tmp.write_bytes(data)


def put_file(
    local: str | os.PathLike, url: str | os.PathLike, *, endpoint_url: str | None = None, move: bool = False
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
            multipart_upload(local, str(url), endpoint_url=endpoint_url)
        else:
            write_bytes(url, local.read_bytes(), endpoint_url=endpoint_url)
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


def multipart_upload(
    local: str | os.PathLike,
    url: str,
    *,
    part_size: int = PART_SIZE,
    endpoint_url: str | None = None,
    attempts: int = 5,
) -> None:
    """Upload ``local`` to ``url`` part by part, retrying each part; abort on failure.

    Nothing is visible at ``url`` until CompleteMultipartUpload succeeds; a failed upload
    is aborted so no orphaned parts are billed.
    """
    if part_size < 5 * 1024 * 1024:
        raise ValueError(f"part_size {part_size} is below S3's 5 MiB minimum")
    bucket, key = split_s3_url(url)
    client = s3_client(endpoint_url)
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    try:
        parts = []
        with open(local, "rb") as f:
            number = 1
            while chunk := f.read(part_size):
                resp = with_retries(
                    lambda: client.upload_part(
                        Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
                    ),
                    what=f"upload part {number} of {url}",
                    attempts=attempts,
                )
                parts.append({"PartNumber": number, "ETag": resp["ETag"]})
                number += 1
        if not parts:  # an empty file: S3 needs at least one part
            resp = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"")
            parts.append({"PartNumber": 1, "ETag": resp["ETag"]})
        with_retries(
            lambda: client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            ),
            what=f"complete upload of {url}",
            attempts=attempts,
        )
    except BaseException:
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise


def remove(url: str | os.PathLike, *, endpoint_url: str | None = None) -> None:
    """Delete a file or object; a missing one is not an error (idempotent)."""
    if is_s3_url(url):
        bucket, key = split_s3_url(str(url))
        s3_client(endpoint_url).delete_object(Bucket=bucket, Key=key)
        return
    Path(url).unlink(missing_ok=True)
