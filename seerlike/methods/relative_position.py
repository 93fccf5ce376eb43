"""Relative patch position (Doersch, Gupta & Efros 2015): where is the second patch relative to the first?

Every view is an independent image, laid out as a 3x3 grid of cells. A patch is taken from the
centre cell and one from a neighbouring cell; the patches are smaller than their cells, so a gap
separates them (``gap``: the gap between neighbouring patches as a fraction of the patch side;
the paper's 48 px between 96 px patches is 0.5), and each is displaced by a random jitter (up
to ``jitter`` of its side, the paper's 7 px of 96), so that the trunk cannot match edges or
textures across the border. Both patches go through the same trunk (a siamese network), a
per-patch head maps each pooled feature, and a classifier over the pair (centre first)
predicts which of the 8 neighbours the second patch came from (``pretext_ops.NEIGHBOURS``:
0 top-left, 1 top, 2 top-right, 3 left, 4 right, 5 bottom-left, 6 bottom, 7 bottom-right).

Colour dropping (the paper's remedy for chromatic aberration, which otherwise reveals a
patch's distance from the lens centre) keeps one random channel per patch and replaces the
other two by faint Gaussian noise. ``all_pairs`` classifies all 8 neighbours of every image
(9 patches through the trunk per image) instead of the paper's one random pair per image.

Patches, jitter, neighbours and colour dropping are drawn from the global torch RNG of the
views' device, which the engine checkpoints per rank. No collective beyond data parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seerlike.methods.base import MethodBase, MethodConfig, need_backbone_dim
from seerlike.methods.heads import mlp
from seerlike.methods.jigsaw import MIN_TILE, feature_head
from seerlike.methods.pretext_ops import (CENTRE, NEIGHBOURS, drop_colour_channels, extract_tiles, grid_origin,
                                          same_size_runs, tile_corners)


def patch_geometry(size: int, gap: float, jitter: float) -> tuple[int, int]:
    """(patch side, jitter in px) of a 3x3 grid on a ``size`` view: patch = round(cell / (1 + gap)),
    jitter = round(jitter x patch), capped so the patch stays inside its cell."""
    cell, _ = grid_origin(size, 3)
    patch = int(round(cell / (1.0 + gap)))
    return patch, min(int(round(jitter * patch)), max((cell - patch) // 2, 0))


class RelativePosition(MethodBase):
    """Relative patch position over a backbone returning pooled features ``(B, backbone.out_dim)``."""

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["relative_position"] = "relative_position"
        """Relative patch position (Doersch et al. 2015); defaults from the paper (96 px patches, 48 px gap, 7 px jitter)."""
        gap: float = 0.5
        """Gap between neighbouring patches as a fraction of the patch side: patch = round(cell / (1 + gap)) (paper: 48 / 96)."""
        jitter: float = 0.073
        """Largest displacement of a patch per axis, as a fraction of its side (paper: 7 px of 96); capped at the gap's room."""
        colour_drop: bool = True
        """Keep one random channel per patch, the other two become noise of 1/100 its std (paper's colour dropping)."""
        all_pairs: bool = False
        """Classify all 8 neighbours of every image (9 patches per image) instead of one random neighbour (paper)."""
        patch_dims: tuple[int, ...] = (4096,)
        """Per-patch head on the pooled features, Linear-BN-ReLU each (paper: fc6, 4096 per patch); () feeds the trunk features."""
        pair_dims: tuple[int, ...] = (4096, 4096)
        """Hidden widths (Linear-BN-ReLU) over the concatenated pair before the 8-way Linear (paper: fc7, fc8 of 4096)."""

        def __post_init__(self) -> None:
            if not self.gap >= 0.0 or not self.jitter >= 0.0:
                raise ValueError(f"gap and jitter must be >= 0 (fractions of the patch side), got {self.gap}, {self.jitter}")
            if any(d < 1 for d in (*self.patch_dims, *self.pair_dims)):
                raise ValueError(f"patch_dims and pair_dims must be positive, got {self.patch_dims}, {self.pair_dims}")

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        if not sizes:
            raise ValueError("relative_position needs at least one view per image; set data.augment.views")
        for size in sizes:
            patch, _ = patch_geometry(size, cfg.gap, cfg.jitter)
            if patch < MIN_TILE:
                raise ValueError(f"relative_position: a {size} px view gives patches of {patch} px "
                                 f"(method.gap={cfg.gap}); use larger views (data.augment.views[*].size) or a "
                                 "smaller method.gap")

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__()
        width = need_backbone_dim("RelativePosition", backbone)
        self.cfg = cfg
        self.backbone = backbone
        self.patch_head = feature_head(width, cfg.patch_dims)
        patch_width = cfg.patch_dims[-1] if cfg.patch_dims else width
        self.classifier = mlp(2 * patch_width, [*cfg.pair_dims, len(NEIGHBOURS)])

    def patches(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The patches of images ``x`` ``(B, P, C, p, p)``, centre first, and the neighbour labels.

        One pair per image (``P = 2``, labels ``(B,)``), or with ``all_pairs`` the centre and its
        8 neighbours in label order (``P = 9``, labels ``(B, 8)`` = 0..7).
        """
        size = x.shape[-1]
        if x.shape[-2] != size:
            raise ValueError(f"relative_position needs square views, got {tuple(x.shape[-2:])}")
        b = x.shape[0]
        patch, jitter = patch_geometry(size, self.cfg.gap, self.cfg.jitter)
        corners = tile_corners(b, size, 3, patch, jitter, device=x.device)  # (B, 9, 2), row-major cells
        order = torch.tensor((CENTRE, *NEIGHBOURS), device=x.device)
        if self.cfg.all_pairs:
            labels = torch.arange(len(NEIGHBOURS), device=x.device).expand(b, -1)
            cells = order.expand(b, -1)
        else:
            labels = torch.randint(len(NEIGHBOURS), (b,), device=x.device)
            cells = torch.stack([order[0].expand(b), order[1:][labels]], dim=1)
        picked = corners.gather(1, cells[..., None].expand(-1, -1, 2))
        out = extract_tiles(x, picked, patch)
        if self.cfg.colour_drop and out.shape[2] == 3:
            out = drop_colour_channels(out.flatten(0, 1)).view(out.shape)
        return out, labels

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        logits, targets = [], []
        for batch in same_size_runs(views):
            patches, neighbour = self.patches(batch)
            b, p = patches.shape[:2]
            feats = self.patch_head(self.backbone(patches.flatten(0, 1))).view(b, p, -1)
            centre, others = feats[:, :1], feats[:, 1:]
            pairs = torch.cat([centre.expand_as(others), others], dim=-1)  # (B, P - 1, 2d): centre first
            logits.append(self.classifier(pairs.flatten(0, 1)))
            targets.append(neighbour.reshape(-1))
        logits, target = torch.cat(logits).float(), torch.cat(targets)
        loss = F.cross_entropy(logits, target)
        acc = (logits.detach().argmax(dim=1) == target).float().mean()
        return loss, {"acc": acc}
