"""Ingest, export and checkpoints on hostile filesystems: another device, a full disk, a merge
stopped at every step, and the permissions teammates need (docs/ingest.md, "Chunks, resume").

The disks are real: a small tmpfs mounted for the test (root only; skipped otherwise), so
rename-across-devices and ENOSPC come from the kernel, not from a mock.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch

from seerlike import storage
from seerlike.storage import DiskFullError
from sharding import ingest as ingest_mod
from sharding.config import IngestConfig
from sharding.ingest import ingest, ingest_chunk, merge, plan
from sharding.manifest import read_manifest
from sharding.stats import verify
from sharding.writer import iter_tar

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- fixtures


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size_kb, name)`` mounts a tmpfs of that size under tmp_path; unmounted after the test."""
    mounted: list[Path] = []

    def mount(size_kb: int, name: str = "disk") -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a small tmpfs needs root and mount(8); this test needs a real second filesystem")
        where = tmp_path / name
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"mount -t tmpfs is not permitted here ({r.stderr.strip()}); needs CAP_SYS_ADMIN")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def dup_listing(photos_dir: Path, root: Path) -> Path:
    """Nine inputs in three chunks of three (shuffle off, two samples per shard).

    Chunk 1 repeats chunk 0's first image beside another sample (that shard is rewritten);
    chunk 2's last input repeats chunk 0's third image alone in its shard (emptied, deleted).
    """
    a, b, c, d, e, f, g = (photos_dir / f"exifsamples_orientation_landscape_{i}.jpg" for i in range(1, 8))
    listing = root / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in (a, b, c, d, a, e, f, g, c)))
    return listing


def _cfg(listing: Path, out: Path, **kw) -> IngestConfig:
    base = dict(chunk_size=3, shard_max_samples=2, resize_short_side=64, shuffle=False, progress=False)
    return IngestConfig(inputs=(str(listing),), out=str(out), **{**base, **kw})


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


def _counts(summary: dict) -> dict:
    keep = ("seen", "written", "duplicate", "rejected", "rejected_by_reason", "duplicates_across_chunks", "shards",
            "bytes_written", "kept_original")
    return {k: summary[k] for k in keep}


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


def _accounted(summary: dict) -> bool:
    return summary["written"] + summary["duplicate"] + sum(summary["rejected_by_reason"].values()) == summary["seen"]


# ---------------------------------------------------------------- another filesystem


def test_ingest_onto_another_filesystem_than_tmp(photos_dir, tmp_path, small_disk, monkeypatch):
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(systmp))
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    disk = small_disk(20 * 1024)
    assert os.stat(disk).st_dev != os.stat(tempfile.gettempdir()).st_dev  # a rename between them fails
    listing = dup_listing(photos_dir, tmp_path)

    summary = ingest(_cfg(listing, disk / "ds"))
    here = ingest(_cfg(listing, tmp_path / "same_disk"))
    assert _counts(summary) == _counts(here) and _accounted(summary)
    assert summary["duplicate"] == 2 and summary["duplicates_across_chunks"] == 2 and summary["written"] == 7
    assert read_manifest(str(disk / "ds")).to_pylist() == read_manifest(str(tmp_path / "same_disk")).to_pylist()
    assert _shards(disk / "ds") == _shards(tmp_path / "same_disk")
    assert "000002-0001.tar" not in _shards(disk / "ds")  # emptied by the cross-chunk duplicate
    assert verify(str(disk / "ds")) == []
    assert not _temps(disk) and not list(systmp.iterdir())


# ---------------------------------------------------------------- a merge stopped at any step


class Stop(BaseException):
    """An abrupt stop (not an Exception, so no handler swallows it)."""


