"""A 2-rank CPU run killed with SIGKILL and restarted ends bitwise identical to an uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seerlike.engine import checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.dist]

STEPS = 16
VIEWS = "data.augment.views=[{count: 2, size: 16, scale: [0.14, 1.0], jitter: [0.4, 0.4, 0.4, 0.1], grayscale_p: 0.2}]"
# per recipe, after VIEWS: DINO with a small head, 2 local crops, a temperature warm-up and a last
# layer that unfreezes mid-run, so every piece of its state crosses the kill
DINO_SMALL = [
    "data.augment.views=[{count: 2, size: 16, scale: [0.14, 1.0], grayscale_p: 0.2}, {count: 2, size: 8, scale: [0.05, 0.3]}]",
    "method.out_dim=256", "method.hidden_dim=128", "method.bottleneck_dim=32", "method.freeze_last_layer_steps=4",
    "method.warmup_teacher_temp_steps=10", "method.teacher_temp=0.06"]

CLUSTERING_SMALL = ("method.num_prototypes=[10, 10]", "method.head_dims=[64, 16]")


def _subset_csv(cifar_dir: Path, out: Path, n: int = 96) -> Path:
    """n real CIFAR images: 96 / (8 x 2 ranks) = 6 steps per epoch, so the run crosses epochs."""
    with open(cifar_dir / "train.csv") as f:
        rows = list(csv.DictReader(f))[::37][:n]
    with open(out, "w") as f:
        f.write("path,label\n")
        for r in rows:
            f.write(f"{(cifar_dir / r['path']).resolve()},{r['label']}\n")
    return out


def _command(recipe: str, data: Path, run_dir: Path, strategy: str, workers: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "seerlike", "train", "--recipe", recipe, "--data", str(data),
            "--run-dir", str(run_dir), "--nproc", "2", "--max-steps", str(STEPS),
            "checkpoint.every_steps=3", "checkpoint.keep_last=2", "loop.log_every=1", "loop.progress=false",
            "loop.tensorboard=false", "data.batch_size=8", f"data.num_workers={workers}", "optim.warmup_steps=2", f"parallel.strategy={strategy}", VIEWS,
            *extra]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    final = checkpoint.latest(run_dir)
    assert final is not None and checkpoint.step_of(final) == STEPS
    return {**{f"model.{k}": v for k, v in checkpoint.load_tensors(final, "model.").items()},
            **{f"optim.{k}": v for k, v in checkpoint.load_tensors(final, "optim.").items()}}


# the tiny recipes' own set-up (DDP, data read in the rank) for the methods, and FSDP2 (sharded
# DCP state) with a DataLoader worker once; MoCo v2 with a queue of 64 keys (16 a step: it wraps
# around, and the shuffled-BN permutations continue from the checkpointed key-batch counter);
# DINO with local crops, a temperature warm-up and a last layer that unfreezes mid-run;
# DeepCluster-v2 and SeLa killed after the first clustering / labelling (a pass is 6 steps), their
# per-rank memories restored from the ranks' own checkpoint files
@pytest.mark.parametrize("recipe,kill_after,strategy,workers,extra", [
    ("tiny_swav", 7, "ddp", 0, ()), ("tiny_byol", 5, "ddp", 0, ()), ("tiny_swav", 7, "fsdp", 1, ()),
    ("tiny_moco_v2", 5, "ddp", 0, ("method.queue_length=64",)), ("tiny_dino", 6, "ddp", 0, tuple(DINO_SMALL)),
    ("tiny_deepcluster_v2", 7, "ddp", 0, CLUSTERING_SMALL), ("tiny_sela", 7, "ddp", 0, CLUSTERING_SMALL)])
def test_sigkill_and_resume_is_bitwise_identical(tmp_path, cifar_dir, recipe, kill_after, strategy, workers, extra):
    data = _subset_csv(cifar_dir, tmp_path / "sub.csv")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"

    # the uninterrupted reference runs beside the one that gets killed (start-up dominates on CPU)
    ref = subprocess.Popen(_command(recipe, data, ref_dir, strategy, workers, extra), env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(_command(recipe, data, run_dir, strategy, workers, extra), env=_env(),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _last_logged_step(run_dir) < kill_after:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # launcher and both ranks, mid-step
    proc.wait()
    killed_at = _last_logged_step(run_dir)
    resumed_from = checkpoint.step_of(checkpoint.latest(run_dir))
    assert 0 < resumed_from <= killed_at < STEPS

    again = subprocess.run(_command(recipe, data, run_dir, strategy, workers, extra), env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    _, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err[-3000:]
    assert f"resumed from {checkpoint.step_dir(run_dir / 'checkpoints', resumed_from)}" in again.stderr

    a, b = _final_state(ref_dir), _final_state(run_dir)
    assert a.keys() == b.keys()
    assert any(k.startswith("optim.state.") for k in a)  # momentum buffers are compared too
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:5]}"
    # the logged losses after the resume match the uninterrupted run's exactly
    la = {r["step"]: r["loss"] for r in map(json.loads, (ref_dir / "metrics.jsonl").read_text().splitlines())}
    lb = {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert sorted(lb) == list(range(1, STEPS + 1))
    assert lb == la
    # keep-last-2: only the two newest complete checkpoints remain
    assert [checkpoint.step_of(p) for p in checkpoint.list_complete(run_dir)] == [STEPS - 1, STEPS]
