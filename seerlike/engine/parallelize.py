"""Make a method ready for data-parallel training: one plain function, applied in order.

1. activation checkpointing (per block, per stage, or SEER-style segments of stages);
2. SyncBatchNorm (``nn.SyncBatchNorm`` on CUDA, :mod:`seerlike.engine.syncbn` elsewhere);
3. FSDP2 ``fully_shard`` per block (or stage) of every backbone in the method, then the root;
   or DDP for small models; or nothing.

Recomputing a checkpointed block runs its BatchNorms a second time. Left alone they would
update their running statistics twice per step (and count the batch twice), so the
recompute runs them with momentum 0 (see :func:`frozen_bn_stats`): same output, running
buffers unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from seerlike.engine.syncbn import bn_group, convert_sync_batchnorm

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ParallelConfig:
    strategy: Literal["fsdp", "ddp", "none"] = "fsdp"
    """fsdp: FSDP2 fully_shard (params, grads, optimizer state sharded); ddp: replicated; none: single process only."""
    shard_unit: Literal["block", "stage"] = "block"
    """FSDP wrapping unit inside each backbone: every residual block or every stage."""
    reshard_after_forward: bool = True
    """FSDP: free gathered params after forward (less memory, one more all-gather in backward)."""
    mixed_precision_params: bool = False
    """FSDP: all-gather params and run blocks in the compute dtype (BatchNorm stays fp32); else fp32 params + autocast."""
    ac: Literal["none", "block", "stage", "segments"] = "none"
    """Activation checkpointing: none, every block, every stage, or the split points in ac_segments."""
    ac_segments: list[list[int]] = field(default_factory=list)
    """SEER-style per-stage split points, e.g. [[2], [7], [9, 17], []]: stage 3 checkpointed as blocks 0-8 and 9-16; [] = not checkpointed."""
    sync_bn: bool = False
    """Replace BatchNorm by SyncBatchNorm (statistics over a group of ranks)."""
    sync_bn_group_size: int = 0
    """Ranks per SyncBN group (SEER: 64); 0 = all ranks."""

    def __post_init__(self):
        if self.sync_bn_group_size < 0:
            raise ValueError(f"parallel.sync_bn_group_size must be >= 0, got {self.sync_bn_group_size}")
        if self.ac == "segments" and not self.ac_segments:
            raise ValueError("parallel.ac=segments needs parallel.ac_segments, e.g. [[2],[7],[9,17],[]]")
        for seg in self.ac_segments:
            if list(seg) != sorted(seg) or any(s <= 0 for s in seg):
                raise ValueError(f"parallel.ac_segments entries must be increasing positive block counts, got {seg}")


# ---------------------------------------------------------------- activation checkpointing


def _norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def frozen_bn_stats(modules: list[nn.Module]):
    """BatchNorms inside ``modules`` run exactly as before but leave their running stats unchanged.

    Momentum 0 makes the kernel's update ``(1 - 0) * running + 0 * batch`` (the running value,
    bit for bit) while the op and the tensors it saves stay the same as in the first forward,
    which non-reentrant checkpointing verifies; the batch counter is put back afterwards.
    """
    norms = [bn for m in modules for bn in _norms(m) if bn.track_running_stats]
    saved = [(bn.momentum, bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None)
             for bn in norms]
    for bn in norms:
        bn.momentum = 0.0
    try:
        yield
    finally:
        for bn, (momentum, count) in zip(norms, saved):
            bn.momentum = momentum
            if count is not None:
                with torch.no_grad():
                    bn.num_batches_tracked.copy_(count)


def _checkpointed(fn: Callable, modules: list[nn.Module], *args, **kwargs):
    def contexts():
        return contextlib.nullcontext(), frozen_bn_stats(modules)

    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts, **kwargs)


def checkpoint_module(module: nn.Module) -> None:
    """Recompute ``module``'s forward in backward; names and state_dict keys stay unchanged."""
    inner = module.forward
    module.forward = partial(_checkpointed, inner, [module])  # instance attribute shadows the method


