"""Barlow Twins (Zbontar et al. 2021): the cross-correlation of the two views' embeddings -> identity.

Each embedding feature is standardised over the GLOBAL batch (BatchNorm without affine
parameters, statistics over every rank), the ``D x D`` cross-correlation ``C`` of the two
views is summed over ranks and divided by the global batch size, and the loss is
``sum_i (1 - C_ii)^2 + lambd sum_{i != j} C_ij^2``: the diagonal makes the views agree, the
off-diagonal decorrelates the features, which is what prevents collapse (a constant
embedding has no variance to standardise, and redundant features are penalised).

Every reduction keeps its gradient (:mod:`seerlike.methods.batch_stats`), so N ranks
train exactly like 1 process on the concatenated batch. The official code sums ``C`` with a
plain ``all_reduce`` instead: its ranks apply ``1 / world`` of this gradient (see
``scale_loss``). The statistics and the loss are computed in fp32 with autocast off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from seerlike.methods.batch_stats import off_diagonal, standardize
from seerlike.methods.common import all_reduce_with_grad
from seerlike.methods.base import MethodBase, MethodConfig, need_backbone_dim, need_views
from seerlike.methods.heads import mlp


def expander(in_dim: int, dims: tuple[int, ...]) -> nn.Sequential:
    """Linear -> BN -> ReLU per hidden width, then a Linear WITHOUT bias (Barlow Twins', VICReg's projector).

    A bias on the last layer would be cancelled by the standardisation (Barlow Twins) or
    the centring and the difference of the views (VICReg): it would get no gradient.
    """
    layers = mlp(in_dim, dims)
    last = layers[-1]
    layers[-1] = nn.Linear(last.in_features, last.out_features, bias=False)
    return layers


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """``(on_diag, off_diag, cross-correlation)`` of two views' embeddings (local batch, D) over the global batch."""
    n, count = standardize(torch.stack([z1.float(), z2.float()]), eps)
    c = all_reduce_with_grad(n[0].T @ n[1]) / count
    on_diag = (c.diagonal() - 1).square().sum()
    off_diag = off_diagonal(c).square().sum()
    return on_diag, off_diag, c


class BarlowTwins(MethodBase):
    """Barlow Twins over a backbone returning pooled features ``(B, backbone.out_dim)``.

    The two views go through the network one at a time, as in the official code.
    """

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        """Defaults from facebookresearch/barlowtwins main.py (projector, lambda 0.0051, BN eps).

        Its ``--scale-loss`` (default 1/32; 0.024 in the README's best command) was replaced in
        commit 046eec3 by a separate LR for biases and norms (0.0048 = 0.2 x 0.024), which
        seerlike's optimizer does not have. Under LARS a loss factor s leaves the adapted
        weights' step sizes alone and scales the biases' and norms' steps by s (it also makes
        the weight decay 1/s times as strong relative to the gradient). The default 1.0 is the
        current code's (no factor); the recipe reproduces the README's 0.024 run with 0.024 / 16
        (recipes/barlow_twins.py says why / 16).
        """

        name: Literal["barlow_twins"] = "barlow_twins"
        """Barlow Twins (Zbontar et al. 2021); defaults from facebookresearch/barlowtwins main.py."""
        projector_dims: tuple[int, ...] = (8192, 8192, 8192)
        """Projector widths after the trunk (hidden..., out); Linear -> BN -> ReLU, the last Linear bare."""
        lambd: float = 0.0051
        """Weight of the off-diagonal (redundancy reduction) term against the diagonal (invariance) term."""
        scale_loss: float = 1.0
        """Factor on the whole loss (official --scale-loss); 0.024 / 16 reproduces the README's best run."""
        bn_eps: float = 1e-5
        """Epsilon added to the variance when the embeddings are standardised (BatchNorm's default)."""

        def __post_init__(self) -> None:
            if not self.projector_dims or any(d <= 0 for d in self.projector_dims):
                raise ValueError(f"projector_dims must be one or more positive widths, got {list(self.projector_dims)}")
            if self.projector_dims[-1] < 2:
                raise ValueError("projector_dims must end with at least 2 features (the loss decorrelates them)")
            if self.lambd < 0 or self.scale_loss <= 0 or self.bn_eps <= 0:
                raise ValueError(f"lambd must be >= 0, scale_loss and bn_eps > 0; got {self.lambd}, "
                                 f"{self.scale_loss}, {self.bn_eps}")

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        need_views("barlow_twins", sizes, 2, "use augment.byol_views() (Barlow Twins' two asymmetric views)")

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__()
        need_backbone_dim("Barlow Twins", backbone)
        self.cfg = cfg
        self.backbone = backbone
        self.projector = expander(backbone.out_dim, cfg.projector_dims)

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``scale_loss * (on_diag + lambd * off_diag)``, identical on every rank.

        Stats: ``on_diag`` and ``off_diag`` (unweighted, unscaled) and ``mean_corr``, the mean
        diagonal correlation (1 when the views agree perfectly).
        """
        if len(views) != 2:
            raise ValueError(f"Barlow Twins takes exactly 2 views, got {len(views)}; set the data views to 2")
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        with torch.autocast(z1.device.type, enabled=False):
            on_diag, off_diag, c = barlow_twins_loss(z1, z2, self.cfg.lambd, self.cfg.bn_eps)
            loss = self.cfg.scale_loss * (on_diag + self.cfg.lambd * off_diag)
        stats = {"on_diag": on_diag.detach(), "off_diag": off_diag.detach(), "mean_corr": c.detach().diagonal().mean()}
        return loss, stats
