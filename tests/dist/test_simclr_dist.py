"""SimCLR on 2 real gloo ranks == 1 process on the concatenated batch: losses, gradients, state.

The negatives come from the global batch through a gather that keeps gradients; the head's
BatchNorm is synchronised (the official global BN, ``parallel.sync_bn``) and the trunk has no
BN, so both ranks together must compute exactly what one process computes.
"""

from __future__ import annotations

import pytest
import torch

from seerlike.engine.optim import OptimConfig
from seerlike.methods.simclr import SimCLR
from tests.dist._equivalence import (STRATEGIES, Linear, assert_equal_to_one_process, each_strategy, train,
                                     two_ranks_fixture, views)

pytestmark = pytest.mark.dist
torch.set_num_threads(1)

STEPS = 3


def _train(rank: int, world: int, strategy: str) -> dict:
    torch.manual_seed(0)
    m = SimCLR(SimCLR.Config(temperature=0.5, proj_layers=2, proj_hidden=5, proj_out=4), Linear())
    return train(m, strategy, views, sync_bn=True, rank=rank, world=world, steps=STEPS,
                 optim=OptimConfig(name="sgd", lr=0.64, weight_decay=1e-4))


two_ranks = two_ranks_fixture(each_strategy, _train)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_simclr_two_ranks_equal_one_process(two_ranks, strategy):
    ref = _train(0, 1, "none")
    assert ref["losses"][-1] != ref["losses"][0]
    # every parameter is trained; the state holds the (synchronised) BN running statistics
    assert_equal_to_one_process([x[strategy] for x in two_ranks], ref)
