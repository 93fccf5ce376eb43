"""MoCo v3 (Chen, Xie, He 2021), ResNet form: a predictor on the online net, a momentum encoder,
in-batch negatives over all ranks, symmetric loss.

Each rank contrasts its queries with the momentum keys of ALL ranks (gathered without
gradient: keys are never trained through), the positive being the key of the same image's
other view. The momentum encoder (trunk + projector) is the submodule ``momentum_encoder`` with
requires_grad False, moved in :meth:`MoCoV3.on_step_end` by a momentum annealed from
``momentum`` to 1 by a cosine over the run (the official ``--moco-m-cos``, used by every
ResNet-50 setup of its CONFIG.md).

Batch-norm leakage: the official code converts every BatchNorm, the momentum encoder's
included, to SyncBatchNorm, so each view's statistics cover the global batch rather than a
rank's slice of it; here that is ``parallel.sync_bn=true``, which the MoCo v3 recipes set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seerlike.methods.base import MethodBase, MethodConfig, need_backbone_dim, need_views
from seerlike.methods.common import cosine_to_one, MomentumEncoder, world_and_rank, gather, no_autocast
from seerlike.methods.heads import mlp


def contrastive_loss(q: Tensor, k: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """InfoNCE of this rank's queries against the keys of all ranks, times ``2 x temperature``
    (the official scaling): (loss, top-1 accuracy). ``k`` is this rank's keys (no gradient)."""
    _, rank = world_and_rank()
    n = q.shape[0]
    with no_autocast(q):
        q = F.normalize(q.float(), dim=1)
        keys = gather(F.normalize(k.detach().float(), dim=1))
        logits = q @ keys.t() / temperature
        mine = torch.arange(n, device=q.device) + rank * n  # the positives: this rank's rows of the keys
        loss = F.cross_entropy(logits, mine) * (2 * temperature)
        acc = (logits.detach().argmax(dim=1) == mine).float().mean()
    return loss, acc


class MoCoV3(MethodBase):
    """MoCo v3 over a backbone returning pooled features ``(B, backbone.out_dim)``.

    Each view goes through each network on its own, as in the official code, so BatchNorm
    statistics are per view.
    """

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["moco_v3"] = "moco_v3"
        """MoCo v3 (Chen et al. 2021), ResNet form; defaults from the official code (facebookresearch/moco-v3)."""
        projector_dims: tuple[int, ...] = (4096, 256)
        """Projector widths after the trunk (hidden..., out), ending in an affine-free BN; the official ResNet form has 2 layers (the paper and ViTs: 3, i.e. (4096, 4096, 256))."""
        predictor_dims: tuple[int, ...] = (4096, 256)
        """Predictor widths (hidden..., out), no BN after the last layer; out must equal the projector's out."""
        temperature: float = 1.0
        """Softmax temperature of the contrastive loss (official --moco-t for ResNet-50)."""
        momentum: float = 0.99
        """Base momentum of the momentum encoder, annealed to 1 by a cosine over the run (official --moco-m, 0.996 for 1000 epochs)."""

        def __post_init__(self) -> None:
            if not self.projector_dims or not self.predictor_dims:
                raise ValueError("projector_dims and predictor_dims need at least the output width")
            if self.predictor_dims[-1] != self.projector_dims[-1]:
                raise ValueError(
                    f"predictor_dims ends with {self.predictor_dims[-1]} but projector_dims with "
                    f"{self.projector_dims[-1]}: the prediction is compared with the key, make them equal")
            if self.temperature <= 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")
            if not 0.0 <= self.momentum <= 1.0:
                raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        need_views("moco_v3", sizes, 2, "set data.augment.views to two views (the moco_v3 recipes' pair)")

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__()
        width = need_backbone_dim("MoCo v3", backbone)
        self.cfg = cfg
        self.backbone = backbone
        self.projector = mlp(width, cfg.projector_dims, last_bn=True)
        self.projector[-1] = nn.BatchNorm1d(cfg.projector_dims[-1], affine=False)  # official: no gamma, no beta
        self.predictor = mlp(cfg.projector_dims[-1], cfg.predictor_dims)
        last = self.predictor[-1]
        self.predictor[-1] = nn.Linear(last.in_features, last.out_features, bias=False)  # official: no bias
        self.momentum_encoder = MomentumEncoder(backbone=backbone, head=self.projector)

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``ctr(q1, k2) + ctr(q2, k1)``; each term is ``2T`` times a cross-entropy."""
        if len(views) != 2:
            raise ValueError(f"MoCo v3 takes exactly 2 views, got {len(views)}; set the data views to 2")
        if views[0].shape[0] != views[1].shape[0]:
            raise ValueError(f"both views need the same batch size, got {views[0].shape[0]} and {views[1].shape[0]}")
        q1, q2 = (self.predictor(self.projector(self.backbone(v))) for v in views)
        with torch.no_grad():
            k1, k2 = (self.momentum_encoder(v) for v in views)
        loss1, acc1 = contrastive_loss(q1, k2, self.cfg.temperature)
        loss2, acc2 = contrastive_loss(q2, k1, self.cfg.temperature)
        return loss1 + loss2, {"acc": (acc1 + acc2) / 2}

    def momentum_at(self, step: int, max_steps: int) -> float:
        """Momentum of iteration ``step`` of ``max_steps``: 1 - (1 - m) (cos(pi step / max_steps) + 1) / 2."""
        return cosine_to_one(self.cfg.momentum, step, max_steps)

    @torch.no_grad()
    def reset_state(self) -> None:
        """Momentum encoder := online trunk + projector (for a model materialised from the meta device)."""
        self.momentum_encoder.copy_from([self.backbone, self.projector])

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """The update the official code makes at the start of iteration ``step + 1``, with that iteration's momentum."""
        self.momentum_encoder.update([self.backbone, self.projector], self.momentum_at(step + 1, max_steps))
