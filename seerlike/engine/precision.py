"""Numeric precision: fp32, bf16 autocast, or fp16 autocast with a loss scaler that is correct under sharding.

With FSDP2 every rank holds different gradient shards, so an overflow seen by one rank must
skip the step on all of them. ``ShardedGradScaler`` all-reduces its found-inf flag; its
unscale kernel is handed the *local* shards of DTensor gradients (the foreach kernel has no
DTensor rule), which unscales the sharded gradients in place.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(kw_only=True)
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute dtype under autocast; parameters, optimizer state and BatchNorm stay fp32."""
    init_scale: float = 2.0**16
    """fp16 only: initial loss scale."""
    growth_interval: int = 2000
    """fp16 only: steps without overflow before the loss scale doubles."""

    def __post_init__(self):
        if self.init_scale <= 0 or self.growth_interval < 1:
            raise ValueError("precision.init_scale must be > 0 and precision.growth_interval >= 1")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def autocast(cfg: PrecisionConfig, device: torch.device):
    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=cfg.torch_dtype)


class GradScaler(ShardedGradScaler):
    """Loss scaling for fp16 whose inf/NaN check is all-reduced over the process group."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16=True):
        swapped = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and hasattr(p.grad, "to_local"):
                    swapped.append((p, p.grad))
                    p.grad = None
        try:
            # unscale the local shards (views sharing storage with the DTensor grads)
            holders = [_LocalGrad(g.to_local()) for _, g in swapped]
            fake = {"params": holders}
            groups = [*optimizer.param_groups, fake] if holders else optimizer.param_groups
            return super()._unscale_grads_(_Groups(groups), inv_scale, found_inf, allow_fp16)
        finally:
            for p, g in swapped:
                p.grad = g


class _LocalGrad:
    """A stand-in parameter whose ``grad`` is a DTensor gradient's local shard."""

    def __init__(self, grad: torch.Tensor):
        self.grad = grad


class _Groups:
    def __init__(self, param_groups):
        self.param_groups = param_groups


def grad_scaler(cfg: PrecisionConfig, device: torch.device) -> GradScaler | None:
    if cfg.dtype != "fp16":
        return None
    return GradScaler(device=device.type, init_scale=cfg.init_scale, growth_interval=cfg.growth_interval)
