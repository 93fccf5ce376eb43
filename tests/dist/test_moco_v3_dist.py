"""MoCo v3 on 2 real gloo ranks == 1 process on the concatenated batch: losses, gradients, state.

Each rank's queries meet the momentum keys of both ranks (in-batch negatives over the global
batch, gathered without gradient); the heads' BatchNorms are synchronised (the official
SyncBN, ``parallel.sync_bn``) and the trunk has no BN, so both ranks together must compute
exactly what one process computes, the momentum encoder included, under DDP and FSDP2.
"""

from __future__ import annotations

import pytest
import torch

from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.parallelize import ParallelConfig, parallelize
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods.moco_v3 import MoCoV3
from seerlike.testing import micro_batch, run_on_ranks
from tests.dist.test_simclr_dist import BATCH, _full, _Linear, _views

pytestmark = pytest.mark.dist
torch.set_num_threads(1)

STEPS = 3
STRATEGIES = ("ddp", "fsdp")


def _train(rank: int, world: int, strategy: str) -> dict:
    torch.manual_seed(0)
    cfg = MoCoV3.Config(projector_dims=(16, 8), predictor_dims=(16, 8), temperature=0.5, momentum=0.5)
    m = MoCoV3(cfg, _Linear())
    model = parallelize(m, ParallelConfig(strategy=strategy, sync_bn=True))
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.64, weight_decay=1e-4), m)
    grads, losses = [], []
    m.on_after_backward = lambda step: grads.append(
        {n: _full(p.grad) for n, p in m.named_parameters() if p.requires_grad})
    for step in range(STEPS):
        views = [v.chunk(world)[rank] for v in _views(step)]
        losses.append(train_step(model, m, opt, None, [micro_batch(views)], step=step, max_steps=STEPS,
                                 precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu")).loss)
    return {"losses": losses, "grads": grads, "state": {k: _full(v) for k, v in m.state_dict().items()}}


def _everything(rank: int, world: int) -> dict:
    return {s: _train(rank, world, s) for s in STRATEGIES}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_on_ranks(_everything, 2)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_moco_v3_two_ranks_equal_one_process(two_ranks, strategy):
    ref = _train(0, 1, "none")
    assert BATCH // 2 >= 2  # each rank holds several samples: the other rank's keys are real negatives
    moved = ref["state"]["momentum_encoder.head.0.weight"] - ref["state"]["projector.0.weight"]
    assert moved.abs().max() > 1e-4  # the momentum encoder lags behind the online net
    for r in (x[strategy] for x in two_ranks):
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
        for got, want in zip(r["grads"], ref["grads"], strict=True):
            assert set(got) == set(want) and not any(k.startswith("momentum_encoder.") for k in want)
            for k, v in want.items():
                assert v.abs().max() > 0, k
                torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-5, msg=k)
        assert set(r["state"]) == set(ref["state"])
        for k, v in ref["state"].items():  # the momentum encoder and synchronised BN statistics too
            torch.testing.assert_close(r["state"][k], v, atol=1e-5, rtol=1e-5, msg=k)
