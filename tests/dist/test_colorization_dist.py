"""Colorization on 2 real gloo ranks == 1 process on the concatenated batch: losses, gradients, colour prior.

The colour prior (``ab_counts``) is summed over the ranks every step, so the rebalancing
weights are the global batch's on every rank; the trunk has no BN, so both ranks together must
compute exactly what one process computes.
"""

from __future__ import annotations

import pytest
import torch

from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.parallelize import ParallelConfig, parallelize
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods.colorization import Colorization
from seerlike.testing import micro_batch, run_on_ranks
from tests.unit.test_colorization import SpatialNet, _images, normalise

pytestmark = pytest.mark.dist
torch.set_num_threads(1)

STEPS, BATCH = 3, 8  # global batch 8: 4 per rank
STRATEGIES = ("ddp", "fsdp")


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _views(step: int) -> list[torch.Tensor]:
    rgb = _images(100 + step, n=BATCH)
    rgb[1] = rgb[1].mean(dim=0, keepdim=True)  # a grayscale image on each rank (the last is one too)
    return [normalise(rgb)]


def _train(rank: int, world: int, strategy: str) -> dict:
    torch.manual_seed(0)
    m = Colorization(Colorization.Config(target_cells=2), SpatialNet())
    model = parallelize(m, ParallelConfig(strategy=strategy))
    opt = build_optimizer(OptimConfig(name="sgd", lr=6.4, weight_decay=1e-4), m)
    grads, losses = [], []
    m.on_after_backward = lambda step: grads.append({n: _full(p.grad) for n, p in m.named_parameters()})
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
def test_colorization_two_ranks_equal_one_process(two_ranks, strategy):
    ref = _train(0, 1, "none")
    assert ref["losses"][-1] != ref["losses"][0]
    assert ref["state"]["ab_counts"].sum() == STEPS * (BATCH - 2) * 64  # colour images only, 8x8 targets each
    for r in (x[strategy] for x in two_ranks):
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
        for got, want in zip(r["grads"], ref["grads"], strict=True):
            assert set(got) == set(want)
            for k, v in want.items():
                assert v.abs().max() > 0, k
                torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-5, msg=k)
        for k, v in ref["state"].items():  # parameters, the bins and the global colour prior
            torch.testing.assert_close(r["state"][k], v, atol=1e-5, rtol=1e-5, msg=k)
