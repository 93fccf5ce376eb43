"""FixMatch (Sohn et al. 2020): a confident prediction on a weak view is the target of a strong view.

Each step sees a labeled batch of B images (weak view: flip + shift) and an unlabeled batch of
``unlabeled_ratio`` x B images (mu; a weak and a strong view each). All 2 mu B + B rows go
through the network in one forward, as in the official code (BatchNorm statistics over all):

    loss = CE(labeled logits, labels) + lambda_u * mean_b [max p_b >= tau] CE(strong logits_b, argmax p_b)

with ``p_b = softmax(weak logits_b)`` held constant (no gradient) and the mean over all mu B
unlabeled images, masked or not. An exponential moving average of the model (decay 0.999; the
CPU recipe ``fixmatch_tiny`` uses 0.99, sized to its few thousand steps) is the model that is
evaluated and exported (``Classifier.ema``).

The views arrive as ``[labeled weak, unlabeled weak, unlabeled strong]``: `seerlike selftrain
--method fixmatch` adds the unlabeled stream (``unlabeled``, its views ``[data view, strong]``)
to the labeled one (``data.source``, ``data.augment``). Defaults are the paper's CIFAR-10
settings (Sohn et al. 2020, section 4 and appendix; google-research/fixmatch ``fixmatch.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from seerlike.data.augment import ViewConfig
from seerlike.data.randaugment import RandAugmentConfig
from seerlike.methods.base import need_views
from seerlike.methods.classifier import Classifier, ClassifierConfig


def weak_view(size: int) -> ViewConfig:
    """FixMatch's weak augmentation: the whole image, a horizontal flip (p 0.5), a shift of up to 12.5% (reflect padding)."""
    return ViewConfig(count=1, size=size, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.5, jitter_p=0.0,
                      grayscale_p=0.0, blur_p=0.0, randaugment=RandAugmentConfig(translate=0.125))


def strong_view(size: int) -> ViewConfig:
    """FixMatch's strong augmentation: the weak view, then RandAugment (2 ops, each with p 0.5 at a level
    drawn from 1..9 per op: the official code's "rac" variant) and a Cutout of half the side."""
    ra = RandAugmentConfig(num_ops=2, magnitude=9, random_magnitude=True, op_p=0.5, cutout=0.5, translate=0.125)
    return ViewConfig(count=1, size=size, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.5, jitter_p=0.0,
                      grayscale_p=0.0, blur_p=0.0, randaugment=ra)


def unlabeled_loss(weak: Tensor, strong: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """FixMatch's unlabeled term: ``mean_b mask_b CE(strong_b, argmax softmax(weak_b))``, and the mask.

    ``mask_b = max softmax(weak_b) >= threshold``; the weak logits give targets only (no gradient);
    the mean runs over every unlabeled image, masked or not (the official code's ``reduce_mean``).
    """
    probs = F.softmax(weak.detach().float(), dim=1)
    confidence, pseudo = probs.max(dim=1)
    mask = (confidence >= threshold).float()
    return (F.cross_entropy(strong.float(), pseudo, reduction="none") * mask).mean(), mask


class FixMatch(Classifier):
    """A classifier trained on labeled images plus the consistency of confident pseudo-labels."""

    @dataclass(kw_only=True)
    class Config(ClassifierConfig):
        name: Literal["fixmatch"] = "fixmatch"
        """FixMatch (Sohn et al. 2020) on labeled + unlabeled images (`seerlike selftrain --method fixmatch`)."""
        unlabeled: str = ""
        """Unlabeled images (folder, CSV, shards or an ingested dataset); `selftrain --unlabeled` sets it."""
        unlabeled_ratio: int = 7
        """mu: unlabeled images per labeled image in a step (paper: 7)."""
        threshold: float = 0.95
        """tau: confidence a weak view's prediction needs to become the strong view's target (paper: 0.95)."""
        lambda_u: float = 1.0
        """Weight of the unlabeled loss (paper: 1)."""
        strong: ViewConfig = field(default_factory=lambda: strong_view(32))
        """The strong view of every unlabeled image (its weak view is the data config's view)."""
        label_smoothing: float = 0.0
        """Cross-entropy label smoothing on labeled images (the paper uses none)."""
        ema_decay: float = 0.999
        """Decay of the evaluated moving average (paper: 0.999, over 2^20 steps; it averages ~1 / (1 - decay) steps)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.unlabeled_ratio < 1 or not 0 < self.threshold <= 1 or self.lambda_u < 0:
                raise ValueError(f"fixmatch.unlabeled_ratio must be >= 1, threshold in (0, 1] and lambda_u >= 0, "
                                 f"got {self.unlabeled_ratio}, {self.threshold}, {self.lambda_u}")
            if self.strong.count != 1:
                raise ValueError(f"fixmatch.strong is one view per image, got count={self.strong.count}")

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        need_views("fixmatch", sizes, 1, "the data config holds the weak view of labeled (and unlabeled) images; "
                   "the strong view is method.strong")

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if labels is None or len(views) != 3:
            raise ValueError("FixMatch trains on [labeled weak, unlabeled weak, unlabeled strong] views with the "
                             "labeled images' labels: run it with `seerlike selftrain --method fixmatch`, which adds "
                             "the unlabeled images to the labeled ones")
        self.check_labels(labels)
        labels = labels.to(views[0].device, non_blocking=True)
        b, u = views[0].shape[0], views[1].shape[0]
        logits = self.logits(views).float()
        labeled, weak, strong = logits.split([b, u, u])
        loss_x = F.cross_entropy(labeled, labels, label_smoothing=self.cfg.label_smoothing)
        loss_u, mask = unlabeled_loss(weak, strong, self.cfg.threshold)
        loss = loss_x + self.cfg.lambda_u * loss_u
        acc = (labeled.argmax(1) == labels).float().mean()
        return loss, {"acc": 100.0 * acc.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
                      "mask": mask.mean()}
