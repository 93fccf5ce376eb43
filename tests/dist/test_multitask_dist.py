"""Multi-task pretext training on 2 real gloo ranks == 1 process on the concatenated batch, for
both schedules under DDP and FSDP2: losses, gradients at every step, the state (colorization's
all-reduced colour counts, the interleave turn). Interleaving leaves a head out of each backward;
DDP (no find_unused_parameters) must still see a gradient for it, or it fails at the next step.
Rotation (all 4) and colorization draw nothing at random, so both runs see the same inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seerlike.engine.optim import OptimConfig
from seerlike.methods.multitask import MultiTask
from tests.dist._equivalence import BATCH, assert_equal_to_one_process, train, two_ranks_fixture

pytestmark = pytest.mark.dist
torch.set_num_threads(1)

STEPS = 3
CASES = [("ddp", "interleave"), ("fsdp", "interleave"), ("ddp", "sum")]


class _Maps(nn.Module):
    """A trunk with a res5 map and no BatchNorm (per-rank statistics would differ from one process's)."""

    out_dim = 6
    feature_dims = {"res5": 6}

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)

    def forward_features(self, x, until=None):
        res5 = self.conv(x)
        return {"res5": res5, "pool": res5.mean((2, 3))}

    def forward(self, x):
        return self.forward_features(x)["pool"]


def _views(step: int) -> list[torch.Tensor]:
    return [torch.randn(BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(step))]


def _train(rank: int, world: int, strategy: str, schedule: str) -> dict:
    torch.manual_seed(0)
    cfg = MultiTask.Config(tasks=("rotnet", "colorization"), weights=(1.0, 0.5), schedule=schedule,
                           settings={"colorization": {"target_cells": 2}})
    # the gradients recorded are those after MultiTask's hook, which drops the heads that sat a step out
    return train(MultiTask(cfg, _Maps()), strategy, _views, rank=rank, world=world, steps=STEPS,
                 optim=OptimConfig(name="sgd", lr=0.5, momentum=0.9, weight_decay=1e-4))


def _everything(rank: int, world: int) -> list[dict]:
    return [_train(rank, world, *case) for case in CASES]


two_ranks = two_ranks_fixture(_everything)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{s}-{k}" for s, k in CASES])
def test_multitask_two_ranks_equal_one_process(two_ranks, case):
    _, schedule = CASES[case]
    ref = _train(0, 1, "none", schedule)
    heads = [{k.split(".")[1] for k in g if k.startswith("tasks.")} for g in ref["grads"]]
    if schedule == "interleave":  # one head per step, in turn; the trunk every step
        assert heads == [{"rotnet"}, {"colorization"}, {"rotnet"}]
        assert int(ref["state"]["batches"]) == STEPS
    else:
        assert heads == [{"rotnet", "colorization"}] * STEPS
    assert ref["state"]["tasks.colorization.ab_counts"].sum() > 0
    assert_equal_to_one_process([x[case] for x in two_ranks], ref, nonzero_grads=False)
