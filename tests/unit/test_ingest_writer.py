"""Tar shards: headers identical to tarfile's, rolling by samples/bytes, offsets, idempotent rewrite."""

from __future__ import annotations

import errno
import io
import tarfile

import pytest

from seerlike.storage import DiskFullError
from sharding.writer import ShardWriter, TarSink, iter_tar, rewrite_shard, tar_header


def _reference_tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_tar_bytes_identical_to_tarfile():
    members = [("000000_0000000.jpg", b"\xff\xd8" * 700), ("000000_0000000.json", b"{}"), ("e.jpg", b""), ("x" * 100, b"z" * 512)]
    buf = io.BytesIO()
    sink = TarSink(buf)
    offsets = [sink.add(n, d) for n, d in members]
    sink.close()
    assert buf.getvalue() == _reference_tar(members)
    for (_, data), off in zip(members, offsets):
        assert buf.getvalue()[off : off + len(data)] == data
    with pytest.raises(ValueError, match="too long"):
        tar_header("y" * 101, 1)


def test_shard_writer_rolls_and_rewrite_is_idempotent(tmp_path):
    out = tmp_path / "ds"
    w = ShardWriter(str(out), 7, max_samples=3, max_bytes=10**9, spool_dir=tmp_path / "spool")
    placed = [w.add(f"000007_{i:07d}", bytes([i]) * (100 + i), {"key": i}) for i in range(7)]
    assert w.close() == ["shards/000007-0000.tar", "shards/000007-0001.tar", "shards/000007-0002.tar"]
    assert [s for s, _ in placed] == ["shards/000007-0000.tar"] * 3 + ["shards/000007-0001.tar"] * 3 + ["shards/000007-0002.tar"]
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".tar")]  # temps renamed into place
    shard = out / "shards" / "000007-0001.tar"
    blob = shard.read_bytes()
    for i, (_, off) in list(enumerate(placed))[3:6]:
        assert blob[off : off + 100 + i] == bytes([i]) * (100 + i)

    offsets = rewrite_shard(str(shard), {"000007_0000004"}, tmp_path / "spool")
    once = shard.read_bytes()
    assert rewrite_shard(str(shard), {"000007_0000004"}, tmp_path / "spool") == offsets and shard.read_bytes() == once
    names = [n for n, _ in iter_tar(io.BytesIO(once))]
    assert names == ["000007_0000003.jpg", "000007_0000003.json", "000007_0000005.jpg", "000007_0000005.json"]
    assert once[offsets["000007_0000005"] : offsets["000007_0000005"] + 105] == bytes([5]) * 105
    rewrite_shard(str(shard), {"000007_0000003", "000007_0000005"}, tmp_path / "spool")
    assert not shard.exists()  # nothing left: the shard is removed


def test_shard_writer_rolls_by_bytes(tmp_path):
    w = ShardWriter(str(tmp_path), 0, max_samples=100, max_bytes=3000, spool_dir=tmp_path / "spool")
    for i in range(5):
        w.add(f"000000_{i:07d}", b"a" * 1000, {})
    assert len(w.close()) == 3  # each shard closes once it passes 3000 bytes (2 samples + headers)


class _FullDisk(io.RawIOBase):
    """A file on a disk with ``room`` bytes left: writes past it fail with ENOSPC, as do flushes."""

    def __init__(self, room: int):
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return len(b)


def test_shard_writer_on_a_full_disk_reports_the_shard_and_leaves_no_temp(tmp_path, monkeypatch):
    from sharding import writer

    monkeypatch.setattr(writer, "open", lambda path, mode: io.BufferedWriter(_FullDisk(room=4096)), raising=False)
    w = ShardWriter(str(tmp_path / "ds"), 3, max_samples=10, max_bytes=10**9, spool_dir=tmp_path / "spool")
    w.add("000003_0000000", b"a" * 1000, {})  # still buffered
    with pytest.raises(OSError) as err:
        w.add("000003_0000001", b"b" * 8000, {})
    # closing the shard flushes the buffer and fails again; the temp file must go all the same
    with pytest.raises(DiskFullError, match=f"^disk full while writing {tmp_path / 'ds' / 'shards' / '000003-0000.tar'}: "):
        w.abort(err.value)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
