"""SimCLR on 2 real gloo ranks == 1 process on the concatenated batch: losses, gradients, state.

The negatives come from the global batch through a gather that keeps gradients; the head's
BatchNorm is synchronised (the official global BN, ``parallel.sync_bn``) and the trunk has no
BN, so both ranks together must compute exactly what one process computes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.parallelize import ParallelConfig, parallelize
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods.simclr import SimCLR
from seerlike.testing import micro_batch, run_on_ranks

pytestmark = pytest.mark.dist
torch.set_num_threads(1)

STEPS, BATCH = 3, 8  # global batch 8: 4 per rank
STRATEGIES = ("ddp", "fsdp")


class _Linear(nn.Module):
    out_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 6)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _views(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.randn(BATCH, 3, 2, 2, generator=g) for _ in range(2)]


def _train(rank: int, world: int, strategy: str) -> dict:
    torch.manual_seed(0)
    m = SimCLR(SimCLR.Config(temperature=0.5, proj_layers=2, proj_hidden=5, proj_out=4), _Linear())
    model = parallelize(m, ParallelConfig(strategy=strategy, sync_bn=True))
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.64, weight_decay=1e-4), m)
    grads, losses = [], []
    # the hook train_step calls after the backward: the (averaged) gradients of every step
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
def test_simclr_two_ranks_equal_one_process(two_ranks, strategy):
    ref = _train(0, 1, "none")
    assert ref["losses"][-1] != ref["losses"][0]
    for r in (x[strategy] for x in two_ranks):
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
        for got, want in zip(r["grads"], ref["grads"], strict=True):
            assert set(got) == set(want)
            for k, v in want.items():
                assert v.abs().max() > 0, k  # every parameter is trained
                torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-5, msg=k)
        for k, v in ref["state"].items():  # parameters and the (synchronised) BN running statistics
            torch.testing.assert_close(r["state"][k], v, atol=1e-5, rtol=1e-5, msg=k)
