"""The quickstart's time plan: ``--minutes`` = overhead + each stage's steps + its kNN monitor, and short
budgets that either hold their plan or are refused (docs/fit_data.md, "Planned vs actual time")."""

from __future__ import annotations

import pytest

from seerlike.config import ConfigError
from seerlike.engine.monitor import MonitorConfig
from seerlike.quickstart import OVERHEAD_S, SHARES, SLOWDOWN_HELD, budget_for, minimum_minutes, stage_step_costs


@pytest.mark.parametrize("minutes", [3.2, 4.0, 7.5, 15.0, 45.0])
def test_the_plan_fills_the_minutes_with_each_stages_knn_monitor(minutes):
    budget = budget_for(minutes)
    steps_s = budget.pretrain_s + budget.clusterfit_s + budget.distill_s
    # the engine pauses the step budget while the monitor reads: its share comes on top of the steps' seconds
    monitor_share = MonitorConfig().max_fraction
    assert OVERHEAD_S + steps_s * (1 + monitor_share) == pytest.approx(60 * minutes, abs=0.01)
    assert sum(budget.planned_s(stage) for stage in SHARES) == pytest.approx(steps_s * (1 + monitor_share))
    for stage, share in SHARES.items():
        assert getattr(budget, f"{stage}_s") == pytest.approx(share * steps_s)


@pytest.mark.parametrize("minutes", [3.2, 4.0, 5.0, 7.5, 15.0])
def test_every_stage_of_a_short_budget_fits_its_warmup_on_a_machine_four_times_slower(minutes):
    budget = budget_for(minutes)
    step_s, calibrate = stage_step_costs("swav")
    for stage in SHARES:
        # the engine runs at least max(warmup, calibration + 1) steps whatever the budget
        floor = max(budget.warmup_steps(stage), calibrate + 1)
        seconds = getattr(budget, f"{stage}_s")
        assert floor * SLOWDOWN_HELD * step_s[stage] <= seconds, (stage, floor, seconds)
        args = budget.train_args(stage, 0)
        assert f"optim.warmup_steps={budget.warmup_steps(stage)}" in args and budget.warmup_steps(stage) >= calibrate


def test_full_budgets_keep_the_stages_whole_warmup():
    budget = budget_for(15)
    assert {stage: budget.warmup_steps(stage) for stage in SHARES} == {"pretrain": 50, "clusterfit": 25, "distill": 25}
    assert budget_for(4).warmup_steps("pretrain") == 12  # 5 % of ~180 predicted steps, floored at the calibration


@pytest.mark.parametrize("minutes", [0.5, 2.5, 3.0, 3.1])
def test_minutes_too_short_to_hold_are_refused_naming_the_minimum(minutes):
    least = minimum_minutes(*stage_step_costs("swav"))
    assert least == 3.2
    with pytest.raises(ConfigError, match=r"--minutes 3\.2 or more"):
        budget_for(minutes)
    budget_for(least)  # the minimum itself is accepted


def test_stages_given_in_steps_or_seconds_are_not_held_to_the_minutes():
    budget = budget_for(1, pretrain_steps=8, clusterfit_steps=6, distill_steps=6)
    assert budget.planned_s("pretrain") is None and budget.train_args("distill", 0)[:2] == ["--max-steps", "6"]
    # explicit seconds are the user's: warmup cut to the calibration, the stage runs its 13 steps at least
    short = budget_for(15, pretrain_seconds=3, followup_seconds=2)
    assert short.pretrain_s == 3 and short.warmup_steps("pretrain") == 12
    with pytest.raises(ConfigError, match="--minutes 3.2 or more"):
        budget_for(3, pretrain_seconds=100)  # ClusterFit and distillation still take their share of the minutes


def test_the_cpu_clock_reaches_every_time_budgeted_stage():
    budget = budget_for(15, distill_steps=6, clock="cpu")
    assert "loop.budget_clock=cpu" in budget.train_args("pretrain", 0)
    assert not any(a.startswith("loop.budget_clock") for a in budget.train_args("distill", 0))  # steps given
    assert not any(a.startswith("loop.budget_clock") for a in budget_for(15).train_args("pretrain", 0))
