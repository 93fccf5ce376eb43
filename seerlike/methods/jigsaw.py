"""Jigsaw puzzles (Noroozi & Favaro 2016; Goyal et al. 2019's ResNet-50 version in VISSL).

Every view is an independent image. It is cut into a 3x3 grid of cells, one tile per cell
leaving a gap (``gap``: the fraction of the cell a tile leaves out, so neighbouring tiles
never touch) at a random position inside its cell (jitter), so that the trunk cannot solve
the puzzle from edge continuity. The 9 tiles are shuffled by one permutation drawn from a
fixed set; the trunk runs on every tile (a siamese network: one trunk, 9 tiles per image in
one batch), a per-tile head maps each pooled feature, and a classifier over the 9 features
concatenated in shuffled order predicts which permutation of the set was applied.

The permutation set is Noroozi & Favaro's greedy maximal-Hamming selection
(:func:`seerlike.methods.pretext_ops.maximal_hamming_permutations`), generated
deterministically from ``permutation_seed`` and kept as the persistent buffer
``permutations``, so checkpoints carry the exact set the classifier was trained on (a
checkpoint whose set differs from the configured one fails to load rather than train the
classifier on relabelled classes).

Tiles, jitter and permutation indices are drawn from the global torch RNG of the views'
device, which the engine checkpoints per rank. No collective beyond data parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seerlike.methods.base import MethodBase, MethodConfig, need_backbone_dim
from seerlike.methods.heads import mlp
from seerlike.methods.pretext_ops import (extract_tiles, grid_origin, maximal_hamming_permutations, normalise_tiles,
                                          same_size_runs, shuffle_tiles, tile_corners, tile_side)

MIN_TILE = 2
"""Smallest tile side (px) a view may give; below it the trunk sees next to nothing."""


def feature_head(in_dim: int, dims: tuple[int, ...]) -> nn.Sequential:
    """Linear -> BN -> ReLU for every width (VISSL's per-tile ``mlp`` with ``use_bn``, ``use_relu``
    and ``skip_last_layer_relu_bn: False``); an empty ``dims`` is the identity."""
    layers: list[nn.Module] = []
    for a, b in zip((in_dim, *dims), dims):
        layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Jigsaw(MethodBase):
    """Jigsaw over a backbone returning pooled features ``(B, backbone.out_dim)``."""

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["jigsaw"] = "jigsaw"
        """Jigsaw (Noroozi & Favaro 2016); defaults from the official code (JigsawPuzzlePytorch) and VISSL."""
        num_permutations: int = 1000
        """Permutations in the set, the classes (official default 1000; VISSL ships 100, 2000 and 10000; its ResNet-50 config 2000)."""
        permutation_seed: int = 0
        """Seed of the first permutation of the greedy maximal-Hamming selection; the rest follows deterministically."""
        grid: int = 3
        """Cells per side: grid x grid tiles (3 in the paper; 2: four tiles, 24 permutations, for small images)."""
        gap: float = 0.25
        """Fraction of each cell its tile leaves out; the tile sits anywhere in its cell (official and VISSL: 64 px tiles in 85 px cells)."""
        tile_norm: bool = True
        """Normalise every tile on its own (mean 0, std 1 per channel), as the official loader does; VISSL does not."""
        tile_dims: tuple[int, ...] = (1000,)
        """Per-tile head on the pooled features, Linear-BN-ReLU each (VISSL ResNet-50: 2048 -> 1000); () feeds the trunk features."""
        hidden_dims: tuple[int, ...] = ()
        """Hidden widths (Linear-BN-ReLU) of the classifier over the concatenated tiles before its last Linear (VISSL: none, 9000 -> 2000)."""

        def __post_init__(self) -> None:
            if self.grid not in (2, 3):
                raise ValueError(f"grid must be 2 or 3 (permutations of 4 or 9 tiles), got {self.grid}")
            limit = {2: 24, 3: 362880}[self.grid]
            if not 2 <= self.num_permutations <= limit:
                raise ValueError(f"num_permutations must be in [2, {limit}] for a {self.grid}x{self.grid} grid, "
                                 f"got {self.num_permutations}")
            if not 0.0 <= self.gap < 1.0:
                raise ValueError(f"gap must be in [0, 1) (a fraction of the cell), got {self.gap}")
            if any(d < 1 for d in (*self.tile_dims, *self.hidden_dims)):
                raise ValueError(f"tile_dims and hidden_dims must be positive, got {self.tile_dims}, "
                                 f"{self.hidden_dims}")

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        if not sizes:
            raise ValueError("jigsaw needs at least one view per image; set data.augment.views")
        for size in sizes:
            cell, _ = grid_origin(size, cfg.grid)
            if tile_side(cell, cfg.gap) < MIN_TILE:
                raise ValueError(f"jigsaw: a {size} px view gives {cfg.grid}x{cfg.grid} cells of {cell} px and "
                                 f"tiles of {tile_side(cell, cfg.gap)} px (method.gap={cfg.gap}); use larger views "
                                 f"(data.augment.views[*].size) or a smaller method.gap")

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__()
        width = need_backbone_dim("Jigsaw", backbone)
        self.cfg = cfg
        self.backbone = backbone
        self.tiles = cfg.grid * cfg.grid
        self.tile_head = feature_head(width, cfg.tile_dims)
        tile_width = cfg.tile_dims[-1] if cfg.tile_dims else width
        self.classifier = mlp(self.tiles * tile_width, [*cfg.hidden_dims, cfg.num_permutations])
        self.register_buffer("permutations", self._permutation_set())

    def _permutation_set(self) -> Tensor:
        return maximal_hamming_permutations(self.cfg.num_permutations, self.tiles, self.cfg.permutation_seed)

    @torch.no_grad()
    def reset_state(self) -> None:
        self.permutations.copy_(self._permutation_set())

    def puzzles(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Shuffled tiles ``(B, T, C, t, t)`` of the images ``x`` and their permutation indices ``(B,)``."""
        size = x.shape[-1]
        if x.shape[-2] != size:
            raise ValueError(f"jigsaw needs square views, got {tuple(x.shape[-2:])}")
        cell, _ = grid_origin(size, self.cfg.grid)
        tile = tile_side(cell, self.cfg.gap)
        corners = tile_corners(x.shape[0], size, self.cfg.grid, tile, (cell - tile) // 2, device=x.device)
        tiles = extract_tiles(x, corners, tile)
        if self.cfg.tile_norm:
            tiles = normalise_tiles(tiles)
        index = torch.randint(self.cfg.num_permutations, (x.shape[0],), device=x.device)
        return shuffle_tiles(tiles, self.permutations, index), index

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        logits, targets = [], []
        for batch in same_size_runs(views):
            tiles, index = self.puzzles(batch)
            b = tiles.shape[0]
            feats = self.tile_head(self.backbone(tiles.flatten(0, 1)))  # (B * T, d), tile-major per image
            logits.append(self.classifier(feats.reshape(b, -1)))
            targets.append(index)
        logits, target = torch.cat(logits).float(), torch.cat(targets)
        loss = F.cross_entropy(logits, target)
        acc = (logits.detach().argmax(dim=1) == target).float().mean()
        return loss, {"acc": acc}