def _merge_steps(monkeypatch, stop_at: tuple[int, str] | None) -> list[str]:
    """Trap the merge's steps: the dedup, every rename into place, every deletion of a shard.

    With ``stop_at=(n, "before"|"after")`` the n-th step raises Stop before or after doing
    its work; returns the steps seen.
    """
    seen: list[str] = []

    def trap(name: str, fn, target=lambda args: ""):
        def wrapped(*args, **kwargs):
            seen.append(f"{name} {target(args)}".strip())
            n = len(seen) - 1
            if stop_at == (n, "before"):
                raise Stop(seen[-1])
            out = fn(*args, **kwargs)
            if stop_at == (n, "after"):
                raise Stop(seen[-1])
            return out
        return wrapped

    monkeypatch.setattr(ingest_mod.dedup, "cross_chunk_duplicates",
                        trap("dedup", ingest_mod.dedup.cross_chunk_duplicates))
    monkeypatch.setattr(os, "replace", trap("rename", os.replace, lambda args: Path(args[1]).name))
    monkeypatch.setattr(storage, "remove", trap("remove", storage.remove, lambda args: Path(str(args[0])).name))
    return seen


def test_merge_stopped_at_every_step_reruns_to_the_same_result(photos_dir, tmp_path, monkeypatch):
    listing = dup_listing(photos_dir, tmp_path)
    chunks_done = tmp_path / "chunks_done"
    for k in plan(_cfg(listing, chunks_done)):
        ingest_chunk(_cfg(listing, chunks_done), k)

    ref = tmp_path / "ref"
    shutil.copytree(chunks_done, ref)
    with monkeypatch.context() as m:
        steps = _merge_steps(m, None)
        want = merge(_cfg(listing, ref))
    assert steps == ["dedup", "rename 000000.parquet", "rename dedup.json",  # dups of chunks 0-63, digest
                     "rename 000000.json",  # chunk 0's merge marker
                     "rename 000001-0000.tar", "rename 000001.parquet", "rename 000001.json",
                     "remove 000002-0001.tar", "rename 000002.parquet", "rename 000002.json",
                     "rename manifest.parquet", "rename shards.parquet",
                     "rename summary.json"], steps
    want_rows, want_shards = read_manifest(str(ref)).to_pylist(), _shards(ref)

    for n in range(len(steps)):
        for when in ("before", "after"):
            out = tmp_path / f"stopped_{n}_{when}"
            shutil.copytree(chunks_done, out)
            with monkeypatch.context() as m:
                _merge_steps(m, (n, when))
                with pytest.raises(Stop):
                    merge(_cfg(listing, out))
            got = merge(_cfg(listing, out))  # the rerun
            assert _counts(got) == _counts(want) and _accounted(got), (n, when)
            assert read_manifest(str(out)).to_pylist() == want_rows, (n, when)
            assert _shards(out) == want_shards, (n, when)
            assert not _temps(out), (n, when)


def test_merge_killed_with_a_temp_manifest_on_disk_reruns(photos_dir, tmp_path):
    """kill -9 (no cleanup runs) just before the manifest is renamed into place."""
    listing = dup_listing(photos_dir, tmp_path)
    out, ref = tmp_path / "killed", tmp_path / "ref"
    cfg = _cfg(listing, out)
    for k in plan(cfg):
        ingest_chunk(cfg, k)
    shutil.copytree(out, ref)
    code = (
        "import os, signal, sys; from pathlib import Path\n"
        "from tests.integration.test_hostile_ingest import _cfg; from sharding.ingest import merge\n"
        "real = os.replace\n"
        "def replace(src, dst):\n"
        "    if Path(dst).name == 'manifest.parquet': os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(src, dst)\n"
        "os.replace = replace\n"
        "merge(_cfg(Path(sys.argv[1]), Path(sys.argv[2])))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(listing), str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p.name for p in _temps(out)] and not (out / "manifest.parquet").exists()
    assert not (out / "shards" / "000002-0001.tar").exists()  # the emptied shard was already deleted

    got, want = merge(cfg), merge(_cfg(listing, ref))
    assert _counts(got) == _counts(want) and _accounted(got)
    assert read_manifest(str(out)).to_pylist() == read_manifest(str(ref)).to_pylist()
    assert _shards(out) == _shards(ref) and not _temps(out)


# ---------------------------------------------------------------- a full disk


def _complete_tar(path: Path) -> bool:
    data = path.read_bytes()
    if len(data) % tarfile.RECORDSIZE or data[-1024:] != bytes(1024):
        return False
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in iter_tar(f)) > 0
    except tarfile.TarError:
        return False


def _one_error_line(stderr: str, prefix: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "disk full" in line]
    assert len(lines) == 1 and lines[0].startswith(prefix), stderr
    return lines[0]


