"""WebDataset tar shards, written deterministically and published atomically.

A chunk's samples go to ``shards/{chunk:06d}-{j:04d}.tar``: ``KEY.jpg`` then ``KEY.json``
per sample, plain USTAR headers with fixed mtime/uid/gid/mode, so the same inputs give
byte-identical shards on every run (resume and idempotent reruns rely on this). A shard
is built in a temp file beside it (``storage.atomic_write``) and only then renamed into
place (local), or built in a local spool folder and uploaded (S3: a single PUT or a
multipart upload, visible only once complete).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from seerlike import storage

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
_HEADER = tarfile.BLOCKSIZE


def shard_name(chunk: int, j: int) -> str:
    """The dataset-relative name of chunk ``chunk``'s ``j``-th shard."""
    return f"{SHARDS_DIR}/{chunk:06d}-{j:04d}.tar"


def tar_header(name: str, size: int) -> bytes:
    """A plain USTAR header (mode 644, uid/gid 0, mtime 0), byte-identical to tarfile's.

    Hand-built because tarfile's addfile costs ~50 us per member in Python, which is most
    of the per-image cost for small images.
    """
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"member name too long for a plain USTAR header: {name!r}")
    head = b"".join(
        (
            raw.ljust(100, b"\0"),
            b"0000644\0",  # mode
            b"0000000\0",  # uid
            b"0000000\0",  # gid
            b"%011o\0" % size,
            b"00000000000\0",  # mtime
            b"        ",  # checksum placeholder: eight spaces
            b"0",  # regular file
            b"\0" * 100,  # linkname
            b"ustar\x0000",
            b"\0" * 64,  # uname, gname
            b"\0" * 16,  # devmajor, devminor: empty for regular files
            b"\0" * 155,  # prefix
        )
    ).ljust(_HEADER, b"\0")
    checksum = b"%06o\0 " % (_CHECKSUM_BASE + sum(raw) + sum(head[124:136]))
    return head[:148] + checksum + head[156:]


# The byte sum of every header field that never changes (all but the name and size).
_CHECKSUM_BASE = sum(b"0000644\0" b"0000000\0" b"0000000\0" b"00000000000\0" b"        " b"0" b"ustar\x0000")


class TarSink:
    """A deterministic tar stream on a binary file; ``add`` returns the data offset of a member."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.size = 0

    def add(self, name: str, data: bytes) -> int:
        pad = -len(data) % _HEADER
        self._f.write(tar_header(name, len(data)))
        self._f.write(data)
        if pad:
            self._f.write(b"\0" * pad)
        offset = self.size + _HEADER
        self.size = offset + len(data) + pad
        return offset

    def close(self) -> None:
        """End-of-archive blocks, padded to tar's 10240-byte record, as tarfile writes them."""
        end = self.size + 2 * _HEADER
        end += -end % tarfile.RECORDSIZE
        self._f.write(b"\0" * (end - self.size))
        self.size = end


