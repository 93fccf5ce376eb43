"""`seerlike train --nproc 1` on CUDA: the tiny recipes learn, stop on SIGUSR1 with a checkpoint, and resume.

Each run is the real command in its own process (world-1 NCCL, FSDP2, bf16 or fp16, the
data pipeline with its photometric ops on the GPU) on the real CIFAR-dev images. CUDA
kernels are not bitwise reproducible run to run, so a resumed run is compared with an
uninterrupted one at the first step after the resume, relative to how far the loss moved.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seerlike.engine import checkpoint

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
STEPS = 60


def _command(recipe: str, data: Path, run_dir: Path, steps: int = STEPS, *extra: str) -> list[str]:
    return [sys.executable, "-m", "seerlike", "train", "--recipe", recipe, "--data", str(data), "--run-dir",
            str(run_dir), "--nproc", "1", "--max-steps", str(steps), "loop.log_every=1", "loop.progress=false",
            "loop.tensorboard=false", "checkpoint.every_steps=20", "data.batch_size=128", "data.num_workers=4",
            "optim.warmup_steps=5", *extra]


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _last_step(run_dir: Path) -> int:
    """The last logged step (0 before the first; a line being written is ignored)."""
    try:
        return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    except (OSError, IndexError, ValueError):
        return 0


def _stop_then_resume(cmd: list[str], run_dir: Path, after: int) -> tuple[int, str]:
    """Start ``cmd``, send SIGUSR1 once step ``after`` is logged, check the stop; resume to the end."""
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while _last_step(run_dir) < after:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]  # REQUEUE_EXIT_CODE
    stopped = checkpoint.step_of(checkpoint.latest(run_dir))
    assert after <= stopped < STEPS, f"stopped at {stopped}"
    again = _run(cmd)
    assert f"resumed from {checkpoint.step_dir(run_dir / 'checkpoints', stopped)}" in again.stderr
    return stopped, again.stderr


def test_swav_learns_on_cuda_and_resumes_after_sigusr1(tmp_path, cifar_dir):
    run_dir = tmp_path / "swav"
    cmd = _command("tiny_swav", cifar_dir / "train", run_dir, STEPS, "method.freeze_prototypes_steps=5")
    _stop_then_resume(cmd, run_dir, after=20)
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    loss = [r["loss"] for r in rows]
    assert all(math.isfinite(v) for v in loss)
    first, last = sum(loss[:5]) / 5, sum(loss[-10:]) / 10
    assert last < first - 0.05 and last < math.log(100), (first, last)  # below uniform assignment (ln K)
    assert rows[-1]["images_per_s"] > 0 and rows[-1]["peak_mem_mb"] > 0
    state = checkpoint.load_model_state(checkpoint.latest(run_dir))
    assert checkpoint.step_of(checkpoint.latest(run_dir)) == STEPS
    assert any(k.startswith("backbone.") for k in state) and "prototypes.weight" in state


def test_byol_resume_on_cuda_continues_the_uninterrupted_run(tmp_path, cifar_dir):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "stopped"
    ref = subprocess.Popen(_command("tiny_byol", cifar_dir / "train", ref_dir), env=_env(), cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stopped, _ = _stop_then_resume(_command("tiny_byol", cifar_dir / "train", run_dir), run_dir, after=15)
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    la = {r["step"]: r["loss"] for r in _rows(ref_dir)}
    lb = {r["step"]: r["loss"] for r in _rows(run_dir)}
    assert sorted(lb) == sorted(la) == list(range(1, STEPS + 1))
    moved = abs(la[stopped + 1] - la[1])
    assert moved > 0.3, la  # BYOL's loss moves far in the first steps: a fresh model would stand out
    assert abs(lb[stopped + 1] - la[stopped + 1]) < 0.1 * moved, (stopped, lb[stopped + 1], la[stopped + 1])
    assert all(math.isfinite(v) for v in lb.values())


def test_fp16_run_on_cuda_scales_the_loss(tmp_path, cifar_dir):
    run_dir = tmp_path / "fp16"
    _run(_command("tiny_swav", cifar_dir / "train", run_dir, 20, "precision.dtype=fp16"))
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert all(math.isfinite(r["loss"]) and r["loss_scale"] > 0 for r in rows)
    assert rows[-1]["skipped_steps"] == 0
