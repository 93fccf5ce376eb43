"""Colorization on 2 real gloo ranks == 1 process on the concatenated batch: losses, gradients, colour prior.

The colour prior (``ab_counts``) is summed over the ranks every step, so the rebalancing
weights are the global batch's on every rank; the trunk has no BN, so both ranks together must
compute exactly what one process computes.
"""

from __future__ import annotations

import pytest
import torch

from seerlike.engine.optim import OptimConfig
from seerlike.methods.colorization import Colorization
from tests.dist._equivalence import (BATCH, STRATEGIES, assert_equal_to_one_process, each_strategy, train,
                                     two_ranks_fixture)
from tests.unit.test_colorization import SpatialNet, _images, normalise

pytestmark = pytest.mark.dist
torch.set_num_threads(1)

STEPS = 3


def _views(step: int) -> list[torch.Tensor]:
    rgb = _images(100 + step, n=BATCH)
    rgb[1] = rgb[1].mean(dim=0, keepdim=True)  # a grayscale image on each rank (the last is one too)
    return [normalise(rgb)]


def _train(rank: int, world: int, strategy: str) -> dict:
    torch.manual_seed(0)
    m = Colorization(Colorization.Config(target_cells=2), SpatialNet())
    return train(m, strategy, _views, rank=rank, world=world, steps=STEPS,
                 optim=OptimConfig(name="sgd", lr=6.4, weight_decay=1e-4))


two_ranks = two_ranks_fixture(each_strategy, _train)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_colorization_two_ranks_equal_one_process(two_ranks, strategy):
    ref = _train(0, 1, "none")
    assert ref["losses"][-1] != ref["losses"][0]
    assert ref["state"]["ab_counts"].sum() == STEPS * (BATCH - 2) * 64  # colour images only, 8x8 targets each
    # the state: parameters, the bins and the global colour prior
    assert_equal_to_one_process([x[strategy] for x in two_ranks], ref)
