"""MoCo v3 on 2 real gloo ranks == 1 process on the concatenated batch: losses, gradients, state.

Each rank's queries meet the momentum keys of both ranks (in-batch negatives over the global
batch, gathered without gradient); the heads' BatchNorms are synchronised (the official
SyncBN, ``parallel.sync_bn``) and the trunk has no BN, so both ranks together must compute
exactly what one process computes, the momentum encoder included, under DDP and FSDP2.
"""

from __future__ import annotations

import pytest
import torch

from seerlike.engine.optim import OptimConfig
from seerlike.methods.moco_v3 import MoCoV3
from tests.dist._equivalence import (BATCH, STRATEGIES, Linear, assert_equal_to_one_process, each_strategy, train,
                                     two_ranks_fixture, views)

pytestmark = pytest.mark.dist
torch.set_num_threads(1)

STEPS = 3


def _train(rank: int, world: int, strategy: str) -> dict:
    torch.manual_seed(0)
    cfg = MoCoV3.Config(projector_dims=(16, 8), predictor_dims=(16, 8), temperature=0.5, momentum=0.5)
    return train(MoCoV3(cfg, Linear()), strategy, views, sync_bn=True, rank=rank, world=world, steps=STEPS,
                 optim=OptimConfig(name="sgd", lr=0.64, weight_decay=1e-4))


two_ranks = two_ranks_fixture(each_strategy, _train)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_moco_v3_two_ranks_equal_one_process(two_ranks, strategy):
    ref = _train(0, 1, "none")
    assert BATCH // 2 >= 2  # each rank holds several samples: the other rank's keys are real negatives
    moved = ref["state"]["momentum_encoder.head.0.weight"] - ref["state"]["projector.0.weight"]
    assert moved.abs().max() > 1e-4  # the momentum encoder lags behind the online net
    assert not any(k.startswith("momentum_encoder.") for g in ref["grads"] for k in g)  # (the ranks' sets equal it)
    # the state: the momentum encoder and synchronised BN statistics too
    assert_equal_to_one_process([x[strategy] for x in two_ranks], ref)
