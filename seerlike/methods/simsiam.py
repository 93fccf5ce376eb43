"""SimSiam (Chen & He 2021): one network, a predictor and a stop-gradient; no negatives, no EMA.

Each view's projection ``z`` is regressed by the predictor's output ``p`` of the OTHER view,
``z`` detached, with the negative cosine similarity, symmetrised. What keeps the outputs
from collapsing is the stop-gradient together with the predictor (the paper, Sec. 4); the
BatchNorm after every projector layer, the last included, helps optimisation.

Across ranks the loss is a per-sample mean, so data-parallel gradient averaging already
gives the global-batch gradient; the only statistics shared between ranks are BatchNorm's,
global when the run converts them (``parallel.sync_bn=true``, as the official code does):
there is no collective in this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seerlike.methods.base import MethodBase, MethodConfig, need_backbone_dim, need_views
from seerlike.methods.heads import mlp


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """``-cos(p, z)`` averaged over the batch, in fp32, with no gradient into ``z`` (the stop-gradient)."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


def projector(in_dim: int, dims: tuple[int, ...]) -> nn.Sequential:
    """Linear -> BN (-> ReLU between layers) for every width; the last BN has no affine parameters.

    The official projector's last Linear carries a frozen bias that its affine-free BN
    cancels; here it has no bias (the same function, one parameter less).
    """
    layers = mlp(in_dim, dims, last_bn=True)
    layers[-1] = nn.BatchNorm1d(dims[-1], affine=False)
    return layers


class SimSiam(MethodBase):
    """SimSiam over a backbone returning pooled features ``(B, backbone.out_dim)``.

    The two views go through the network one at a time, as in the official code, so every
    BatchNorm normalises each view with its own statistics.
    """

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        """SimSiam's heads; defaults from facebookresearch/simsiam (simsiam/builder.py, main_simsiam.py).

        The official run (README, ``--fix-pred-lr``) keeps the predictor at the peak LR with
        no decay: that is ``optim.fixed_lr=[predictor]``, which the recipes set.
        """

        name: Literal["simsiam"] = "simsiam"
        """SimSiam (Chen & He 2021)."""
        projector_dims: tuple[int, ...] = (2048, 2048, 2048)
        """Projector widths after the trunk, each Linear followed by BatchNorm (the last one without affine)."""
        predictor_dims: tuple[int, ...] = (512, 2048)
        """Predictor widths (hidden..., out = projector's out); its LR stays fixed with optim.fixed_lr=[predictor]."""

        def __post_init__(self) -> None:
            if not self.projector_dims or not self.predictor_dims:
                raise ValueError("projector_dims and predictor_dims need at least the output width")
            if any(d <= 0 for d in (*self.projector_dims, *self.predictor_dims)):
                raise ValueError(f"projector_dims and predictor_dims must be positive widths, got "
                                 f"{list(self.projector_dims)} and {list(self.predictor_dims)}")
            if self.predictor_dims[-1] != self.projector_dims[-1]:
                raise ValueError(
                    f"predictor_dims ends with {self.predictor_dims[-1]} but projector_dims with "
                    f"{self.projector_dims[-1]}: the prediction regresses the other view's projection, make them equal")

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        need_views("simsiam", sizes, 2, "use two views, e.g. recipes.simsiam.mocov2_views()")

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__()
        need_backbone_dim("SimSiam", backbone)
        self.cfg = cfg
        self.backbone = backbone
        self.projector = projector(backbone.out_dim, cfg.projector_dims)
        self.predictor = mlp(cfg.projector_dims[-1], cfg.predictor_dims)

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(D(p1, z2) + D(p2, z1)) / 2`` with ``D`` the negative cosine, in [-1, 1].

        Stats: ``z_std``, the per-channel standard deviation over the batch of the
        l2-normalised projections times sqrt(dim): about 1 for well-spread outputs, 0 at
        collapse (the paper's Fig. 2 monitors it without the factor).
        """
        if len(views) != 2:
            raise ValueError(f"SimSiam takes exactly 2 views, got {len(views)}; set the data views to 2")
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2
        with torch.no_grad():
            z = F.normalize(z1.float(), dim=1)
            z_std = z.std(dim=0).mean() * math.sqrt(z.shape[1])
        return loss, {"z_std": z_std}
