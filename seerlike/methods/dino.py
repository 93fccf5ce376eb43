"""DINO (Caron et al. 2021): self-distillation with no labels, a student matching an EMA teacher.

Student = trunk + :class:`DINOHead` (an MLP, an L2-normalised bottleneck, a weight-normalised
layer to ``out_dim`` scores). The teacher, a copy of both, is the submodule ``teacher`` with
requires_grad False (checkpoints carry it, no optimizer sees it) and follows the student by an
EMA whose rate rises from ``momentum_teacher`` to 1 by cosine over the run. The teacher sees
the two global views, the student every view; the loss is the cross-entropy between the
teacher's centred, sharpened softmax on global view i and the student's softmax on every view
j != i. Collapse is kept away by the two opposing terms of the teacher's target: the centre
(an EMA of the teacher's mean output over the GLOBAL batch) keeps one dimension from
dominating, the low teacher temperature keeps the output from going uniform.

The centre is a persistent buffer, all-reduced so that it is identical on every rank; the EMA
runs elementwise on the local tensors, so it works unchanged on FSDP2 shards (DTensors with
the same placements), as BYOL's does. The centre moves once per forward: with gradient
accumulation, once per micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from seerlike.methods.base import MethodBase, MethodConfig, need_backbone_dim
from seerlike.methods.common import cosine_to_one, MomentumEncoder, forward_views, world_and_rank
from seerlike.sharded import local, squared_norms

N_GLOBAL = 2
"""Views the teacher sees: the first two (DINO's global crops)."""


class WeightNormLinear(nn.Module):
    """A bias-free Linear whose rows are ``g * v / ||v||`` (``nn.utils.weight_norm`` over dim 0).

    With ``learn_norm`` False, ``g`` is the constant 1 (DINO's ``norm_last_layer``): every row
    has unit norm, so no output dimension can win by growing its weights. The parameter names
    ``weight_v`` / ``weight_g`` are those of DINO's checkpoints.
    """

    def __init__(self, in_dim: int, out_dim: int, learn_norm: bool) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1)) if learn_norm else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # the direction as nn.Linear initialises its weight; the norm starts at 1 (DINOHead fills g with 1)
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        if self.weight_g is not None:
            self.weight_g.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        w = F.normalize(self.weight_v, dim=1)
        if self.weight_g is not None:
            w = w * self.weight_g
        return F.linear(x, w)


