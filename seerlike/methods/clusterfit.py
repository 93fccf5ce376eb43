"""ClusterFit (Yan et al. 2020): retrain a network from scratch to classify k-means pseudo-labels.

The pipeline: pretrain (SwAV/BYOL) -> ``seerlike extract --layer res5`` -> ``seerlike cluster
--k 16000`` -> ``seerlike train --recipe clusterfit_...`` with ``data.labels`` pointing at
the cluster output: the data pipeline joins the pseudo-labels to the samples by key and
every batch carries them. This module is the classifier and its loss: a linear head on a
fresh trunk, cross-entropy averaged over the batch's views (standard augmentation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seerlike.methods.base import MethodBase, MethodConfig, need_backbone_dim


class ClusterFit(MethodBase):
    """A backbone + linear classifier trained on pseudo-labels (``head`` -> ``fc`` on export)."""

    stage = "followup"
    needs_labels = True

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["clusterfit"] = "clusterfit"
        """ClusterFit (Yan et al. 2020): classify k-means pseudo-labels (needs data.labels)."""
        num_classes: int = 16000
        """Number of pseudo-label classes: the k of `seerlike cluster` (ClusterFit: 16,000)."""
        label_smoothing: float = 0.0
        """Cross-entropy label smoothing."""
        dropout: float = 0.0
        """Dropout on the pooled features before the classifier."""

        def __post_init__(self) -> None:
            if self.num_classes < 2:
                raise ValueError(f"clusterfit.num_classes must be >= 2 (the k of the clustering), got {self.num_classes}")
            if not 0.0 <= self.label_smoothing < 1.0 or not 0.0 <= self.dropout < 1.0:
                raise ValueError("clusterfit.label_smoothing and clusterfit.dropout must be in [0, 1)")

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__()
        need_backbone_dim("ClusterFit", backbone)
        self.cfg = cfg
        self.backbone = backbone
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(backbone.out_dim, cfg.num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self._labels_checked = False

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.backbone(x)))

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        if labels is None:
            raise ValueError("ClusterFit needs pseudo-labels with every batch: set data.labels to the output "
                             "directory (or labels parquet) of `seerlike cluster`")
        if not self._labels_checked:
            # once, not every step (each check is a device sync): one k-means run has one k, so a
            # wrong num_classes shows in the first batch; a stray label later still fails in cross_entropy
            lo, hi = int(labels.min()), int(labels.max())
            if hi >= self.cfg.num_classes or lo < 0:
                raise ValueError(f"pseudo-label {hi if hi >= self.cfg.num_classes else lo} outside "
                                 f"[0, {self.cfg.num_classes}); set method.num_classes to the k used by "
                                 "`seerlike cluster`")
            self._labels_checked = True
        labels = labels.to(views[0].device, non_blocking=True)
        loss = views[0].new_zeros((), dtype=torch.float32)
        correct = views[0].new_zeros((), dtype=torch.float32)
        for v in views:
            logits = self.logits(v).float()
            loss = loss + F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
            correct += (logits.argmax(1) == labels).float().mean()
        # metrics stay tensors: the loop turns them into numbers only on logging steps
        return loss / len(views), {"acc": 100.0 * correct.detach() / len(views)}
