"""RotNet (Gidaris et al. 2018): predict by how many quarter turns an image was rotated.

Every view is an independent image. By default each goes through the trunk in all four
rotations (0, 90, 180, 270 degrees counterclockwise) in one batch, as the official code
(gidariss/FeatureLearningRotNet) does and the paper found better than one random rotation
per image; ``all_rotations=false`` is VISSL's variant (``ImgRotatePil``: one random rotation
per image). A linear (or MLP) head on the pooled trunk features gives 4 logits; the loss is
the cross-entropy with the rotation index.

The rotations are drawn inside the method from the global torch RNG of the views' device
(seerlike.methods.pretext_ops), which the engine checkpoints per rank. No collective beyond
data parallelism's gradient averaging: the loss of each image is local.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seerlike.methods.base import MethodBase, MethodConfig, need_backbone_dim
from seerlike.methods.heads import mlp
from seerlike.methods.pretext_ops import all_rotations, rotate, same_size_runs


class RotNet(MethodBase):
    """RotNet over a backbone returning pooled features ``(B, backbone.out_dim)``."""

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["rotnet"] = "rotnet"
        """RotNet (Gidaris et al. 2018); defaults from the official code (gidariss/FeatureLearningRotNet) and VISSL."""
        all_rotations: bool = True
        """Each image in all 4 rotations in one batch (official code); false: one random rotation per image (VISSL)."""
        head_dims: tuple[int, ...] = ()
        """Hidden widths of the rotation classifier on the pooled features (Linear-BN-ReLU); () is linear (VISSL: 2048 -> 4)."""

        def __post_init__(self) -> None:
            if any(d < 1 for d in self.head_dims):
                raise ValueError(f"head_dims must be positive widths, got {self.head_dims}")

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        if not sizes:
            raise ValueError("rotnet needs at least one view per image; set data.augment.views")

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__()
        width = need_backbone_dim("RotNet", backbone)
        self.cfg = cfg
        self.backbone = backbone
        self.head = mlp(width, [*cfg.head_dims, 4])

    def rotated(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The images the trunk sees for a batch ``x`` and their rotation labels (quarter turns)."""
        if self.cfg.all_rotations:
            return all_rotations(x)
        k = torch.randint(4, (x.shape[0],), device=x.device)
        return rotate(x, k), k

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        logits, targets = [], []
        for batch in same_size_runs(views):
            images, k = self.rotated(batch)
            logits.append(self.head(self.backbone(images)))
            targets.append(k)
        logits, target = torch.cat(logits).float(), torch.cat(targets)
        loss = F.cross_entropy(logits, target)
        acc = (logits.detach().argmax(dim=1) == target).float().mean()
        return loss, {"acc": acc}
