"""Pieces several methods share: collectives across ranks, the trunk over a batch's views,
fp32 regions, and momentum (EMA) copies of networks (BYOL's target, MoCo's key encoder, DINO's
teacher).

Two kinds of gather. :func:`gather_with_grad` keeps the autograd graph (SimCLR's negatives are
trained through): its backward sums every rank's gradient for a slice into the rank that owns
the slice, so once data parallelism averages the parameter gradients, N ranks of B samples
train exactly like one process on the N x B batch. :func:`gather` is a plain no-grad
collective for what is never trained through (momentum keys, images to shuffle).
Both return the ranks' tensors concatenated in rank order and need the same shape on every rank.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor, nn

from seerlike.sharded import local


def world_and_rank() -> tuple[int, int]:
    """(world size, rank); (1, 0) without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0, differentiable (see the module docstring)."""
    world, _ = world_and_rank()
    if world == 1:
        return x
    with warnings.catch_warnings():
        # torch 2.13 marks it deprecated; its suggested replacement has no backward on gloo
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        return torch.cat(dist_nn.all_gather(x.contiguous()))


@torch.no_grad()
def gather(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0, without gradient."""
    world, _ = world_and_rank()
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def all_reduce_with_grad(t: Tensor) -> Tensor:
    """The sum of ``t`` over all ranks, differentiable (its backward all-reduces the gradient)."""
    return dist_nn.all_reduce(t) if world_and_rank()[0] > 1 else t


def cosine_to_one(base: float, step: int, max_steps: int) -> float:
    """A momentum annealed from ``base`` at step 0 to 1 at ``max_steps`` by a half cosine
    (BYOL's target, MoCo v3's encoder, DINO's teacher): 1 - (1 - base)(cos(pi k / K) + 1) / 2."""
    if max_steps <= 0:
        raise ValueError(f"max_steps must be > 0 for a momentum schedule, got {max_steps}")
    return 1 - (1 - base) * (math.cos(math.pi * min(step, max_steps) / max_steps) + 1) / 2


def forward_views(net: nn.Module, views: list[Tensor]) -> Tensor:
    """``net`` on all views, view-major: one forward per run of consecutive views of one size
    (fewer FSDP all-gathers and larger batches than one forward per view)."""
    out, start = [], 0
    while start < len(views):
        end = start
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        out.append(net(torch.cat(views[start:end]) if end - start > 1 else views[start]))
        start = end
    return out[0] if len(out) == 1 else torch.cat(out)


def no_autocast(t: Tensor):
    """A context where matmuls stay in fp32: contrastive logits over thousands of negatives at a
    temperature of 0.1-0.2 lose too much in bf16 (3 significant digits)."""
    return torch.autocast(t.device.type, enabled=False)


class MomentumEncoder(nn.Module):
    """Frozen copies of online modules (a trunk and its heads, applied in the order given) that
    follow them by an exponential moving average.

    A module of its own, its children named as given (``backbone=..., projector=...``: the
    checkpoint keys), so FSDP2 shards it exactly like the online trunk (its ``backbone`` has
    the same blocks) and checkpoints carry it. The average runs on the local tensors, so it
    works on FSDP2 shards (DTensors with the online placements) and stays identical across
    ranks as long as the online parameters are.
    """

    def __init__(self, **modules: nn.Module) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, copy.deepcopy(module))
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        for module in self.children():
            x = module(x)
        return x

    def pairs(self, online: list[nn.Module]) -> tuple[list[Tensor], list[Tensor]]:
        """(momentum, online) parameters in matching order, checked for shape and sharding."""
        src = [p for m in online for p in m.parameters()]
        dst = list(self.parameters())
        if len(src) != len(dst):
            raise RuntimeError(f"momentum encoder has {len(dst)} parameters but the online net {len(src)}")
        for t, o in zip(dst, src):
            if t.shape != o.shape or getattr(t, "placements", None) != getattr(o, "placements", None):
                raise RuntimeError(
                    f"momentum/online parameter mismatch: {tuple(t.shape)} {getattr(t, 'placements', None)} vs "
                    f"{tuple(o.shape)} {getattr(o, 'placements', None)}; shard the momentum encoder like the online net")
        return dst, src

    @torch.no_grad()
    def copy_from(self, online: list[nn.Module]) -> None:
        """Parameters and buffers := the online modules' (``[backbone, head]``)."""
        dst, src = self.pairs(online)
        dst += list(self.buffers())
        src += [b for m in online for b in m.buffers()]
        for t, o in zip(dst, src):
            local(t).copy_(local(o))

    @torch.no_grad()
    def update(self, online: list[nn.Module], m: float) -> None:
        """Parameters := m x momentum + (1 - m) x online (buffers keep their own running statistics)."""
        dst, src = self.pairs(online)
        torch._foreach_lerp_([local(t) for t in dst], [local(o) for o in src], 1.0 - m)
