"""Optimizers (SGD, LARC(SGD), LARS, AdamW) with bias/norm exclusion, and the LR schedule.

LARC and LARS are ``torch.optim.SGD`` subclasses that rescale the gradients before the
plain SGD step, so their state dicts are ordinary SGD state (DCP's optimizer state dict
helpers work on them). Parameter and gradient norms are taken over the WHOLE parameter:
for a sharded DTensor (FSDP2), local squared norms are summed over the mesh dimensions
the tensor is sharded on, one all-reduce for all parameters, so N ranks == 1 rank.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from seerlike.sharded import local, squared_norms

log = logging.getLogger(__name__)

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


@dataclass(kw_only=True)
class OptimConfig:
    name: Literal["sgd", "larc", "lars", "adamw"] = "larc"
    """Optimizer: sgd (momentum), larc (SGD wrapped by LARC, SwAV/SEER), lars (BYOL), adamw."""
    lr: float = 0.3
    """Peak learning rate per 256 images; the LR used is lr x global_batch / 256."""
    final_lr: float = 0.0
    """Learning rate per 256 images reached at the end of the cosine decay (scaled like lr)."""
    warmup_lr: float = 0.0
    """Learning rate per 256 images at step 0, rising linearly to lr over warmup_steps."""
    warmup_steps: int = 0
    """Linear warmup steps before the cosine decay."""
    momentum: float = 0.9
    """SGD / LARC / LARS momentum."""
    nesterov: bool = False
    """Nesterov momentum (sgd, larc)."""
    weight_decay: float = 1e-6
    """Weight decay (decoupled for adamw) on weights; bias and norm parameters get none."""
    exclude_bias_and_norm: bool = True
    """Exclude biases and normalisation parameters from weight decay and from LARC/LARS adaptation."""
    trust_coefficient: float = 0.001
    """LARC / LARS trust coefficient (eta)."""
    larc_clip: bool = False
    """LARC clip mode (local LR capped at the global LR) instead of scale mode; SwAV/SEER use scale."""
    eps: float = 1e-8
    """LARC denominator epsilon; AdamW epsilon."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    """LR multiplier per parameter-name prefix of the method, e.g. {predictor: 10.0}; the longest matching prefix wins."""
    fixed_lr: tuple[str, ...] = ()
    """Parameter-name prefixes whose LR stays at the peak (x multiplier) with no warmup or decay (SimSiam's predictor)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0 (LR per 256 images), got {self.lr}")
        if self.final_lr < 0 or self.warmup_lr < 0:
            raise ValueError(f"optim.final_lr and optim.warmup_lr must be >= 0, got {self.final_lr}, {self.warmup_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"optim.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0 or self.trust_coefficient <= 0 or self.eps < 0:
            raise ValueError("optim.weight_decay and optim.eps must be >= 0 and optim.trust_coefficient > 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must lie in [0, 1), got {self.betas}")
        bad = {k: v for k, v in self.lr_multipliers.items() if not v > 0}
        if bad:
            raise ValueError(f"optim.lr_multipliers must be > 0, got {bad}")


# ---------------------------------------------------------------- LARC / LARS


class _AdaptiveSGD(torch.optim.SGD):
    """SGD whose gradients are rescaled per parameter (groups with ``adapt`` False are left alone)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, *,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, nesterov: bool = False) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        self.trust_coefficient = trust_coefficient
        self.eps = eps

    def add_param_group(self, param_group: dict) -> None:
        param_group.setdefault("adapt", True)
        super().add_param_group(param_group)

    def _rescale(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        saved = []
        for group in self.param_groups:
            saved.append(group["weight_decay"])
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._rescale(group, params, [p.grad for p in params])
            group["weight_decay"] = 0.0  # folded into the gradient by _rescale
        try:
            super().step()
        finally:
            for group, wd in zip(self.param_groups, saved):
                group["weight_decay"] = wd
        return loss


class LARC(_AdaptiveSGD):
    """LARC (as in NVIDIA apex, used by SwAV and SEER) around SGD with momentum.

    Per parameter: ``ratio = trust * |p| / (|g| + wd |p| + eps)``; scale mode multiplies the
    decayed gradient by ``ratio``; clip mode by ``min(ratio / lr, 1)``. As in apex, a
    parameter whose norm or gradient norm is zero is left unscaled and undecayed.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, *,
                 trust_coefficient: float = 0.001, clip: bool = False, eps: float = 1e-8,
                 nesterov: bool = False) -> None:
        super().__init__(params, lr, momentum, weight_decay, trust_coefficient=trust_coefficient,
                         eps=eps, nesterov=nesterov)
        self.clip = clip

    def _rescale(self, group, params, grads):
        wd = group["weight_decay"]
        if not group["adapt"]:
            if wd:
                torch._foreach_add_([local(g) for g in grads], [local(p) for p in params], alpha=wd)
            return
        norms = squared_norms([*params, *grads]).sqrt()
        pn, gn = norms[: len(params)], norms[len(params):]
        ratio = self.trust_coefficient * pn / (gn + pn * wd + self.eps)
        if self.clip:
            ratio = torch.clamp(ratio / group["lr"], max=1.0)
        live = (pn != 0) & (gn != 0)
        scale = torch.where(live, ratio, torch.ones_like(ratio))
        decay = torch.where(live, torch.full_like(ratio, wd), torch.zeros_like(ratio))
        lg = [local(g) for g in grads]
        lp = [local(p) for p in params]
        if wd:
            torch._foreach_add_(lg, torch._foreach_mul(lp, list(decay.unbind())))
        torch._foreach_mul_(lg, list(scale.unbind()))


class LARS(_AdaptiveSGD):
    """LARS as in BYOL: ``g' = trust * |p| / |g + wd p| * (g + wd p)`` (ratio 1 where a norm is 0), then momentum."""

    def _rescale(self, group, params, grads):
        wd = group["weight_decay"]
        lg = [local(g) for g in grads]
        lp = [local(p) for p in params]
        if wd:
            torch._foreach_add_(lg, lp, alpha=wd)
        if not group["adapt"]:
            return
        norms = squared_norms([*params, *grads]).sqrt()
        pn, un = norms[: len(params)], norms[len(params):]
        ratio = torch.where((pn > 0) & (un > 0), self.trust_coefficient * pn / un.clamp_min(1e-30), torch.ones_like(pn))
        torch._foreach_mul_(lg, list(ratio.unbind()))


# ---------------------------------------------------------------- building


def _excluded(model: nn.Module) -> set[int]:
    """ids of biases and normalisation parameters (anything 1-D, plus every parameter of a norm layer)."""
    out = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.ndim <= 1 or isinstance(module, _NORMS):
                out.add(id(p))
    return out


def _longest_prefix(name: str, prefixes) -> str | None:
    hits = [p for p in prefixes if name == p or name.startswith(p.rstrip(".") + ".")]
    return max(hits, key=len) if hits else None


def param_groups(cfg: OptimConfig, model: nn.Module) -> list[dict]:
    """Trainable parameters split into ``decay`` (weight decay, adapted) and ``no_decay`` (neither),
    and further by LR multiplier / fixed LR (``optim.lr_multipliers``, ``optim.fixed_lr``).

    Every group carries ``lr_mult`` and ``fixed``, read by :meth:`LRSchedule.apply`.
    """
    excluded = _excluded(model) if cfg.exclude_bias_and_norm else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for prefix in [*cfg.lr_multipliers, *cfg.fixed_lr]:
        if not any(_longest_prefix(n, [prefix]) for n, _ in named):
            raise ValueError(f"optim: no trainable parameter of the method is named {prefix!r}* "
                             f"(top-level names: {sorted({n.split('.')[0] for n, _ in named})})")
    groups: dict[tuple, dict] = {}
    for n, p in named:
        decay = id(p) not in excluded
        mult_key = _longest_prefix(n, cfg.lr_multipliers)
        mult = cfg.lr_multipliers[mult_key] if mult_key else 1.0
        fixed = _longest_prefix(n, cfg.fixed_lr) is not None
        key = (decay, mult, fixed)
        if key not in groups:
            suffix = "".join([f"@x{mult:g}" if mult != 1.0 else "", "@fixed" if fixed else ""])
            groups[key] = {"name": ("decay" if decay else "no_decay") + suffix, "params": [],
                           "weight_decay": cfg.weight_decay if decay else 0.0, "adapt": decay,
                           "lr_mult": mult, "fixed": fixed}
        groups[key]["params"].append(p)
    order = sorted(groups, key=lambda k: (not k[0], k[2], k[1]))  # decay first, as before
    return [groups[k] for k in order]


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer over ``model``'s trainable parameters (build it AFTER sharding).

    Its ``lr`` is a placeholder: set it every step with :meth:`LRSchedule.apply`.
    """
    groups = param_groups(cfg, model)
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "larc":
        return LARC(groups, lr=cfg.lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient,
                    clip=cfg.larc_clip, eps=cfg.eps, nesterov=cfg.nesterov)
    if cfg.name == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    raise ValueError(f"unknown optimizer {cfg.name!r}; choose sgd, larc, lars or adamw")


# ---------------------------------------------------------------- schedule


class LRSchedule:
    """Step -> LR: linear warmup from warmup_lr to lr, then cosine to final_lr at ``max_steps``.

    All three are per 256 images and scaled by ``global_batch / 256``.
    """

    def __init__(self, cfg: OptimConfig, global_batch: int, max_steps: int) -> None:
        if global_batch <= 0 or max_steps <= 0:
            raise ValueError(f"LRSchedule needs global_batch > 0 and max_steps > 0, got {global_batch}, {max_steps}")
        if cfg.warmup_steps > max_steps:
            raise ValueError(f"optim.warmup_steps={cfg.warmup_steps} exceeds max_steps={max_steps}; lower it")
        scale = global_batch / 256
        self.peak, self.final, self.start = cfg.lr * scale, cfg.final_lr * scale, cfg.warmup_lr * scale
        self.warmup, self.max_steps = cfg.warmup_steps, max_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.start + (self.peak - self.start) * step / self.warmup
        if self.max_steps == self.warmup:
            return self.peak
        t = min(step - self.warmup, self.max_steps - self.warmup) / (self.max_steps - self.warmup)
        return self.final + (self.peak - self.final) * (1 + math.cos(math.pi * t)) / 2

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's LR for ``step`` (x its ``lr_mult``; the peak for ``fixed`` groups); returns the base LR."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = (self.peak if group.get("fixed") else lr) * group.get("lr_mult", 1.0)
        return lr