class DINOHead(nn.Module):
    """``num_layers`` Linears (GELU between, BN optional) to ``bottleneck_dim``, L2 norm, then ``last_layer``."""

    def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int, bottleneck_dim: int, num_layers: int,
                 use_bn: bool, norm_last_layer: bool) -> None:
        super().__init__()
        widths = [in_dim, *[hidden_dim] * (num_layers - 1), bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                if use_bn:
                    layers.append(nn.BatchNorm1d(b))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, learn_norm=not norm_last_layer)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DINO's init: truncated normal (std 0.02, cut at +-2) for the MLP's weights, zero biases."""
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def dino_loss(student: Tensor, teacher_probs: Tensor, n_views: int, student_temp: float) -> Tensor:
    """Mean over (teacher global view i, student view j != i) of the batch-mean cross-entropy H(t_i, s_j).

    ``student`` are the raw scores of all views (view-major, ``n_views`` x B rows), ``teacher_probs``
    the teacher's target distributions of the global views (N_GLOBAL x B rows). The sum over
    j != i is the sum over all j minus the j = i term, two products instead of 2(V - 1).
    """
    logp = F.log_softmax(student.float() / student_temp, dim=-1).chunk(n_views)
    total_logp = torch.stack(logp).sum(0)
    loss = student.new_zeros((), dtype=torch.float32)
    for i, q in enumerate(teacher_probs.chunk(N_GLOBAL)):
        loss = loss - (q * (total_logp - logp[i])).sum(-1).mean()
    return loss / (N_GLOBAL * (n_views - 1))


class DINO(MethodBase):
    """DINO over a backbone returning pooled features ``(B, backbone.out_dim)``.

    Defaults are the official code's (facebookresearch/dino, main_dino.py), whose README trains
    ResNet-50 with them plus SGD, LR 0.03 per 256, weight decay 1e-4 and crop scales 0.14 / 0.05-0.14.
    """

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["dino"] = "dino"
        """DINO (Caron et al. 2021); defaults from main_dino.py."""
        out_dim: int = 65536
        """Output width K of the head: the number of dimensions of the teacher and student softmax."""
        hidden_dim: int = 2048
        """Width of the head's hidden layers."""
        bottleneck_dim: int = 256
        """Width of the L2-normalised bottleneck before the weight-normalised last layer."""
        num_layers: int = 3
        """Linear layers of the head's MLP before the bottleneck normalisation (hidden layers + 1)."""
        use_bn_in_head: bool = False
        """BatchNorm after each hidden Linear of the head (main_dino.py: off, also for ResNet-50)."""
        norm_last_layer: bool = True
        """Fix the norm of the last layer's rows at 1 (weight_g frozen); False learns it (less stable)."""
        momentum_teacher: float = 0.996
        """Base EMA rate of the teacher; annealed to 1 by cosine over the run."""
        student_temp: float = 0.1
        """Temperature of the student's softmax."""
        teacher_temp: float = 0.04
        """Temperature of the teacher's softmax after the warm-up (above 0.07 is unstable per main_dino.py)."""
        warmup_teacher_temp: float = 0.04
        """Teacher temperature at step 0, raised linearly to teacher_temp over warmup_teacher_temp_steps."""
        warmup_teacher_temp_steps: int = 0
        """Steps of the linear teacher-temperature warm-up (main_dino.py: 0 by default; the paper's ViTs: 30 epochs)."""
        center_momentum: float = 0.9
        """EMA rate of the centre subtracted from the teacher's scores."""
        freeze_last_layer_steps: int = 2502
        """The last layer gets no gradient for this many first steps (main_dino.py: 1 epoch; 2502 at batch 512)."""
        clip_grad: float = 3.0
        """Cap on each parameter's gradient L2 norm (0: off); applied to the gradients as the backward leaves
        them, so with precision.dtype=fp16 (loss-scaled gradients) set 0 or use bf16."""

        def __post_init__(self) -> None:
            if min(self.out_dim, self.hidden_dim, self.bottleneck_dim, self.num_layers) < 1:
                raise ValueError("out_dim, hidden_dim, bottleneck_dim and num_layers must be >= 1")
            for name in ("momentum_teacher", "center_momentum"):
                if not 0.0 <= getattr(self, name) <= 1.0:
                    raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
            if min(self.student_temp, self.teacher_temp, self.warmup_teacher_temp) <= 0:
                raise ValueError("student_temp, teacher_temp and warmup_teacher_temp must be > 0")
            if min(self.warmup_teacher_temp_steps, self.freeze_last_layer_steps) < 0 or self.clip_grad < 0:
                raise ValueError("warmup_teacher_temp_steps, freeze_last_layer_steps and clip_grad must be >= 0")

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        if len(sizes) < N_GLOBAL or sizes[0] != sizes[1]:
            raise ValueError(f"dino needs two global views of one size first, then any local views; the data config "
                             f"makes {sizes}: put a view group with count 2 first in data.augment.views")

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__()
        need_backbone_dim("DINO", backbone)
        self.cfg = cfg
        self.backbone = backbone
        self.head = DINOHead(backbone.out_dim, cfg.out_dim, hidden_dim=cfg.hidden_dim,
                             bottleneck_dim=cfg.bottleneck_dim, num_layers=cfg.num_layers,
                             use_bn=cfg.use_bn_in_head, norm_last_layer=cfg.norm_last_layer)
        self.teacher = MomentumEncoder(backbone=backbone, head=self.head)
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        # the step the next forward belongs to (set by on_step_end): the teacher temperature's clock
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ schedules

    def teacher_temp(self, step: int | Tensor) -> float | Tensor:
        """main_dino.py's schedule per step: linspace(warmup_teacher_temp, teacher_temp, W)[step], then teacher_temp."""
        cfg = self.cfg
        w = cfg.warmup_teacher_temp_steps
        if isinstance(step, Tensor):  # on the device, no sync
            frac = (step.float() / max(w - 1, 1)).clamp(max=1.0) if w else torch.ones_like(step, dtype=torch.float32)
        else:
            frac = min(step / max(w - 1, 1), 1.0) if w else 1.0
        return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * frac

    def momentum(self, step: int, max_steps: int) -> float:
        """Teacher EMA rate after step ``step`` (0-based) of ``max_steps``: 1 - (1 - m0)(cos(pi k / K) + 1) / 2."""
        return cosine_to_one(self.cfg.momentum_teacher, step, max_steps)

    # ------------------------------------------------------------------ forward

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if len(views) < N_GLOBAL or views[0].shape != views[1].shape:
            raise ValueError(f"DINO needs two global views of one shape first, got {[tuple(v.shape) for v in views]}; "
                             f"put a view group with count 2 first in data.augment.views")
        bs = views[0].shape[0]
        if any(v.shape[0] != bs for v in views):
            raise ValueError(f"all views need the same batch size, got {[v.shape[0] for v in views]}")
        cfg = self.cfg
        with torch.no_grad():
            t_scores = forward_views(self.teacher, views[:N_GLOBAL]).float()
            temp = self.teacher_temp(self.step)
            t_logp = F.log_softmax((t_scores - self.center) / temp, dim=-1)
            t_probs = t_logp.exp()
            entropy = -(t_probs * t_logp).sum(-1).mean()
            self._update_center(t_scores)
        s_scores = self.head(forward_views(self.backbone, views))
        loss = dino_loss(s_scores, t_probs, len(views), cfg.student_temp)
        return loss, {"teacher_temp": temp.detach(), "teacher_entropy": entropy}

    @torch.no_grad()
    def _update_center(self, t_scores: Tensor) -> None:
        """center = m center + (1 - m) mean of the teacher's scores over the global batch (all ranks)."""
        world, _ = world_and_rank()
        batch_sum = t_scores.sum(0, keepdim=True)
        if world > 1:
            dist.all_reduce(batch_sum)
        batch_mean = batch_sum / (t_scores.shape[0] * world)
        self.center.mul_(self.cfg.center_momentum).add_(batch_mean, alpha=1 - self.cfg.center_momentum)

    # ------------------------------------------------------------------ teacher

    # ------------------------------------------------------------------ hooks

    @torch.no_grad()
    def reset_state(self) -> None:
        """Teacher := student (parameters and buffers), zero centre, step 0."""
        self.teacher.copy_from([self.backbone, self.head])
        self.center.zero_()
        self.step.zero_()

    @torch.no_grad()
    def on_after_backward(self, step: int) -> None:
        """Clip each parameter's gradient to norm clip_grad, then drop the last layer's while it is frozen."""
        if self.cfg.clip_grad > 0:
            params = [p for p in self.parameters() if p.grad is not None]
            if params:
                norms = squared_norms([p.grad for p in params]).sqrt()
                coefs = (self.cfg.clip_grad / (norms + 1e-6)).clamp(max=1.0)  # x1 leaves a gradient bit for bit
                torch._foreach_mul_([local(p.grad) for p in params], list(coefs.unbind()))
        if step < self.cfg.freeze_last_layer_steps:
            for p in self.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """EMA of the teacher towards the student, then advance the temperature's step counter."""
        self.teacher.update([self.backbone, self.head], self.momentum(step, max_steps))
        self.step.fill_(step + 1)
