"""BYOL (Grill et al. 2020): an online network predicts an EMA target network's projection.

The target (a copy of trunk + projector) is the submodule ``target`` with requires_grad
False, so checkpoints carry it and no optimizer sees it. The EMA runs elementwise on the
local tensors, so it works unchanged when online and target parameters are FSDP2 shards
(DTensors with the same placements) and stays identical across ranks as long as the
online parameters are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seerlike.methods.base import MethodBase, MethodConfig, need_backbone_dim, need_views
from seerlike.methods.common import cosine_to_one, MomentumEncoder, forward_views
from seerlike.methods.heads import mlp

log = logging.getLogger(__name__)


def regression_loss(pred: Tensor, target: Tensor) -> Tensor:
    """BYOL's per-view loss: mean over the batch of ``2 - 2 cos(pred, target)``, in [0, 4]."""
    return (2 - 2 * F.cosine_similarity(pred.float(), target.float().detach(), dim=-1)).mean()


class BYOL(MethodBase):
    """BYOL over a backbone returning pooled features ``(B, backbone.out_dim)``.

    Both views go through each network in one batch (half the FSDP all-gathers of one pass
    per view), so BatchNorm statistics are over both views, unlike the per-view JAX reference.
    """

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["byol"] = "byol"
        """BYOL (Grill et al. 2020); defaults from the paper's reference code."""
        projector_dims: tuple[int, ...] = (4096, 256)
        """Projector MLP widths after the trunk (hidden..., out)."""
        predictor_dims: tuple[int, ...] = (4096, 256)
        """Predictor MLP widths (hidden..., out); out must equal the projector's out."""
        tau_base: float = 0.996
        """Base EMA rate of the target; annealed to 1 by cosine (0.99 for 100-300 epochs, 0.97 for 40)."""

        def __post_init__(self) -> None:
            if not self.projector_dims or not self.predictor_dims:
                raise ValueError("projector_dims and predictor_dims need at least the output width")
            if self.predictor_dims[-1] != self.projector_dims[-1]:
                raise ValueError(
                    f"predictor_dims ends with {self.predictor_dims[-1]} but projector_dims with "
                    f"{self.projector_dims[-1]}: the prediction regresses the target projection, make them equal")
            if not 0.0 <= self.tau_base <= 1.0:
                raise ValueError(f"tau_base must be in [0, 1], got {self.tau_base}")

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        need_views("byol", sizes, 2, "use augment.byol_views() (two asymmetric views)")

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__()
        need_backbone_dim("BYOL", backbone)
        self.cfg = cfg
        self.backbone = backbone
        self.projector = mlp(backbone.out_dim, cfg.projector_dims)
        self.predictor = mlp(cfg.projector_dims[-1], cfg.predictor_dims)
        self.target = MomentumEncoder(backbone=backbone, projector=self.projector)

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """Symmetric loss: view 1 predicts the target of view 2 and vice versa, SUMMED (range [0, 8])."""
        if len(views) != 2:
            raise ValueError(f"BYOL takes exactly 2 views, got {len(views)}; set the data views to 2")
        bs = views[0].shape[0]
        pred = self.predictor(self.projector(forward_views(self.backbone, views)))
        with torch.no_grad():
            tgt = forward_views(self.target, views)
        p1, p2 = pred[:bs], pred[bs:]
        t1, t2 = tgt[:bs], tgt[bs:]
        loss = regression_loss(p1, t2) + regression_loss(p2, t1)
        return loss, {}

    def tau(self, step: int, max_steps: int) -> float:
        """EMA rate after step ``step`` (0-based) of ``max_steps``: 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2."""
        return cosine_to_one(self.cfg.tau_base, step, max_steps)

    @torch.no_grad()
    def reset_state(self) -> None:
        """Target := online, parameters and buffers (for a model materialised from the meta device)."""
        self.target.copy_from([self.backbone, self.projector])

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """EMA of the target towards the online net: target = tau target + (1 - tau) online."""
        self.target.update([self.backbone, self.projector], self.tau(step, max_steps))
