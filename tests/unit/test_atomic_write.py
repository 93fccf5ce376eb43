"""storage.atomic_write: temp beside the destination, umask permissions, cleanup, a full disk in one line."""

from __future__ import annotations

import errno
import os
import pickle
import stat

import pytest

from seerlike import storage
from seerlike.storage import DiskFullError, atomic_write


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_mode_follows_the_umask_like_open(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "sub" / "f.json") as tmp:
            assert tmp.parent == tmp_path / "sub" and tmp.name.startswith(".f.json.") and tmp.name.endswith(".tmp")
            tmp.write_text("{}")
        with open(tmp_path / "plain", "w") as f:  # what open() does under the same umask
            f.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "sub" / "f.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == mode
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["f.json"]


def test_failure_keeps_the_old_file_and_removes_the_temp(tmp_path):
    dest = tmp_path / "summary.json"
    dest.write_text("old")
    with pytest.raises(KeyError):
        with atomic_write(dest) as tmp:
            tmp.write_text("half")
            raise KeyError("boom")
    assert dest.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_full_disk_is_one_line_naming_the_destination(tmp_path):
    dest = tmp_path / "shards" / "000000-0000.tar"
    with pytest.raises(DiskFullError) as err:
        with atomic_write(dest) as tmp:
            tmp.write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    msg = f"disk full while writing {dest}: free space or choose another --out"
    assert str(err.value) == msg and err.value.filename == str(dest) and err.value.errno == errno.ENOSPC
    assert not list(dest.parent.iterdir())
    back = pickle.loads(pickle.dumps(err.value))  # crosses a process pool intact
    assert type(back) is DiskFullError and str(back) == msg


def test_a_full_disk_wrapped_by_a_library_is_recognised(tmp_path):
    # torch.save to a Python file raises RuntimeError while handling the file's ENOSPC
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0")
    except RuntimeError as e:
        wrapped = e
    assert storage.is_disk_full(wrapped) and storage.is_disk_full(OSError(errno.EDQUOT, "quota"))
    assert not storage.is_disk_full(RuntimeError("other")) and not storage.is_disk_full(OSError(errno.EIO, "io"))
    with pytest.raises(DiskFullError, match="^disk full while writing .*w.pth: "):
        with atomic_write(tmp_path / "w.pth"):
            raise wrapped


def test_put_file_moves_across_filesystems(tmp_path, monkeypatch):
    src, dest = tmp_path / "a" / "x.bin", tmp_path / "b" / "x.bin"
    src.parent.mkdir()
    src.write_bytes(b"payload")
    real = os.replace

    def replace(a, b):  # what rename(2) answers between two devices
        if str(a) == str(src):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    storage.put_file(src, dest, move=True)
    assert dest.read_bytes() == b"payload" and not src.exists() and [p.name for p in dest.parent.iterdir()] == ["x.bin"]
