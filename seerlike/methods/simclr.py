"""SimCLR (Chen et al. 2020): NT-Xent between two views, negatives from the whole global batch.

Each rank computes the loss of its own samples against the embeddings of ALL ranks, gathered
with gradient (:func:`seerlike.methods.common.gather_with_grad`), as the official code's
cross-replica concatenation does; N ranks then train exactly like one process on the global
batch (tests/dist/test_simclr_dist.py).

Batch-norm leakage: the positive pair of a sample is computed on the same rank, so per-rank
BatchNorm statistics could let the model tell the pair apart from the negatives. The official
code aggregates BN statistics over all devices ("global BN"); here that is
``parallel.sync_bn=true``, which the SimCLR recipes set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seerlike.methods.base import MethodBase, MethodConfig, need_backbone_dim, need_views
from seerlike.methods.common import world_and_rank, forward_views, gather_with_grad, no_autocast
from seerlike.methods.heads import mlp


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """NT-Xent of this rank's pairs ``(z1[i], z2[i])``: (loss, top-1 accuracy of the positive).

    Every anchor is contrasted with the 2N - 1 other embeddings of the global batch (N samples
    over all ranks): its positive and 2N - 2 negatives. The loss is the official one, the mean
    over the local anchors of view 1 plus that of view 2 (so it starts near 2 ln(2N - 1)).
    """
    _, rank = world_and_rank()
    n = z1.shape[0]
    with no_autocast(z1):
        h1, h2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        both = gather_with_grad(torch.cat([h1, h2], dim=1))  # one collective for the two views
        a1, a2 = both.split(h1.shape[1], dim=1)
        mine = torch.arange(n, device=z1.device) + rank * n  # this rank's rows in the global batch
        itself = F.one_hot(mine, a1.shape[0]).bool()
        logits_a = torch.cat([h1 @ a2.t(), (h1 @ a1.t()).masked_fill(itself, float("-inf"))], dim=1) / temperature
        logits_b = torch.cat([h2 @ a1.t(), (h2 @ a2.t()).masked_fill(itself, float("-inf"))], dim=1) / temperature
        loss = F.cross_entropy(logits_a, mine) + F.cross_entropy(logits_b, mine)
        acc = (logits_a.detach().argmax(dim=1) == mine).float().mean()
    return loss, acc


class SimCLR(MethodBase):
    """SimCLR over a backbone returning pooled features ``(B, backbone.out_dim)``.

    Both views go through the trunk and head as one batch, as the official code concatenates
    them, so BatchNorm statistics cover both views.
    """

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["simclr"] = "simclr"
        """SimCLR (Chen et al. 2020); defaults from the official code (google-research/simclr, run.py flags)."""
        temperature: float = 0.1
        """NT-Xent temperature (official default and ImageNet command; 0.5 in the CIFAR-10 command)."""
        proj_layers: int = 3
        """Projection head layers (SimCLR v2 code: 3; the v1 paper: 2); 0 puts the loss on the trunk features."""
        proj_hidden: int = 0
        """Hidden width of the projection head; 0 means the trunk's width, as in the official code."""
        proj_out: int = 128
        """Output width of the projection head (official proj_out_dim)."""

        def __post_init__(self) -> None:
            if self.temperature <= 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")
            if self.proj_layers < 0 or self.proj_hidden < 0 or self.proj_out < 1:
                raise ValueError(f"proj_layers and proj_hidden must be >= 0 and proj_out >= 1, got "
                                 f"{self.proj_layers}, {self.proj_hidden}, {self.proj_out}")

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        need_views("simclr", sizes, 2, "set data.augment.views to one group of count 2 (two views of each image)")

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__()
        width = need_backbone_dim("SimCLR", backbone)
        self.cfg = cfg
        self.backbone = backbone
        self.projector = projection_head(width, cfg)

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if len(views) != 2:
            raise ValueError(f"SimCLR takes exactly 2 views, got {len(views)}; set the data views to 2")
        bs = views[0].shape[0]
        if views[1].shape[0] != bs:
            raise ValueError(f"both views need the same batch size, got {bs} and {views[1].shape[0]}")
        z = self.projector(forward_views(self.backbone, views))
        loss, acc = nt_xent(z[:bs], z[bs:], self.cfg.temperature)
        return loss, {"acc": acc}


def projection_head(width: int, cfg: SimCLR.Config) -> nn.Module:
    """``proj_layers`` Linear -> BN layers (ReLU between): the official nonlinear head.

    The official last layer's BN has a scale but no shift; here it has both (a BN with only a
    scale is no standard module, and SyncBN conversion must keep every parameter).
    """
    if cfg.proj_layers == 0:
        return nn.Identity()
    hidden = cfg.proj_hidden or width
    return mlp(width, [hidden] * (cfg.proj_layers - 1) + [cfg.proj_out], last_bn=True)
