"""loop.time_budget_s: the first steps are timed, max_steps is set from them, saved, and kept on resume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from seerlike import config, recipes
from seerlike.engine import budget as budget_mod
from seerlike.engine import checkpoint
from seerlike.engine.budget import StepBudget
from seerlike.engine.loop import train


def _clock(monkeypatch, ticks):
    """A fake wall clock returning ``ticks`` one by one."""
    it = iter(ticks)
    monkeypatch.setitem(budget_mod.CLOCKS, "wall", lambda: next(it))


def test_plan_uses_the_median_step_after_the_warmup_steps(monkeypatch):
    # start at 100; steps of 9, 7, 2, 1, 3 s -> 122; plan reads 130 (8 s of logging since)
    _clock(monkeypatch, [100.0, 109.0, 116.0, 118.0, 119.0, 122.0, 130.0])
    b = StepBudget(budget_s=90.0, calibrate_steps=5, upper_bound=1000, min_steps=3)
    done = [b.observe(s) for s in range(1, 6)]
    assert done == [False, False, False, False, True]
    # median of the last three (2, 1, 3) = 2 s; 90 - 30 = 60 s left -> 30 more steps after step 5
    assert b.plan(5, torch.device("cpu")) == 35 and b.step_s == 2.0


def test_plan_never_exceeds_the_configured_max_steps_nor_goes_below_the_warmup(monkeypatch):
    _clock(monkeypatch, [0.0, 0.01, 0.02, 0.03, 1.0])
    fast = StepBudget(budget_s=1000.0, calibrate_steps=3, upper_bound=50, min_steps=4)
    for s in (1, 2, 3):
        fast.observe(s)
    assert fast.plan(3, torch.device("cpu")) == 50
    _clock(monkeypatch, [0.0, 1.0, 2.0, 3.0, 500.0])
    late = StepBudget(budget_s=100.0, calibrate_steps=3, upper_bound=50, min_steps=20)
    for s in (1, 2, 3):
        late.observe(s)
    assert late.plan(3, torch.device("cpu")) == 20  # the budget is spent: the warmup still completes


def test_the_cpu_clock_counts_this_process_cpu_time_not_waiting():
    import time

    b = StepBudget(budget_s=10.0, calibrate_steps=3, upper_bound=10_000, min_steps=1, clock="cpu")
    for s in (1, 2, 3):
        time.sleep(0.05)  # waiting (another process on the core) costs no CPU time
    assert b.clock() - b.t0 < 0.05


class _Data:
    def __init__(self):
        self.i = 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.i)
            self.i += 1
            yield SimpleNamespace(views=[torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)], labels=None)

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def test_a_budgeted_run_saves_its_calibrated_length_and_a_restart_keeps_it(tmp_path, one_thread):
    cfg = config.apply_overrides(recipes.get("tiny_swav"), [
        "loop.max_steps=400", "loop.time_budget_s=3", "loop.budget_clock=cpu", "loop.calibrate_steps=4", "checkpoint.every_steps=3",
        "loop.progress=false", "loop.tensorboard=false", "optim.warmup_steps=2", "precision.dtype=fp32",
        "parallel.strategy=none"])
    assert train(cfg, tmp_path, data=_Data()) == 0
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["loop"]["max_steps"]
    final = checkpoint.latest(tmp_path)
    assert 5 <= saved < 400 and checkpoint.step_of(final) == saved
    assert yaml.safe_load((Path(final) / "config.yaml").read_text())["loop"]["max_steps"] == saved
    # the same command again (upper bound 400 in its config): the run is complete at its calibrated length
    assert train(cfg, tmp_path, data=_Data()) == 0
    assert checkpoint.step_of(checkpoint.latest(tmp_path)) == saved


def test_bad_budget_settings_fail_at_parse_time():
    with pytest.raises(config.ConfigError, match="calibrate_steps >= 3"):
        config.apply_overrides(recipes.get("tiny_swav"), ["loop.calibrate_steps=1"])
