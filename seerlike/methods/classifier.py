"""Supervised fine-tuning of a pretrained backbone, and the classifier every semi-supervised stage trains.

``Classifier`` is a trunk (started from ``init``: any checkpoint, run or export dir) with
dropout and a linear head (``head``: the ``fc`` of an export ``--with-head``, the classifier a
Noisy Student teacher labels with), optionally followed by an exponential moving average of
both (``ema``: keys ``ema.backbone.*`` / ``ema.head.*``; ``seerlike.checkpoints.load_backbone``
then returns the average, the model that is evaluated). ``Finetune`` trains it with
cross-entropy on labeled images; FixMatch and the Noisy Student student (their own files)
add the unlabeled images. Backbone-versus-head learning rates and layer-wise decay are
``optim.lr_multipliers`` entries (:func:`lr_multipliers` computes them for ``--backbone-lr`` and
``--layer-decay``), so the saved config shows every LR. docs/semisup.md describes the stages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seerlike.config import ConfigError
from seerlike.methods.base import MethodBase, MethodConfig, need_backbone_dim
from seerlike.methods.common import MomentumEncoder, forward_views
from seerlike.sharded import local

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ClassifierConfig(MethodConfig):
    """Settings every classifier stage shares (fine-tuning, FixMatch, the Noisy Student student)."""

    init: str = ""
    """Pretrained trunk to start from: a checkpoint, run or export dir, or random:ARCH; empty: the backbone's own init."""
    init_head: bool = False
    """Also start the linear head from ``init``'s classifier (a fine-tuned run or an export with its head); same classes."""
    num_classes: int = 10
    """Classes of the labeled set (`seerlike finetune` / `selftrain` set it from the data)."""
    classes: list[str] = field(default_factory=list)
    """Class names in label order (set from the labeled data; a teacher's and its student's must agree)."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing on labeled images (0.1: EfficientNet / Noisy Student's code)."""
    dropout: float = 0.0
    """Dropout on the pooled features before the head."""
    ema_decay: float = 0.0
    """Exponential moving average of trunk and head kept for evaluation (0: none); export and eval use it."""

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"{self.name}.num_classes must be >= 2, got {self.num_classes}")
        if self.classes and len(self.classes) != self.num_classes:
            raise ValueError(f"{self.name}.classes names {len(self.classes)} classes but num_classes is "
                             f"{self.num_classes}")
        if self.init_head and (not self.init or self.init.startswith("random:")):
            raise ValueError(f"{self.name}.init_head needs method.init to name a trained classifier (a `seerlike "
                             f"finetune` run or an export with its head), got init {self.init!r}")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.dropout < 1 or not 0 <= self.ema_decay < 1:
            raise ValueError(f"{self.name}.label_smoothing, dropout and ema_decay must be in [0, 1)")


