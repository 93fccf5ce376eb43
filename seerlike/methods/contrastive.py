"""Pieces the contrastive methods (SimCLR, MoCo v2, MoCo v3) share: gathers across ranks and
a momentum encoder.

Two kinds of gather. :func:`gather_with_grad` keeps the autograd graph (SimCLR's negatives are
trained through): its backward sums every rank's gradient for a slice into the rank that owns
the slice, so once data parallelism averages the parameter gradients, N ranks of B samples
train exactly like one process on the N x B batch. :func:`gather` is a plain no-grad
collective for what is never trained through (momentum keys, images to shuffle).
Both return the ranks' tensors concatenated in rank order and need the same shape on every rank.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor, nn


def dist_info() -> tuple[int, int]:
    """(world size, rank); (1, 0) without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0, differentiable (see the module docstring)."""
    world, _ = dist_info()
    if world == 1:
        return x
    with warnings.catch_warnings():
        # torch 2.13 marks it deprecated; its suggested replacement has no backward on gloo
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        return torch.cat(dist_nn.all_gather(x.contiguous()))


@torch.no_grad()
def gather(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0, without gradient."""
    world, _ = dist_info()
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def forward_views(net: nn.Module, views: list[Tensor]) -> Tensor:
    """``net`` on the views concatenated along the batch: one forward when they share a shape, else one each."""
    if all(v.shape == views[0].shape for v in views):
        return net(torch.cat(views))
    return torch.cat([net(v) for v in views])


def no_autocast(t: Tensor):
    """A context where matmuls stay in fp32: contrastive logits over thousands of negatives at a
    temperature of 0.1-0.2 lose too much in bf16 (3 significant digits)."""
    return torch.autocast(t.device.type, enabled=False)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class MomentumEncoder(nn.Module):
    """Frozen copies of a trunk and its head that follow the online ones by an exponential moving average.

    A module of its own (``backbone`` + ``head``) so FSDP2 shards it exactly like the online
    trunk (its ``backbone`` has the same blocks) and checkpoints carry it. The average runs on
    the local tensors, so it works on FSDP2 shards (DTensors with the online placements) and
    stays identical across ranks as long as the online parameters are.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        self.head = copy.deepcopy(head)
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

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
            _local(t).copy_(_local(o))

    @torch.no_grad()
    def update(self, online: list[nn.Module], m: float) -> None:
        """Parameters := m x momentum + (1 - m) x online (buffers keep their own running statistics)."""
        dst, src = self.pairs(online)
        torch._foreach_lerp_([_local(t) for t in dst], [_local(o) for o in src], 1.0 - m)
