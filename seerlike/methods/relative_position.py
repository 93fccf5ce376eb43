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

``grid=2`` lays a 2x2 grid instead, for views too small for nine patches that hold any content
(a 32 px image: 3x3 cells of ~10 px): each patch covers a quarter of the view, and the pair is
any two different cells, labelled with the same 8 directions (from the first patch to the
second). One pair per image draws the direction uniformly, then a first cell from which that
direction stays inside the grid; ``all_pairs`` classifies all 12 ordered pairs of the 4 patches
(each horizontal and vertical direction twice, each diagonal once).

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


def pair_table(grid: int) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    """The patches a ``grid x grid`` lattice classifies, as cells (row-major), the ordered pairs of them (indices
    into those cells, first patch first) and each pair's label: the index in ``NEIGHBOURS`` of the step from the
    first cell to the second. 3x3: the centre and its 8 neighbours in label order; 2x2: the 12 ordered pairs."""
    if grid == 3:
        return [CENTRE, *NEIGHBOURS], [(0, k + 1) for k in range(len(NEIGHBOURS))], list(range(len(NEIGHBOURS)))
    pairs = [(i, j) for i in range(4) for j in range(4) if i != j]
    steps = [(j // 2 - i // 2 + 1) * 3 + (j % 2 - i % 2 + 1) for i, j in pairs]  # the step's cell in a 3x3 lattice
    return [0, 1, 2, 3], pairs, [NEIGHBOURS.index(step) for step in steps]


def patch_geometry(size: int, gap: float, jitter: float, grid: int = 3) -> tuple[int, int]:
    """(patch side, jitter in px) of a ``grid x grid`` lattice on a ``size`` view: patch = round(cell / (1 + gap)),
    jitter = round(jitter x patch), capped so the patch stays inside its cell."""
    cell, _ = grid_origin(size, grid)
    patch = int(round(cell / (1.0 + gap)))
    return patch, min(int(round(jitter * patch)), max((cell - patch) // 2, 0))


class RelativePosition(MethodBase):
    """Relative patch position over a backbone returning pooled features ``(B, backbone.out_dim)``."""

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["relative_position"] = "relative_position"
        """Relative patch position (Doersch et al. 2015); defaults from the paper (96 px patches, 48 px gap, 7 px jitter)."""
        grid: int = 3
        """Cells per side: 3 (paper: the centre and one of its 8 neighbours) or 2 (any two of 4 quarter-view patches)."""
        gap: float = 0.5
        """Gap between neighbouring patches as a fraction of the patch side: patch = round(cell / (1 + gap)) (paper: 48 / 96)."""
        jitter: float = 0.073
        """Largest displacement of a patch per axis, as a fraction of its side (paper: 7 px of 96); capped at the gap's room."""
        colour_drop: bool = True
        """Keep one random channel per patch, the other two become noise of 1/100 its std (paper's colour dropping)."""
        all_pairs: bool = False
        """Classify every pair of every image (3x3: centre and 8 neighbours; 2x2: 12 ordered pairs) instead of one (paper)."""
        patch_dims: tuple[int, ...] = (4096,)
        """Per-patch head on the pooled features, Linear-BN-ReLU each (paper: fc6, 4096 per patch); () feeds the trunk features."""
        pair_dims: tuple[int, ...] = (4096, 4096)
        """Hidden widths (Linear-BN-ReLU) over the concatenated pair before the 8-way Linear (paper: fc7, fc8 of 4096)."""

        def __post_init__(self) -> None:
            if not self.gap >= 0.0 or not self.jitter >= 0.0:
                raise ValueError(f"gap and jitter must be >= 0 (fractions of the patch side), got {self.gap}, {self.jitter}")
            if self.grid not in (2, 3):
                raise ValueError(f"grid must be 2 or 3 (cells per side), got {self.grid}")
            if any(d < 1 for d in (*self.patch_dims, *self.pair_dims)):
                raise ValueError(f"patch_dims and pair_dims must be positive, got {self.patch_dims}, {self.pair_dims}")

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        if not sizes:
            raise ValueError("relative_position needs at least one view per image; set data.augment.views")
        for size in sizes:
            patch, _ = patch_geometry(size, cfg.gap, cfg.jitter, cfg.grid)
            if patch < MIN_TILE:
                raise ValueError(f"relative_position: a {size} px view gives patches of {patch} px "
                                 f"(method.grid={cfg.grid}, method.gap={cfg.gap}); use larger views "
                                 "(data.augment.views[*].size), a smaller method.gap or method.grid=2")

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__()
        width = need_backbone_dim("RelativePosition", backbone)
        self.cfg = cfg
        self.backbone = backbone
        self.patch_head = feature_head(width, cfg.patch_dims)
        patch_width = cfg.patch_dims[-1] if cfg.patch_dims else width
        self.classifier = mlp(2 * patch_width, [*cfg.pair_dims, len(NEIGHBOURS)])
        cells, pairs, labels = pair_table(cfg.grid)  # built once; not state (non-persistent buffers follow the device)
        self.register_buffer("pair_cells", torch.tensor(cells)[torch.tensor(pairs)], persistent=False)  # (K, 2)
        self.register_buffer("table_cells", torch.tensor(cells), persistent=False)
        self.register_buffer("table_pairs", torch.tensor(pairs), persistent=False)
        self.register_buffer("one_pair", torch.tensor([[0, 1]]), persistent=False)
        self.register_buffer("pair_labels", torch.tensor(labels), persistent=False)
        # one pair per image: uniform over the 8 steps, then over the pairs that take that step
        counts = torch.bincount(self.pair_labels, minlength=len(NEIGHBOURS)).float()
        self.register_buffer("pair_weights", 1.0 / counts[self.pair_labels], persistent=False)

    def patches(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The patches of images ``x`` ``(B, P, C, p, p)``, which of them form the classified pairs ``(K, 2)``
        (first patch, second patch), and each pair's label ``(B, K)`` (the direction from first to second).

        One pair per image: ``P = 2``, pairs ``[[0, 1]]``. With ``all_pairs``, 3x3: the centre and its
        8 neighbours in label order (``P = 9``, pairs ``(0, k + 1)`` labelled ``k``); 2x2: the 4 cells
        row-major (``P = 4``) and the 12 ordered pairs of :func:`pair_table`.
        """
        size = x.shape[-1]
        if x.shape[-2] != size:
            raise ValueError(f"relative_position needs square views, got {tuple(x.shape[-2:])}")
        b, grid, dev = x.shape[0], self.cfg.grid, x.device
        patch, jitter = patch_geometry(size, self.cfg.gap, self.cfg.jitter, grid)
        corners = tile_corners(b, size, grid, patch, jitter, device=dev)  # (B, grid^2, 2), row-major cells
        if self.cfg.all_pairs:
            cells, pairs, labels = self.table_cells.expand(b, -1), self.table_pairs, self.pair_labels.expand(b, -1)
        else:
            rows = torch.multinomial(self.pair_weights, b, replacement=True)
            cells, pairs, labels = self.pair_cells[rows], self.one_pair, self.pair_labels[rows, None]
        picked = corners.gather(1, cells[..., None].expand(-1, -1, 2))
        out = extract_tiles(x, picked, patch)
        if self.cfg.colour_drop and out.shape[2] == 3:
            out = drop_colour_channels(out.flatten(0, 1)).view(out.shape)
        return out, pairs, labels

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        logits, targets = [], []
        for batch in same_size_runs(views):
            patches, pairs, label = self.patches(batch)
            b, p = patches.shape[:2]
            feats = self.patch_head(self.backbone(patches.flatten(0, 1))).view(b, p, -1)
            joined = torch.cat([feats[:, pairs[:, 0]], feats[:, pairs[:, 1]]], dim=-1)  # (B, K, 2d): first patch first
            logits.append(self.classifier(joined.flatten(0, 1)))
            targets.append(label.reshape(-1))
        logits, target = torch.cat(logits).float(), torch.cat(targets)
        loss = F.cross_entropy(logits, target)
        acc = (logits.detach().argmax(dim=1) == target).float().mean()
        return loss, {"acc": acc}