class Classifier(MethodBase):
    """Trunk (from ``cfg.init``) + dropout + linear ``head``, with an optional EMA copy for evaluation."""

    stage = "followup"
    needs_labels = True

    def __init__(self, cfg: ClassifierConfig, backbone: nn.Module) -> None:
        super().__init__()
        need_backbone_dim(type(self).__name__, backbone)
        self.cfg = cfg
        self.backbone = backbone
        loaded = load_trunk(backbone, cfg.init, f"method.init ({cfg.name})") if cfg.init else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(backbone.out_dim, cfg.num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        if cfg.init_head:
            self._load_head(loaded)
        # after the pretrained weights are in: the average starts from the initial model
        self.ema = MomentumEncoder(backbone=backbone, head=self.head) if cfg.ema_decay > 0 else None
        self._labels_checked = False

    @torch.no_grad()
    def _load_head(self, loaded) -> None:
        """The head of the classifier ``init`` holds, refused unless it predicts this stage's classes in order."""
        src, what = loaded.source, f"method.init ({self.cfg.name}) with method.init_head"
        if loaded.head is None:
            raise ConfigError(f"{what}: {src} has no classifier head; give a `seerlike finetune` run (or an export "
                              "made --with-head), or set method.init_head=false to start the head at random")
        if tuple(loaded.head.weight.shape) != tuple(self.head.weight.shape):
            raise ConfigError(f"{what}: {src} has a head of shape {tuple(loaded.head.weight.shape)}, this stage needs "
                              f"{tuple(self.head.weight.shape)} ({self.cfg.num_classes} classes); set "
                              "method.init_head=false or give a classifier of these classes")
        theirs = ((loaded.train_config or {}).get("method") or {}).get("classes") or []
        if theirs and self.cfg.classes and list(theirs) != list(self.cfg.classes):
            raise ConfigError(f"{what}: {src} was trained on classes {list(theirs)[:5]}... but the labeled data has "
                              f"{list(self.cfg.classes)[:5]}...; its head would predict the wrong classes")
        self.head.load_state_dict(loaded.head.state_dict())
        log.info("%s: head loaded from %s", what, src)

    def logits(self, views: list[Tensor]) -> Tensor:
        """Logits of all views' rows, view-major, from one forward per run of equal-sized views (one BN batch)."""
        return self.head(self.dropout(forward_views(self.backbone, views)))

    def check_labels(self, labels: Tensor) -> None:
        """Once (a device sync): class indices inside [0, num_classes)."""
        if self._labels_checked:
            return
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.cfg.num_classes:
            raise ValueError(f"label {hi if hi >= self.cfg.num_classes else lo} outside [0, {self.cfg.num_classes}); "
                             "set method.num_classes to the number of classes of the labeled data")
        self._labels_checked = True

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        if self.ema is not None:
            update_ema(self.ema, [self.backbone, self.head], self.cfg.ema_decay)


@torch.no_grad()
def update_ema(ema: MomentumEncoder, online: list[nn.Module], decay: float) -> None:
    """``ema := decay x ema + (1 - decay) x online`` for parameters and floating buffers (BatchNorm's running
    statistics, as TensorFlow's ExponentialMovingAverage over all model variables in FixMatch's code);
    integer buffers (BatchNorm's batch counter) are copied."""
    ema.update(online, decay)
    for t, o in zip(ema.buffers(), [b for m in online for b in m.buffers()]):
        if t.is_floating_point():
            local(t).lerp_(local(o), 1.0 - decay)
        else:
            local(t).copy_(local(o))


def load_trunk(backbone: nn.Module, spec: str, what: str):
    """Copy the trunk of ``spec`` (checkpoint, run, export dir or random:ARCH) into ``backbone`` (strict);
    returns what :func:`seerlike.checkpoints.load_backbone` loaded (its head, config, source)."""
    from seerlike.checkpoints import load_backbone

    loaded = load_backbone(spec)
    try:
        backbone.load_state_dict(loaded.model.state_dict(), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"{what} {spec} holds a {loaded.arch} trunk that does not fit this backbone (model.name); "
                          f"give a model of the same architecture ({first})") from None
    log.info("%s: trunk loaded from %s (%s, step %s)", what, loaded.source, loaded.arch, loaded.step)
    return loaded


def smoothed(target: Tensor, eps: float) -> Tensor:
    """Label smoothing of (weighted) target distributions: ``(1 - eps) t + eps sum(t) / K`` per row."""
    if eps == 0:
        return target
    return target * (1 - eps) + eps * target.sum(1, keepdim=True) / target.shape[1]


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-row ``-sum_k t_k log softmax(logits)_k`` (a row's target may sum to its weight instead of 1)."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(1)


# ---------------------------------------------------------------- fine-tuning


class Finetune(Classifier):
    """Supervised fine-tuning: cross-entropy with label smoothing, averaged over the views."""

    @dataclass(kw_only=True)
    class Config(ClassifierConfig):
        name: Literal["finetune"] = "finetune"
        """Supervised fine-tuning of a pretrained trunk + linear head on labeled images (`seerlike finetune`)."""

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if labels is None:
            raise ValueError("finetune needs labeled images: a class-folder tree or a path,label CSV as --data")
        self.check_labels(labels)
        labels = labels.to(views[0].device, non_blocking=True)
        logits = self.logits(views).float()
        target = labels.repeat(len(views))
        loss = F.cross_entropy(logits, target, label_smoothing=self.cfg.label_smoothing)
        acc = (logits.argmax(1) == target).float().mean()
        return loss, {"acc": 100.0 * acc.detach()}


# ---------------------------------------------------------------- learning rates per layer


def lr_multipliers(backbone: nn.Module, backbone_lr: float = 1.0, layer_decay: float = 1.0) -> dict[str, float]:
    """``optim.lr_multipliers`` entries (method parameter-name prefixes) for a trunk LR and layer-wise decay.

    The head keeps the base LR. The trunk gets ``backbone_lr`` times it; with ``layer_decay``
    d < 1 the last residual block gets ``backbone_lr``, the one before ``backbone_lr x d``, ...,
    the stem (and anything else of the trunk) ``backbone_lr x d^L`` for L blocks (BEiT's rule,
    with residual blocks as layers). Empty when both are 1.
    """
    if not backbone_lr > 0 or not 0 < layer_decay <= 1:
        raise ConfigError(f"the backbone LR multiplier must be > 0 and the layer decay in (0, 1], got "
                          f"{backbone_lr}, {layer_decay}")
    if backbone_lr == 1.0 and layer_decay == 1.0:
        return {}
    if layer_decay == 1.0:
        return {"backbone": backbone_lr}
    names = {id(m): n for n, m in backbone.named_modules()}
    blocks = backbone.blocks()
    out = {"backbone": backbone_lr * layer_decay ** len(blocks)}
    for depth, block in enumerate(reversed(blocks)):
        out[f"backbone.{names[id(block)]}"] = backbone_lr * layer_decay ** depth
    return out
