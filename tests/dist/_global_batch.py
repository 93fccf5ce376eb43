"""Shared by the dist tests of the global-batch methods (Barlow Twins, VICReg): train one on this
rank's share of a global batch, through the engine's parallelize and train_step."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from seerlike.engine.optim import LRSchedule, OptimConfig, build_optimizer
from seerlike.engine.parallelize import ParallelConfig, parallelize
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.testing import micro_batch
# the BN-free trunk: the projector's BatchNorms (SyncBN on ranks) are the only other batch statistics
from tests.dist._equivalence import Linear, full

GLOBAL_BATCH, STEPS = 8, 3
STRATEGIES = ("ddp", "fsdp")


def views(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.randn(GLOBAL_BATCH, 3, 2, 2, generator=g) * (1 + step) for _ in range(2)]


def train(make: Callable[[nn.Module], nn.Module], rank: int, world: int, strategy: str) -> dict:
    """One forward/backward (loss, gradients averaged over ranks), then STEPS train_steps (losses, state).

    On ranks the projector's BatchNorms become SyncBatchNorm (``parallel.sync_bn``) and the
    method is wrapped by DDP or sharded by FSDP2; on 1 process it runs as it is.
    """
    torch.manual_seed(0)
    method = make(Linear())
    model = parallelize(method, ParallelConfig(strategy=strategy if world > 1 else "none", sync_bn=True))
    optim = OptimConfig(name="sgd", lr=1.6, momentum=0.9, weight_decay=1e-4)  # 0.05 at batch 8
    opt = build_optimizer(optim, method)
    sched = LRSchedule(optim, GLOBAL_BATCH, STEPS)

    def mine(vs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [v.chunk(world)[rank] for v in vs]

    loss, stats = model(mine(views(100)))
    loss.backward()
    grads = {n: full(p.grad) for n, p in method.named_parameters()}
    opt.zero_grad(set_to_none=True)
    losses = []
    for step in range(STEPS):
        sched.apply(opt, step)
        result = train_step(model, method, opt, None, [micro_batch(mine(views(step)))], step=step, max_steps=STEPS,
                            precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu"))
        losses.append(result.loss)
    return {"loss": loss.detach(), "stats": {k: v.detach() for k, v in stats.items()}, "grads": grads,
            "losses": losses, "state": {k: full(v) for k, v in method.state_dict().items()}}


def assert_like_one_process(ranks: list[dict], ref: dict) -> None:
    """Every rank's loss and stats equal the 1-process ones; gradients, losses and state too."""
    for r in ranks:
        torch.testing.assert_close(r["loss"], ref["loss"], atol=1e-5, rtol=1e-5)
        for k, v in ref["stats"].items():
            torch.testing.assert_close(r["stats"][k], v, atol=1e-5, rtol=1e-5, msg=k)
        assert set(r["grads"]) == set(ref["grads"])
        for k, g in ref["grads"].items():
            torch.testing.assert_close(r["grads"][k], g, atol=1e-5, rtol=1e-4, msg=k)
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
        assert set(r["state"]) == set(ref["state"])
        for k, v in ref["state"].items():
            torch.testing.assert_close(r["state"][k].to(v.dtype), v, atol=1e-5, rtol=1e-4, msg=k)
    # the checks would be vacuous if nothing learned: gradients and updates are not small
    assert max(g.abs().max().item() for g in ref["grads"].values()) > 1e-2
    assert len(set(round(x, 6) for x in ref["losses"])) == STEPS
