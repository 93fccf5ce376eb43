"""PIRL, pretext-invariant representations (Misra & van der Maaten 2020): an image and its
pretext-transformed version (a jigsaw of 9 tiles, or a rotation) must both match the image's
memory bank row, and not K rows drawn from the bank.

Two heads on one trunk: ``f`` on the image (a Linear to 128), ``g`` on the transformed image.
For the jigsaw, every tile goes through the trunk (one batch of 9B tiles), a Linear maps each
tile's features to 128, and a Linear maps the 9 x 128 features, concatenated in the shuffled
order, to 128 (VISSL's pirl_jigsaw config: ``mlp [2048, 128]``, ``siamese_concat_view``,
``mlp [1152, 128]``, no BN or ReLU). For the rotation variant, ``g`` is a Linear on the
features of the image turned by a random multiple of 90 degrees.

Loss (paper eq. 5; VISSL ``nce_loss_with_memory`` with ``loss_weights [0.5, 0.5]`` over
``[patches, images]``): ``lambda * NCE(g(v_It), m_I) + (1 - lambda) * NCE(f(v_I), m_I)``, both
terms against the bank row ``m_I`` and the same K negatives; the bank row then moves toward
``f(v_I)`` (``update_mem_with_emb_index: 1``). NCE's ``Z`` comes from the first term's scores of
the first step, as VISSL's (the patches term is its first). The bank, its sharded exact lookup
and the loss are :mod:`seerlike.methods.memory_bank`, shared with NPID.

Views: view 0 is the image, view 1 the picture the transformed version is made from (VISSL's
``ImgPilToPatchesAndImage`` crops it separately, scale (0.6, 1) to 255 px, for the patches).
The tiles are cut here with the jigsaw ops (:mod:`seerlike.methods.pretext_ops`): a 3 x 3 grid,
a tile of 3/4 of its cell at a random place in it (VISSL: 64 px tiles in 85 px cells), and a
uniformly random order of the 9 (VISSL permutes the patches with ``np.random.permutation``, not
from a permutation set). VISSL colour-jitters every patch on its own; here the photometric
augmentation comes with the view, the same for its 9 tiles.

No batch-norm leakage: the positive is a bank row from an earlier epoch, so the statistics of a
batch cannot reveal it. Collapse is prevented by the K negatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seerlike.methods.base import MethodBase, MethodConfig, need_backbone_dim, need_views
from seerlike.methods.memory_bank import BankContrast
from seerlike.methods.pretext_ops import extract_tiles, grid_origin, rotate, shuffle_tiles, tile_corners, tile_side

GRID = 3
"""Cells per side of the jigsaw (9 tiles, as the paper)."""
MIN_TILE = 2
"""Smallest tile side (px) a view may give."""


class PIRL(MethodBase):
    """PIRL over a backbone returning pooled features ``(B, backbone.out_dim)``."""

    needs_indices = True

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["pirl"] = "pirl"
        """PIRL (Misra & van der Maaten 2020); defaults from the paper and VISSL's pirl_jigsaw_4node_resnet50.yaml."""
        transform: Literal["jigsaw", "rotation"] = "jigsaw"
        """The pretext transform of view 1: jigsaw (9 tiles, the paper's main model) or rotation (a random multiple of 90 degrees)."""
        embedding_dim: int = 128
        """Width of f, g and the bank rows (VISSL: embedding_dim 128)."""
        num_negatives: int = 32000
        """Negatives drawn uniformly from the bank each step, shared by the batch and both terms (paper and VISSL: 32,000)."""
        temperature: float = 0.07
        """Temperature of the scores exp(s / T) (paper and VISSL: 0.07)."""
        bank_momentum: float = 0.5
        """Momentum of the bank rows, updated with f(v_I): row := normalise(m row + (1 - m) f) (paper and VISSL: 0.5)."""
        transformed_weight: float = 0.5
        """lambda: weight of NCE(g(v_It), m_I); the image term NCE(f(v_I), m_I) gets 1 - lambda (paper eq. 5: 0.5; VISSL loss_weights)."""
        gap: float = 0.25
        """Fraction of each jigsaw cell its tile leaves out; the tile sits anywhere in the cell (VISSL: 64 px tiles in 85 px cells)."""
        loss: Literal["nce", "softmax"] = "nce"
        """nce: NCE with noise probability 1/N and Z from the first step (VISSL loss_type nce); softmax: cross-entropy over the K+1 scores."""

        def __post_init__(self) -> None:
            if self.embedding_dim < 1 or self.num_negatives < 1:
                raise ValueError(f"embedding_dim and num_negatives must be >= 1, got {self.embedding_dim}, "
                                 f"{self.num_negatives}")
            if self.temperature <= 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")
            if not 0.0 <= self.bank_momentum <= 1.0:
                raise ValueError(f"bank_momentum must be in [0, 1], got {self.bank_momentum}")
            if not 0.0 <= self.transformed_weight <= 1.0:
                raise ValueError(f"transformed_weight (lambda) must be in [0, 1], got {self.transformed_weight}")
            if not 0.0 <= self.gap < 1.0:
                raise ValueError(f"gap must be in [0, 1) (a fraction of the cell), got {self.gap}")

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        need_views("pirl", sizes, 2, "set data.augment.views to two groups of count 1: the image, then the picture "
                                     "the transformed version is made from")
        if cfg.transform == "jigsaw":
            cell, _ = grid_origin(sizes[1], GRID)
            if tile_side(cell, cfg.gap) < MIN_TILE:
                raise ValueError(f"pirl: a {sizes[1]} px view 1 gives jigsaw tiles of {tile_side(cell, cfg.gap)} px; "
                                 f"make view 1 larger (data.augment.views[1].size) or method.gap smaller")

    def __init__(self, cfg: Config, backbone: nn.Module, *, num_samples: int) -> None:
        super().__init__()
        width = need_backbone_dim("PIRL", backbone)
        self.cfg, self.backbone = cfg, backbone
        dim = cfg.embedding_dim
        self.image_head = nn.Linear(width, dim)  # f
        if cfg.transform == "jigsaw":  # g: per tile, then over the 9 concatenated
            self.tile_head = nn.Linear(width, dim)
            self.transformed_head = nn.Linear(GRID * GRID * dim, dim)
        else:
            self.transformed_head = nn.Linear(width, dim)
        # VISSL's memory_params.norm_init: the bank starts from unit rows
        self.memory = BankContrast(num_samples, dim, num_negatives=cfg.num_negatives, temperature=cfg.temperature,
                                   momentum=cfg.bank_momentum, loss=cfg.loss, normalize_init=True)

    def jigsaw(self, x: Tensor) -> Tensor:
        """The 9 tiles of every image of ``x``, each in its cell at a random place, in a random order: ``(B, 9, C, t, t)``."""
        size = x.shape[-1]
        if x.shape[-2] != size:
            raise ValueError(f"pirl's jigsaw needs square views, got {tuple(x.shape[-2:])}")
        cell, _ = grid_origin(size, GRID)
        tile = tile_side(cell, self.cfg.gap)
        corners = tile_corners(x.shape[0], size, GRID, tile, (cell - tile) // 2, device=x.device)
        order = torch.rand(x.shape[0], GRID * GRID, device=x.device).argsort(dim=1)  # any of the 9! orders
        return shuffle_tiles(extract_tiles(x, corners, tile), order, torch.arange(x.shape[0], device=x.device))

    def transformed(self, x: Tensor) -> Tensor:
        """g(v_It): the embedding (not normalised) of the pretext-transformed images made from ``x``."""
        if self.cfg.transform == "rotation":
            k = torch.randint(4, (x.shape[0],), device=x.device)
            return self.transformed_head(self.backbone(rotate(x, k)))
        tiles = self.jigsaw(x)
        feats = self.tile_head(self.backbone(tiles.flatten(0, 1)))  # (B * 9, dim), tile-major per image
        return self.transformed_head(feats.reshape(x.shape[0], -1))

    def forward(self, views: list[Tensor], labels: Tensor | None = None,
                indices: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if len(views) != 2:
            raise ValueError(f"PIRL takes exactly 2 views (the image, the source of its transformed version), "
                             f"got {len(views)}")
        if indices is None:
            raise ValueError("PIRL needs each sample's dataset index (forward(views, indices=...))")
        bs = views[0].shape[0]
        if views[1].shape[0] != bs or indices.shape != (bs,):
            raise ValueError(f"both views and the indices need the batch size {bs}, got {views[1].shape[0]} and "
                             f"{tuple(indices.shape)}")
        f = F.normalize(self.image_head(self.backbone(views[0])).float(), dim=1)
        g = F.normalize(self.transformed(views[1]).float(), dim=1)
        pos, neg, batch_idx = self.memory.lookup(indices)
        lam = self.cfg.transformed_weight
        loss_t, acc_t = self.memory.loss(g, pos, neg)  # first: VISSL estimates Z on this term
        loss_i, acc_i = self.memory.loss(f, pos, neg)
        self.memory.remember(batch_idx, f.detach())
        return lam * loss_t + (1 - lam) * loss_i, {"acc_image": acc_i, "acc_transformed": acc_t}

    def on_after_backward(self, step: int) -> None:
        self.memory.close_step()

    def on_step_end(self, step: int, max_steps: int) -> None:
        self.memory.commit()

    def reset_state(self) -> None:
        """The bank's initial rows, no draws yet, Z unknown."""
        self.memory.reset()
