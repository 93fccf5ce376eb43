"""Numeric precision: fp32, bf16 autocast, or fp16 autocast with a loss scaler that is correct under sharding.

With FSDP2 every rank holds different gradient shards, so an overflow seen by one rank must
skip the step on all of them. ``ShardedGradScaler`` all-reduces its found-inf flag; its
unscale kernel is handed the *local* shards of DTensor gradients (the foreach kernel has no
DTensor rule), which unscales the sharded gradients in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(kw_only=True)
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    """Compute dtype under autocast (parameters, optimizer state, BatchNorm stay fp32); auto: bf16 if native, else fp32."""
    init_scale: float = 2.0**16
    """fp16 only: initial loss scale."""
    growth_interval: int = 2000
    """fp16 only: steps without overflow before the loss scale doubles."""

    def __post_init__(self):
        if self.init_scale <= 0 or self.growth_interval < 1:
            raise ValueError("precision.init_scale must be > 0 and precision.growth_interval >= 1")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            raise ValueError("precision.dtype=auto names no dtype until it is resolved for a device "
                             "(PrecisionConfig.resolved; the engine does it at the start of a run)")
        return DTYPES[self.dtype]

    def resolved(self, device: torch.device | str) -> PrecisionConfig:
        """This config with ``auto`` made concrete for ``device``: bf16 where it is native (``native_bf16``), else fp32."""
        if self.dtype != "auto":
            return self
        return dataclasses.replace(self, dtype="bf16" if native_bf16(device) else "fp32")


EMULATED_BF16_SLOWDOWN = 18
"""bf16 autocast over fp32 for a resnet10_cifar step on an AVX2 CPU without native bf16 (docs/engine.md, "bf16 on CPUs")."""


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 autocast on ``device`` runs on native bf16 arithmetic: CUDA devices that support it (Ampere
    on), CPUs on which oneDNN has bf16 instructions (AVX-512, AMX, Arm BF16). Elsewhere it is emulated, far slower."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN: no bf16 kernels either
        return False


def emulated_bf16_warning(cfg: PrecisionConfig, device: torch.device) -> str | None:
    """The warning for bf16 autocast on a CPU that emulates it (None when the dtype is not bf16 or is native)."""
    if cfg.dtype != "bf16" or native_bf16(device):
        return None
    return (f"precision.dtype=bf16 on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}; oneDNN "
            f"reports no bf16 instructions): autocast emulates it, about {EMULATED_BF16_SLOWDOWN}x slower than fp32 "
            "(docs/engine.md, \"bf16 on CPUs\"); set precision.dtype=fp32 or auto")


def autocast(cfg: PrecisionConfig, device: torch.device):
    cfg = cfg.resolved(device)
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