def sample_json(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


@contextlib.contextmanager
def staged(url: str, spool_dir: str | os.PathLike, *, endpoint_url: str | None = None) -> Iterator[Path]:
    """A local path to build ``url`` in; ``url`` appears, complete, only if the block succeeds.

    A local ``url`` is built beside itself (``storage.atomic_write``: same filesystem, so the
    final rename is atomic, with the umask's permissions); an S3 object in ``spool_dir``, then
    uploaded (one PUT or a multipart upload, visible only once complete).
    """
    if not storage.is_s3_url(url):
        with storage.atomic_write(url) as tmp:
            yield tmp
        return
    local = Path(spool_dir) / url.rsplit("/", 1)[-1]
    with storage.atomic_write(local) as tmp:
        yield tmp
    try:
        storage.put_file(local, url, endpoint_url=endpoint_url, move=True)
    finally:
        local.unlink(missing_ok=True)


class ShardWriter:
    """Writes one chunk's samples into consecutive shards, closing at max samples or bytes.

    ``add`` returns ``(shard_name, jpeg_offset)``: ``offset`` is where the JPEG bytes start
    inside the tar (its header is the 512 bytes before), so one range read fetches an image.
    Each shard is built with ``staged``: beside its destination locally, in ``spool_dir``
    for S3 outputs.
    """

    def __init__(
        self,
        out: str,
        chunk: int,
        *,
        max_samples: int,
        max_bytes: int,
        spool_dir: str | os.PathLike,
        endpoint_url: str | None = None,
    ):
        self.out = out
        self.chunk = chunk
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.spool_dir = Path(spool_dir)
        self.endpoint_url = endpoint_url
        self.published: list[str] = []
        self._j = 0
        # the open shard: its staged() context (held across add() calls), file and tar stream
        self._stack: contextlib.ExitStack | None = None
        self._sink: TarSink | None = None
        self._count = 0

    def _open(self) -> None:
        url = storage.join(self.out, shard_name(self.chunk, self._j))
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(staged(url, self.spool_dir, endpoint_url=self.endpoint_url))
        self._sink = TarSink(self._stack.enter_context(open(tmp, "wb")))
        self._count = 0

    def add(self, key: str, jpeg: bytes, meta: dict) -> tuple[str, int]:
        if self._sink is None:
            self._open()
        offset = self._sink.add(f"{key}.jpg", jpeg)
        self._sink.add(f"{key}.json", sample_json(meta))
        self._count += 1
        name = shard_name(self.chunk, self._j)
        if self._count >= self.max_samples or self._sink.size >= self.max_bytes:
            self._publish()
        return name, offset

    def _publish(self) -> None:
        assert self._sink is not None and self._stack is not None
        self._sink.close()
        stack, self._stack, self._sink = self._stack, None, None
        stack.close()  # closes the file, then fsync + rename (or upload)
        name = shard_name(self.chunk, self._j)
        self.published.append(name)
        log.debug("published %s (%d samples)", name, self._count)
        self._j += 1

    def close(self) -> list[str]:
        """Publish the last, partial shard; returns every shard name written by this chunk."""
        if self._sink is not None:
            self._publish()
        return self.published

    def abort(self, error: BaseException | None = None) -> None:
        """Drop the shard being built: its temp file is removed even when closing it fails.

        ``error`` (what stopped the chunk) goes through the shard's ``staged`` context, so a
        full disk comes out as ``storage.DiskFullError`` naming the shard.
        """
        stack, self._stack, self._sink = self._stack, None, None
        if stack is not None:
            error = error or RuntimeError("shard writer aborted")
            stack.__exit__(type(error), error, error.__traceback__)


def iter_tar(f: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of a tar stream, in order (streaming; works on S3 bodies)."""
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if member.isfile():
                data = tar.extractfile(member)
                yield member.name, data.read() if data else b""


class _NothingKept(Exception):
    """Every sample of a rewritten shard was dropped: discard the rewrite, delete the shard."""


def rewrite_shard(url: str, drop_keys: set[str], spool_dir: str | os.PathLike, *, endpoint_url: str | None = None) -> dict[str, int]:
    """Rewrite a shard without the samples in ``drop_keys``; returns the new ``{key: jpeg offset}``.

    Deterministic (same kept members, same headers), so rewriting an already rewritten
    shard yields the same bytes: the merge can be rerun after a crash at any point. A
    shard left with no samples is deleted.
    """
    offsets: dict[str, int] = {}
    try:
        with staged(url, spool_dir, endpoint_url=endpoint_url) as tmp:
            with open(tmp, "wb") as out, storage.open_read(url, endpoint_url=endpoint_url) as src:
                sink = TarSink(out)
                for name, data in iter_tar(src):
                    key, _, ext = name.partition(".")
                    if key in drop_keys:
                        continue
                    offset = sink.add(name, data)
                    if ext == "jpg":
                        offsets[key] = offset
                sink.close()
            if not offsets:
                raise _NothingKept
    except _NothingKept:
        storage.remove(url, endpoint_url=endpoint_url)
    return offsets
