"""Distillation of a trained teacher into any student backbone, on unlabeled images.

Targets (``method.targets``):

- ``logits``: the teacher's classifier (a ClusterFit checkpoint's head, an export's ``fc``)
  gives soft targets; the student's linear head matches them with KL at a temperature
  (Hinton et al.), scaled by T^2 so the gradient size does not depend on T.
- ``prototypes`` (SwAV-style): the teacher is a SwAV checkpoint; its prototype scores of
  the teacher view go through Sinkhorn (or a softmax) into assignments, and the student
  (its own projection head + prototypes) predicts them with SwAV's swapped-prediction loss.
- ``none``: feature distillation only.

``feature_weight > 0`` adds feature distillation: a linear map of the student's pooled
features regresses the teacher's (2 - 2 cos, as BYOL). Noisy Student: the teacher sees the
first view(s) (weak augmentation), the student the others (strong augmentation, set in
``data.augment``), with ``dropout`` before its heads and stochastic depth (``model.drop_path``).

A teacher whose trunk takes the lightness alone (``in_channels`` 1: a colorization checkpoint)
sees what it was trained on: the views' normalisation (``method.mean``/``std``, equal to
``data.augment``'s) undone, converted to Lab and centred as colorization does
(``seerlike.methods.pretext_ops.lightness_input``); the student still sees the RGB views.

The teacher is frozen and kept OUT of the module's state dict (it is an input, like the
data): checkpoints hold only the student and its heads, the optimizer never sees the
teacher, and ``parallelize`` does not shard it (every rank holds a full copy).

`seerlike distill --teacher T --student ARCH --data SHARDS --run-dir DIR`
(:mod:`seerlike.commands.distill`) is `seerlike train` with a distillation recipe and those
fields filled in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seerlike.config import ConfigError
from seerlike.data.augment import IMAGENET_MEAN, IMAGENET_STD
from seerlike.methods.base import MethodBase, MethodConfig, need_backbone_dim
from seerlike.methods.heads import mlp

log = logging.getLogger(__name__)


class Teacher:
    """A frozen network giving pooled features and (optionally) target logits / prototype scores."""

    def __init__(self, spec: str, targets: str, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD):
        from seerlike.checkpoints import load_backbone

        self.loaded = load_backbone(spec)
        self.targets = targets
        self.mean, self.std = tuple(mean), tuple(std)  # the views' normalisation, undone for a lightness teacher
        if self.in_channels not in (1, 3):
            raise ConfigError(f"teacher {self.loaded.source} takes {self.in_channels} input channels; distillation "
                              "feeds RGB views (3 channels) or their lightness (1 channel, colorization)")
        self.swav = None
        self.net: nn.Module = self.loaded.model
        if targets == "logits" and self.loaded.head is None:
            raise ConfigError(f"teacher {spec} has no classifier head for targets=logits; use a ClusterFit "
                              "checkpoint / an export with --with-head, or targets=prototypes (SwAV) / none")
        if targets == "prototypes":
            self.swav = self._swav()
            self.net = self.swav
        elif self.loaded.head is not None:
            self.net = nn.ModuleDict({"trunk": self.loaded.model, "head": self.loaded.head})
        self.net.eval().requires_grad_(False)

    def _swav(self):
        from seerlike import config as configlib
        from seerlike.methods.swav import SwAV

        rest = self.loaded.method_state
        method_cfg = ((self.loaded.train_config or {}).get("method") or {})
        if "prototypes.weight" not in rest or method_cfg.get("name") != "swav":
            raise ConfigError(f"teacher {self.loaded.source} is not a SwAV checkpoint (no prototypes); "
                              "targets=prototypes needs one")
        swav = SwAV(configlib.from_dict(MethodConfig, method_cfg, prefix="method"), self.loaded.model)
        state = {f"backbone.{k}": v for k, v in self.loaded.model.state_dict().items()}
        swav.load_state_dict({**state, **rest}, strict=True)
        return swav

    @property
    def num_targets(self) -> int:
        if self.targets == "logits":
            return self.loaded.head.out_features
        if self.targets == "prototypes":
            return self.swav.cfg.num_prototypes
        return 0

    @property
    def out_dim(self) -> int:
        return int(self.loaded.model.out_dim)

    @property
    def in_channels(self) -> int:
        """Image channels the teacher's trunk takes: 3 (RGB) or 1 (lightness, colorization)."""
        return int(getattr(self.loaded.model, "in_channels", 3))

    def inputs(self, x: Tensor) -> Tensor:
        """The normalised RGB views ``x`` as the teacher's trunk takes them: unchanged, or their lightness."""
        if self.in_channels == 3:
            return x
        from seerlike.methods.pretext_ops import lightness_input, srgb_to_lab, unnormalise

        return lightness_input(srgb_to_lab(unnormalise(x, self.mean, self.std))).to(x.dtype)

    @torch.no_grad()
    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(pooled features, target logits or prototype scores or None)."""
        p = next(self.net.parameters())
        if p.device != x.device:
            self.net.to(x.device)
        feats = self.loaded.model(self.inputs(x))
        if self.targets == "logits":
            return feats, self.loaded.head(feats)
        if self.targets == "prototypes":
            z = self.swav.projection(feats)
            if self.swav.cfg.normalize:
                z = F.normalize(z, dim=1)
            return feats, self.swav.prototypes(z)
        return feats, None


class Distill(MethodBase):
    """Student backbone + heads trained to match a frozen teacher."""

    stage = "followup"

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["distill"] = "distill"
        """Distillation of a frozen teacher into the student backbone (model.name)."""
        teacher: str = ""
        """The teacher: a checkpoint dir, run dir or export dir (`seerlike distill --teacher`)."""
        targets: Literal["logits", "prototypes", "none"] = "logits"
        """What the student predicts: the teacher's classifier logits (KL), its SwAV prototype assignments, or nothing."""
        temperature: float = 2.0
        """KL temperature applied to teacher and student logits (targets=logits)."""
        swav_temperature: float = 0.1
        """Softmax temperature of the student's prototype scores (targets=prototypes; SwAV: 0.1)."""
        assignment: Literal["sinkhorn", "softmax"] = "sinkhorn"
        """How the teacher's prototype scores become targets: Sinkhorn codes (as in SwAV) or softmax(scores / swav_temperature)."""
        epsilon: float = 0.05
        """Sinkhorn entropy regularisation for the teacher's assignments."""
        sinkhorn_iters: int = 3
        """Sinkhorn iterations for the teacher's assignments."""
        feature_weight: float = 0.0
        """Weight of feature distillation (2 - 2 cos between a linear map of student features and the teacher's)."""
        dropout: float = 0.0
        """Dropout on the student's pooled features before its heads (Noisy Student: 0.5)."""
        teacher_views: int = 1
        """The first N views go to the teacher (weak augmentation); the student learns on the rest (all views if only N)."""
        mean: tuple[float, float, float] = IMAGENET_MEAN
        """The views' normalisation mean: must equal data.augment.mean (undone for a lightness teacher: colorization)."""
        std: tuple[float, float, float] = IMAGENET_STD
        """The views' normalisation std: must equal data.augment.std."""

        def __post_init__(self) -> None:
            if self.temperature <= 0 or self.swav_temperature <= 0 or self.epsilon <= 0:
                raise ValueError("distill temperature, swav_temperature and epsilon must be > 0")
            if self.targets == "none" and self.feature_weight <= 0:
                raise ValueError("distill.targets=none needs distill.feature_weight > 0 (nothing to learn otherwise)")
            if self.feature_weight < 0 or not 0 <= self.dropout < 1 or self.teacher_views < 1:
                raise ValueError("distill.feature_weight >= 0, dropout in [0, 1) and teacher_views >= 1 are required")

    def __init__(self, cfg: Config, backbone: nn.Module, teacher: Teacher | None = None) -> None:
        super().__init__()
        if not cfg.teacher and teacher is None:
            raise ConfigError("set method.teacher (or --teacher) to a checkpoint, run or export dir")
        need_backbone_dim("Distill", backbone)
        self.cfg = cfg
        self.backbone = backbone
        # a list, not an attribute: the teacher stays out of state_dict, parameters() and .to()
        self._teacher = [teacher or Teacher(cfg.teacher, cfg.targets, cfg.mean, cfg.std)]
        t = self._teacher[0]
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.targets == "logits":
            self.head = nn.Linear(backbone.out_dim, t.num_targets)
        elif cfg.targets == "prototypes":
            head_dims = tuple(t.swav.cfg.head_dims)
            self.projection = mlp(backbone.out_dim, head_dims)
            self.prototypes = nn.Linear(head_dims[-1] if head_dims else backbone.out_dim, t.num_targets, bias=False)
            with torch.no_grad():
                self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        if cfg.feature_weight > 0:
            self.feature_map = nn.Linear(backbone.out_dim, t.out_dim)

    @property
    def teacher(self) -> Teacher:
        return self._teacher[0]

    def student_outputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(pooled features, logits or prototype scores / temperature or None) of the student."""
        feats = self.backbone(x)
        h = self.dropout(feats)
        if self.cfg.targets == "logits":
            return feats, self.head(h)
        if self.cfg.targets == "prototypes":
            z = F.normalize(self.projection(h), dim=1)
            return feats, self.prototypes(z)
        return feats, None

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        n_t = min(cfg.teacher_views, len(views))
        student_views = views[n_t:] or views[:n_t]
        t_feats, t_out = self.teacher(torch.cat(views[:n_t]))
        bs = views[0].shape[0]
        loss = views[0].new_zeros((), dtype=torch.float32)
        agree, terms = loss.new_zeros(()), 0
        target = None
        if cfg.targets == "logits":
            target = F.softmax(t_out.float() / cfg.temperature, dim=1)
        elif cfg.targets == "prototypes":
            if cfg.assignment == "sinkhorn":
                from seerlike.methods.swav import sinkhorn

                target = torch.cat([sinkhorn(s, cfg.epsilon, cfg.sinkhorn_iters) for s in t_out.split(bs)])
            else:
                target = F.softmax(t_out.float() / cfg.swav_temperature, dim=1)
        for v in student_views:
            s_feats, s_out = self.student_outputs(v)
            for i in range(n_t):  # every teacher view supervises every student view
                tgt = target[i * bs:(i + 1) * bs] if target is not None else None
                if cfg.targets == "logits":
                    logp = F.log_softmax(s_out.float() / cfg.temperature, dim=1)
                    loss = loss + F.kl_div(logp, tgt, reduction="batchmean") * cfg.temperature ** 2
                elif cfg.targets == "prototypes":
                    logp = F.log_softmax(s_out.float() / cfg.swav_temperature, dim=1)
                    loss = loss - (tgt * logp).sum(dim=1).mean()
                if cfg.feature_weight > 0:
                    tf = t_feats[i * bs:(i + 1) * bs].float()
                    cos = F.cosine_similarity(self.feature_map(s_feats).float(), tf, dim=1)
                    loss = loss + cfg.feature_weight * (2 - 2 * cos).mean()
                if tgt is not None:
                    agree += (s_out.argmax(1) == tgt.argmax(1)).float().mean()
                terms += 1
        # a tensor, not a float: converting here would sync the device every step
        metrics = {"agreement": 100.0 * agree.detach() / terms} if target is not None else {}
        return loss / terms, metrics

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        if self.cfg.targets == "prototypes":
            w = self.prototypes.weight
            local = w.to_local() if hasattr(w, "to_local") else w
            local.copy_(F.normalize(local, dim=1))


@torch.no_grad()
def agreement(student: nn.Module, teacher: Teacher, x: Tensor, batch_size: int = 256) -> float:
    """% of images on which the student's and the teacher's top classes / prototypes agree."""
    hits = 0
    for chunk in x.split(batch_size):
        _, t = teacher(chunk)
        _, s = student.student_outputs(chunk)
        hits += int((s.argmax(1) == t.argmax(1)).sum())
    return 100.0 * hits / x.shape[0]
