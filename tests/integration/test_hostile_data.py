"""`seerlike train` on data it cannot use stops within seconds with one message and a small log.

Corrupt images are made from the real photos (cut, garbage, empty); the ingested dataset is a
real `ingest` of CIFAR images whose shards are then deleted. Each run is a subprocess whose
output is read as it comes: one that floods the log or runs past the deadline is killed, so a
regression fails the test quickly instead of filling the disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.data_fixtures import cifar_images, corrupt_jpegs

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LOG_CAP = 200_000
"""Bytes of output after which a run is killed as flooding its log (a line per sample did ~17 MB/s)."""
DEADLINE_S = 90.0
"""Seconds after which a run is killed as hanging (start-up on a busy 2-core machine takes ~15 s)."""


@dataclass
class Run:
    rc: int
    log: str
    log_bytes: int
    seconds: float


def _train(data: Path, run_dir: Path, *overrides: str, max_steps: int = 5) -> Run:
    cmd = [sys.executable, "-m", "seerlike", "train", "--recipe", "tiny_swav", "--data", str(data),
           "--run-dir", str(run_dir), "--max-steps", str(max_steps), "optim.warmup_steps=1", "data.batch_size=4",
           "loop.progress=false", "loop.tensorboard=false", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    kept, total = [], [0]

    def pump() -> None:
        for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
            total[0] += len(chunk)
            if total[0] <= LOG_CAP:
                kept.append(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    while proc.poll() is None:
        if total[0] > LOG_CAP or time.monotonic() - start > DEADLINE_S:
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait()
    reader.join(10)
    return Run(proc.returncode, b"".join(kept).decode(errors="replace"), total[0], time.monotonic() - start)


def _assert_stopped(run: Run, *needles: str) -> None:
    assert run.log_bytes <= 20_000, f"{run.log_bytes} bytes of log in {run.seconds:.0f} s:\n{run.log[-3000:]}"
    assert run.rc not in (0, -9), f"exit status {run.rc} after {run.seconds:.0f} s:\n{run.log[-3000:]}"
    assert run.seconds < 60, run.seconds
    for needle in needles:
        assert needle in run.log, run.log[-3000:]
    assert run.log.count("skipping sample") <= 2  # the first skip (in the worker; the main process logs none)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_folder_of_corrupt_images_stops_the_run(tmp_path, photos_dir, workers):
    corrupt_jpegs(photos_dir, tmp_path / "bad", 32)
    run = _train(tmp_path / "bad", tmp_path / "run", f"data.num_workers={workers}")
    _assert_stopped(run, "NoUsableData", f"data source {str(tmp_path / 'bad')!r}: none of the last 32 samples",
                    "a whole pass over its 32 samples; 32 skipped in all); first error: bad00")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def ingested(cifar_dir, tmp_path_factory) -> Path:
    from sharding.config import IngestConfig
    from sharding.ingest import ingest

    root = tmp_path_factory.mktemp("hostile")
    inputs = root / "images"
    inputs.mkdir()
    for p in cifar_images(cifar_dir, 48):
        shutil.copyfile(p, inputs / f"{p.parent.name}_{p.name}")
    summary = ingest(IngestConfig(inputs=(str(inputs),), out=str(root / "ds"), chunk_size=16, shard_max_samples=16,
                                  resize_short_side=32, progress=False))
    assert summary["written"] == 48 and summary["shards"] == 3
    return root / "ds"


@pytest.mark.parametrize("workers", [0, 1])
def test_an_ingested_dataset_whose_shards_are_gone_stops_the_run(tmp_path, ingested, workers):
    dataset = tmp_path / "ds"
    shutil.copytree(ingested, dataset)
    shutil.rmtree(dataset / "shards")
    run = _train(dataset, tmp_path / "run", f"data.num_workers={workers}")
    _assert_stopped(run, "NoUsableData", f"data source {str(dataset)!r}: none of the last 48 samples",
                    "3 of its shards could not be read; 48 skipped in all); first error:",
                    "shard unreadable (ShardReadError: cannot open shard", "restore the unreadable shards")


def test_a_few_corrupt_images_are_skipped_and_counted_not_logged_one_by_one(tmp_path, cifar_dir, photos_dir):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in cifar_images(cifar_dir, 40):
        shutil.copyfile(p, folder / f"{p.parent.name}_{p.name}")
    corrupt_jpegs(photos_dir, folder, 10)
    run = _train(folder, tmp_path / "run", "data.num_workers=0", max_steps=3)
    assert run.rc == 0, run.log[-3000:]
    final = tmp_path / "run" / "checkpoints" / "step_00000003"
    assert (final / "COMPLETE").is_file()
    corrupt = json.loads((final / "rank_00000.json").read_text())["data"]["corrupt"]
    assert corrupt >= 2  # several corrupt images were read and skipped ...
    assert run.log.count("skipping sample bad") == 1  # ... the first is logged, the rest are counted
    assert run.log.count("skipped ") <= 1 + run.seconds / 10
    assert run.log_bytes <= 5_000, run.log
