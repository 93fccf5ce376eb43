"""VICReg (Bardes et al. 2022): variance-invariance-covariance regularisation of two views' embeddings.

Three terms on the embeddings ``x, y`` (batch N, D features) of the two views:

- invariance: mean squared difference ``mean((x - y)^2)``;
- variance: per view, ``mean_j relu(gamma - sqrt(Var(x_j) + eps))``, averaged over the views;
  it keeps every feature's standard deviation up to ``gamma``, which is what prevents collapse;
- covariance: per view, the squared off-diagonal entries of the covariance matrix summed and
  divided by D, summed over the views; it decorrelates the features.

Variances use N - 1, as the official code. The statistics are over the GLOBAL batch: the
embeddings are all-gathered with their gradients, as the official code does (its
``FullGatherLayer`` is the same autograd rule as ``torch.distributed.nn.functional.all_gather``),
so N ranks train exactly like 1 process on the concatenated batch. The invariance term is
taken over the gathered batch too (the official code takes each rank's own and lets
gradient averaging combine them: the same gradient), so every rank reports the global
loss. Statistics and loss run in fp32 with autocast off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seerlike.methods.batch_stats import off_diagonal
from seerlike.methods.barlow_twins import expander
from seerlike.methods.common import gather_with_grad
from seerlike.methods.base import MethodBase, MethodConfig, need_backbone_dim, need_views


def vicreg_terms(x: Tensor, y: Tensor, gamma: float = 1.0, eps: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
    """``(invariance, variance, covariance)`` terms of the embeddings of the whole batch (N, D), unweighted."""
    n, d = x.shape
    invariance = F.mse_loss(x, y)
    variance = x.new_zeros(())
    covariance = x.new_zeros(())
    for z in (x, y):
        z = z - z.mean(dim=0)
        std = torch.sqrt(z.var(dim=0) + eps)
        variance = variance + F.relu(gamma - std).mean() / 2
        cov = (z.T @ z) / (n - 1)
        covariance = covariance + off_diagonal(cov).square().sum() / d
    return invariance, variance, covariance


class VICReg(MethodBase):
    """VICReg over a backbone returning pooled features ``(B, backbone.out_dim)``.

    The two views go through the network one at a time, as in the official code.
    """

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["vicreg"] = "vicreg"
        """VICReg (Bardes et al. 2022); defaults from facebookresearch/vicreg main_vicreg.py."""
        projector_dims: tuple[int, ...] = (8192, 8192, 8192)
        """Expander widths after the trunk (hidden..., out); Linear -> BN -> ReLU, the last Linear bare."""
        invariance_weight: float = 25.0
        """lambda: weight of the invariance (mean squared difference) term (official --sim-coeff)."""
        variance_weight: float = 25.0
        """mu: weight of the variance hinge term (official --std-coeff)."""
        covariance_weight: float = 1.0
        """nu: weight of the covariance term (official --cov-coeff)."""
        gamma: float = 1.0
        """Target standard deviation of every embedding feature in the variance hinge."""
        eps: float = 1e-4
        """Added to the variance under the square root (keeps its gradient finite at zero variance)."""

        def __post_init__(self) -> None:
            if not self.projector_dims or any(d <= 0 for d in self.projector_dims):
                raise ValueError(f"projector_dims must be one or more positive widths, got {list(self.projector_dims)}")
            if self.projector_dims[-1] < 2:
                raise ValueError("projector_dims must end with at least 2 features (the covariance term needs pairs)")
            weights = (self.invariance_weight, self.variance_weight, self.covariance_weight)
            if any(w < 0 for w in weights) or self.gamma <= 0 or self.eps <= 0:
                raise ValueError(f"the loss weights must be >= 0, gamma and eps > 0; "
                                 f"got {weights}, {self.gamma}, {self.eps}")

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        need_views("vicreg", sizes, 2, "use augment.byol_views() (VICReg's two asymmetric views)")

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__()
        need_backbone_dim("VICReg", backbone)
        self.cfg = cfg
        self.backbone = backbone
        self.projector = expander(backbone.out_dim, cfg.projector_dims)

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted sum of the three terms over the global batch, identical on every rank.

        Stats: the unweighted ``invariance``, ``variance`` and ``covariance`` terms.
        """
        cfg = self.cfg
        if len(views) != 2:
            raise ValueError(f"VICReg takes exactly 2 views, got {len(views)}; set the data views to 2")
        if views[0].shape[0] != views[1].shape[0]:
            raise ValueError(f"VICReg needs the same batch size in both views, "
                             f"got {views[0].shape[0]} and {views[1].shape[0]}")
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        with torch.autocast(z1.device.type, enabled=False):
            # one all-gather for both views: (local batch, 2, D) -> (global batch, 2, D)
            both = gather_with_grad(torch.stack([z1.float(), z2.float()], dim=1))
            inv, var, cov = vicreg_terms(both[:, 0], both[:, 1], cfg.gamma, cfg.eps)
            loss = cfg.invariance_weight * inv + cfg.variance_weight * var + cfg.covariance_weight * cov
        return loss, {"invariance": inv.detach(), "variance": var.detach(), "covariance": cov.detach()}
