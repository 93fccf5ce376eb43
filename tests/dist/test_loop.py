"""The loop on 2 real ranks: a signal to one rank stops both at a step boundary with a checkpoint;
a non-finite loss stops the run naming step, rank and last good checkpoint, or is skipped."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from seerlike import config, recipes
from seerlike.engine import checkpoint
from seerlike.engine.loop import NonFiniteLoss, train
from seerlike.engine.loop import REQUEUE_EXIT_CODE
from seerlike.testing import run_on_ranks

pytestmark = pytest.mark.dist


class FakeData:
    """Random 16 px views; batch ``nan_at`` carries a NaN on rank 0; batch ``signal_at`` sends rank 0 SIGUSR1."""

    def __init__(self, rank: int, nan_at: int = -1, signal_at: int = -1):
        self.rank, self.nan_at, self.signal_at, self.i = rank, nan_at, signal_at, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(1000 * self.i + self.rank)
            views = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
            if self.rank == 0 and self.i == self.nan_at:
                views[0][0] = float("nan")
            if self.rank == 0 and self.i == self.signal_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            self.i += 1
            yield SimpleNamespace(views=views)

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def _cfg(*extra: str):
    return config.apply_overrides(recipes.get("tiny_swav"), [
        "loop.max_steps=6", "checkpoint.every_steps=2", "loop.log_every=1", "loop.progress=false",
        "loop.tensorboard=false", "optim.warmup_steps=1", "precision.dtype=fp32", *extra])


def _scenarios(rank: int, world: int, tmp: str) -> dict:
    out = {}
    # SIGUSR1 reaches rank 0 only, while it fetches batch 3 (step index 3)
    run = Path(tmp) / "signal"
    out["signal_rc"] = train(_cfg(), run, data=FakeData(rank, signal_at=3))
    out["signal_ckpt"] = str(checkpoint.latest(run))
    out["resume_rc"] = train(_cfg(), run, data=FakeData(rank))
    out["resume_ckpt"] = str(checkpoint.latest(run))
    # NaN on rank 0 at step index 2 (after the step-2 checkpoint)
    try:
        train(_cfg(), Path(tmp) / "nan", data=FakeData(rank, nan_at=2))
        out["nan_error"] = None
    except NonFiniteLoss as e:
        out["nan_error"] = str(e)
    out["skip_rc"] = train(_cfg("loop.skip_nonfinite=true"), Path(tmp) / "skip", data=FakeData(rank, nan_at=2))
    return out


def test_signal_checkpoint_and_nonfinite_handling(tmp_path):
    results = run_on_ranks(_scenarios, 2, str(tmp_path), timeout_s=240)
    for rank, out in enumerate(results):
        assert out["signal_rc"] == REQUEUE_EXIT_CODE, rank
        assert out["signal_ckpt"].endswith("step_00000004")  # the boundary right after the signal
        assert out["resume_rc"] == 0 and out["resume_ckpt"].endswith("step_00000006")
        assert out["nan_error"] is not None, "a NaN loss must stop the run on every rank"
        # rank 1 sees it too: SwAV's Sinkhorn sums over the ranks
        assert "non-finite loss at step 2 on rank(s) [0, 1]" in out["nan_error"]
        assert f"last good checkpoint: {tmp_path / 'nan' / 'checkpoints' / 'step_00000002'}" in out["nan_error"]
        assert out["skip_rc"] == 0
    rows = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert all(r["loss"] == r["loss"] for r in rows[3:])  # finite again after the skipped step
    resumed = [json.loads(line)["step"] for line in (tmp_path / "signal" / "metrics.jsonl").read_text().splitlines()]
    assert resumed == [1, 2, 3, 4, 5, 6]