def checkpoint_segments(stage: nn.Module, splits: list[int]) -> None:
    """Run the blocks of a sequential ``stage`` as checkpointed segments ending at ``splits``."""
    if not isinstance(stage, nn.Sequential):
        raise TypeError(f"segment checkpointing needs a sequential stage, got {type(stage).__name__}")
    blocks = list(stage)
    bounds = [0, *[min(s, len(blocks)) for s in splits]]
    if bounds[-1] < len(blocks):
        bounds.append(len(blocks))
    segments = [blocks[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]

    def run(seg, x):
        for b in seg:
            x = b(x)
        return x

    def forward(x):
        for seg in segments:
            x = _checkpointed(partial(run, seg), seg, x)
        return x

    stage.forward = forward


def _backbones(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` that exposes ``blocks()`` and ``stages()`` (trunk, BYOL target trunk...)."""
    return [m for m in model.modules() if callable(getattr(m, "blocks", None)) and callable(getattr(m, "stages", None))]


def apply_activation_checkpointing(model: nn.Module, cfg: ParallelConfig) -> None:
    for bb in _backbones(model):
        if cfg.ac == "block":
            for blk in bb.blocks():
                checkpoint_module(blk)
        elif cfg.ac == "stage":
            for st in bb.stages():
                checkpoint_module(st)
        elif cfg.ac == "segments":
            stages = bb.stages()
            if len(cfg.ac_segments) != len(stages):
                raise ValueError(f"parallel.ac_segments has {len(cfg.ac_segments)} entries, the backbone has {len(stages)} stages")
            for st, splits in zip(stages, cfg.ac_segments):
                if splits:
                    checkpoint_segments(st, splits)


# ---------------------------------------------------------------- the plain function


def parallelize(model: nn.Module, cfg: ParallelConfig, *, compute_dtype: torch.dtype = torch.float32,
                device: torch.device | None = None) -> nn.Module:
    """Apply AC, SyncBN and FSDP2/DDP to ``model`` (in place where possible); returns the module to call.

    All ranks must build ``model`` from the same seed: FSDP2 shards the local copy without
    broadcasting it, and DDP broadcasts rank 0's.
    """
    device = device or torch.device("cpu")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if cfg.ac != "none":
        apply_activation_checkpointing(model, cfg)
    if cfg.sync_bn and world > 1:
        model = convert_sync_batchnorm(model, bn_group(cfg.sync_bn_group_size), cuda=device.type == "cuda")
    model.to(device)
    if cfg.strategy == "fsdp":
        _fully_shard(model, cfg, compute_dtype)
        return model
    if cfg.strategy == "ddp":
        if world == 1:
            return model
        # per-rank buffers (unsynchronised BN stats) must not be overwritten by rank 0's on every
        # forward; syncing them once at init is harmless (every rank built the same model)
        # (forward_sync_buffers is torch 2.13's name; the pin is ==2.13.0, and it deprecates broadcast_buffers)
        keep_rank_buffers_out_of_ddp(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                   forward_sync_buffers=False)
    if world > 1:
        raise ValueError(f"parallel.strategy=none cannot train on {world} ranks; use fsdp or ddp")
    return model


def keep_rank_buffers_out_of_ddp(model: nn.Module) -> None:
    """Mark the non-persistent buffers (per-rank state in the Method contract: a rank's share of a
    memory bank) DDP-ignored: DDP broadcasts rank 0's buffers when it wraps a module, which would
    overwrite every rank's share, or fail when the shares differ in size."""
    names = [f"{prefix}.{b}" if prefix else b for prefix, m in model.named_modules()
             for b in m._non_persistent_buffers_set]
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ())) | set(names)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(ignored))


def _fully_shard(model: nn.Module, cfg: ParallelConfig, compute_dtype: torch.dtype) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if cfg.mixed_precision_params and compute_dtype != torch.float32:
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        # BatchNorm is sharded on its own so its params are gathered (and computed) in fp32
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for bn in _norms(model):
            if any(p.requires_grad for p in bn.parameters()):
                fully_shard(bn, mp_policy=fp32, reshard_after_forward=cfg.reshard_after_forward)
    else:
        policy = MixedPrecisionPolicy()
    for bb in _backbones(model):
        units = bb.blocks() if cfg.shard_unit == "block" else bb.stages()
        for unit in units:
            fully_shard(unit, mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward)
    # the root gathers what is left (stem, heads, prototypes); it is needed again right away in backward
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
