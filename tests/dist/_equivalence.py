"""Shared by the dist tests that train a method on 2 real gloo ranks and compare it with 1 process
on the concatenated batch: a BN-free trunk, a few ``train_step``s that record every step's loss
and (rank-averaged) gradients and the final state, the 2-rank fixture and the comparison."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.parallelize import ParallelConfig, parallelize
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.testing import micro_batch, run_on_ranks

BATCH = 8
"""The global batch of :func:`views`: 4 per rank."""
STRATEGIES = ("ddp", "fsdp")


class Linear(nn.Module):
    """A BN-free trunk: per-rank BatchNorm statistics would differ from one process's."""

    out_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 6)

    def forward(self, x):
        return self.fc(x.flatten(1))


def views(step: int) -> list[Tensor]:
    """Two random 2x2 views of the global batch of ``step`` (the input of :class:`Linear`)."""
    g = torch.Generator().manual_seed(step)
    return [torch.randn(BATCH, 3, 2, 2, generator=g) for _ in range(2)]


def full(t: Tensor) -> Tensor:
    """A detached copy of the whole tensor (an FSDP2 shard gathered)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def train_steps(m: nn.Module, model: nn.Module, inputs: Callable[[int], list[Tensor]], *, rank: int, world: int,
                steps: int, optim: OptimConfig, indices: Callable[[int], Tensor] | None = None) -> dict:
    """``steps`` train_steps of method ``m`` (wrapped as ``model``) on this rank's share of ``inputs(step)``.

    Returns the losses, every step's gradients (those the optimizer sees: after the method's own
    after-backward hook, of the parameters that have one) and the final state, all whole tensors.
    ``indices(step)``: the global batch's sample indices, split like the views.
    """
    opt = build_optimizer(optim, m)
    grads, losses = [], []
    own_hook = m.on_after_backward

    def after_backward(step: int) -> None:  # train_step calls it once the gradients are averaged over the ranks
        own_hook(step)
        grads.append({n: full(p.grad) for n, p in m.named_parameters() if p.grad is not None})

    m.on_after_backward = after_backward
    for step in range(steps):
        mine = [v.chunk(world)[rank] for v in inputs(step)]
        idx = None if indices is None else indices(step).chunk(world)[rank]
        losses.append(train_step(model, m, opt, None, [micro_batch(mine, indices=idx)], step=step, max_steps=steps,
                                 precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu")).loss)
    return {"losses": losses, "grads": grads, "state": {k: full(v) for k, v in m.state_dict().items()}}


def train(m: nn.Module, strategy: str, inputs: Callable[[int], list[Tensor]], *, sync_bn: bool = False,
          **kwargs) -> dict:
    """:func:`train_steps` of ``m`` parallelized by ``strategy`` (``none`` in the 1-process reference)."""
    model = parallelize(m, ParallelConfig(strategy=strategy, sync_bn=sync_bn))
    return train_steps(m, model, inputs, **kwargs)


def each_strategy(rank: int, world: int, train_fn: Callable[[int, int, str], dict]) -> dict:
    """``train_fn(rank, world, strategy)`` under DDP and FSDP2 (one spawn of the ranks for both)."""
    return {s: train_fn(rank, world, s) for s in STRATEGIES}


def two_ranks_fixture(fn: Callable, *args):
    """A module-scoped fixture ``two_ranks``: each rank's ``fn(rank, 2, *args)``; ``fn`` must be importable."""

    @pytest.fixture(scope="module")
    def two_ranks() -> list:
        return run_on_ranks(fn, 2, *args)

    return two_ranks


def assert_equal_to_one_process(ranks: list[dict], ref: dict, *, nonzero_grads: bool = True) -> None:
    """Every rank's losses, gradients at every step and state equal the 1-process run's ``ref``.

    ``nonzero_grads``: every gradient of the reference is also checked to be non-zero somewhere
    (every parameter is trained, so the comparison is not vacuous).
    """
    for r in ranks:
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
        for got, want in zip(r["grads"], ref["grads"], strict=True):
            assert set(got) == set(want)
            for k, v in want.items():
                if nonzero_grads:
                    assert v.abs().max() > 0, k
                torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-5, msg=k)
        assert set(r["state"]) == set(ref["state"])
        for k, v in ref["state"].items():
            torch.testing.assert_close(r["state"][k], v, atol=1e-5, rtol=1e-5, msg=k)