def test_ingest_into_a_full_disk_says_so_and_resumes_once_there_is_space(photos_dir, tmp_path, small_disk):
    disk = small_disk(1024)  # about a third of the corpus at 192 px
    ds = disk / "ds"
    argv = [sys.executable, "-m", "seerlike", "ingest", str(photos_dir), "--out", str(ds), "--workers", "2",
            "--no-progress", "--json", "chunk_size=20", "shard_max_samples=5", "resize_short_side=192"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    line = _one_error_line(proc.stderr, f"seerlike ingest: disk full while writing {ds}/")
    assert line.endswith(": free space or choose another --out")
    assert not _temps(disk), _temps(disk)  # the failed shard and the pool's other, stopped chunk
    assert not (ds / "manifest.parquet").exists() and not (ds / "summary.json").exists()
    published = sorted((ds / "shards").glob("*.tar"))
    assert published and all(_complete_tar(p) for p in published)

    # nothing is lost: with space, the rerun finishes the same corpus
    subprocess.run(["mount", "-o", "remount,size=20m", "tmpfs", str(disk)], check=True)
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["seen"] == 91 and _accounted(summary)
    assert verify(str(ds)) == [] and not _temps(disk)


def test_export_into_a_full_disk_leaves_no_file(tmp_path, small_disk, capsys):
    from seerlike.cli import main
    from seerlike.exporter import FILES, export

    disk = small_disk(1024)
    assert main(["export", "--checkpoint", "random:resnet10_cifar", "--format", "all", "--out", str(disk / "cli"),
                 "--image-size", "32"]) == 1
    _one_error_line(capsys.readouterr().err, f"seerlike export: disk full while writing {disk / 'cli' / FILES['torchvision']}: ")
    for fmt, name in FILES.items():
        with pytest.raises(DiskFullError, match=f"^disk full while writing {disk / fmt / name}: free space"):
            export("random:resnet10_cifar", disk / fmt, [fmt], image_size=32)
    assert not [p for p in disk.rglob("*") if p.is_file()]  # no partial weights, no export.json


def _tiny_checkpoint(root: Path, run_dir: Path, width: int) -> None:
    from seerlike.engine.checkpoint import CheckpointConfig, Checkpointer
    from seerlike.engine.dist import init_distributed, teardown

    init_distributed()
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.BatchNorm1d(width))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ckpt = Checkpointer(CheckpointConfig(dir=str(root)), run_dir)
        ckpt.save(1, model, opt, method=model, scaler=None, data_state={"epoch": 0}, train_config=CheckpointConfig())
    finally:
        teardown()


def test_checkpoint_into_a_full_disk_leaves_no_checkpoint(tmp_path, small_disk):
    from seerlike.engine.checkpoint import list_complete

    disk = small_disk(1024)
    with pytest.raises(DiskFullError) as err:
        _tiny_checkpoint(disk / "ckpt", tmp_path / "run", width=700)  # ~2 MB of weights
    assert str(err.value) == (f"disk full while writing {disk / 'ckpt' / 'step_00000001'}: "
                              "free space or choose another checkpoint.dir")
    assert list_complete(disk / "ckpt") == [] and not [p for p in disk.rglob("*") if p.is_file()]


# ---------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)], ids=["umask022", "umask077"])
def test_every_written_file_honours_the_umask(photos_dir, tmp_path, umask, mode):
    from seerlike.exporter import export

    listing = dup_listing(photos_dir, tmp_path)
    old = os.umask(umask)
    try:
        ingest(_cfg(listing, tmp_path / "ds"))
        export("random:resnet10_cifar", tmp_path / "export", ["torchvision", "safetensors", "torchscript", "onnx"],
               image_size=32)
        _tiny_checkpoint(tmp_path / "ckpt", tmp_path / "run", width=8)
    finally:
        os.umask(old)
    for folder, least in (("ds", 18), ("export", 6), ("ckpt", 7)):
        files = [p for p in (tmp_path / folder).rglob("*") if p.is_file()]
        assert len(files) >= least, files
        wrong = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
                 if stat.S_IMODE(p.stat().st_mode) != mode}
        assert not wrong, f"not {oct(mode)} under umask {oct(umask)}: {wrong}"
