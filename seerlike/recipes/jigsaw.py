"""Jigsaw puzzles (Noroozi & Favaro 2016): VISSL's ResNet-50 recipe and the CPU recipe.

``jigsaw_resnet50`` is VISSL's ``pretrain/jigsaw/jigsaw_8gpu_resnet.yaml`` (Goyal et al.
2019): 8 ranks x 32 images; each image resized to 256 and randomly cropped to 255 (here a
square random crop of scale (0.5, 1), resized to 255), flipped, grayscale with probability
0.66; 64 px tiles in 85 px cells (``gap`` 0.25), no per-tile normalisation; 2000
permutations; per tile 2048 -> 1000 with BN and ReLU, then 9000 -> 2000; SGD with momentum
0.9, weight decay 1e-4, LR 0.1 per 256 images after a linear warmup from 0.025 over 5 of 105
epochs. VISSL then steps the LR down 10x at epochs 30, 60, 90 and 100; here a cosine decays it
over the run (the engine's schedule).
"""

from __future__ import annotations

from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.engine.config import TrainConfig
from seerlike.methods.jigsaw import Jigsaw
from seerlike.recipes.pretext import resnet50_pretext, vissl_sgd
from seerlike.recipes.tiny import _common

TINY_SIZE = 60
"""View side of ``tiny_jigsaw``: 32 px CIFAR crops upsampled to 60 (2 x 2 cells of 30 px, 22 px tiles; the
multi-task recipe's 3 x 3: 20 px cells, 15 px tiles)."""


def puzzle_view(size: int, min_scale: float, grayscale_p: float = 0.66) -> AugmentConfig:
    """One square random crop per image, flipped, grayscale with probability ``grayscale_p`` (VISSL's jigsaw: 0.66),
    no colour jitter (the patch-based pretext tasks share it)."""
    return AugmentConfig(views=[ViewConfig(count=1, size=size, scale=(min_scale, 1.0), ratio=(1.0, 1.0),
                                           jitter=(0.0, 0.0, 0.0, 0.0), jitter_p=0.0, grayscale_p=grayscale_p,
                                           blur_p=0.0)])


def jigsaw_resnet50() -> TrainConfig:
    """8 ranks x 32 images of 255 px; 2000 permutations; SGD 0.1 per 256 after 5 warmup epochs, 105 epochs."""
    jigsaw = Jigsaw.Config(num_permutations=2000, gap=0.25, tile_norm=False, tile_dims=(1000,), hidden_dims=())
    return resnet50_pretext(jigsaw, puzzle_view(255, 0.5), optim=vissl_sgd(warmup_epochs=5))


def tiny_jigsaw() -> TrainConfig:
    """Jigsaw for short CPU runs: one 60 px view (a 32 px image upsampled), a 2 x 2 grid of 22 px tiles, all 24
    permutations, no per-tile normalisation.

    Tiles of a 32 px view would be 8 px: the CIFAR ResNet-10 (stride 8) would see them as 1x1
    maps with its last 3x3 convolutions on padding, so views are upsampled to 60 px. The paper's
    3 x 3 grid then gives 15 px tiles of 8 px of the image's content, from which the trunk learnt
    the puzzle (half of 100 permutations) and no features of whole images (held-out kNN 2.8 to
    4.6 points below random init); a 2 x 2 grid, a quarter of the image a tile, gains 4.9
    over it at the full budget (median of three seeds; docs/benchmarks.md, "The pretext and
    clustering methods"). Grayscale
    0.66 as VISSL's loader; per-tile normalisation off as VISSL's ResNet-50 recipe; LR 0.4 per
    256 images is VISSL's 0.1 at the global batch of 64.
    """
    jigsaw = Jigsaw.Config(num_permutations=24, grid=2, gap=0.25, tile_norm=False, tile_dims=(256,), hidden_dims=())
    return _common(jigsaw, puzzle_view(TINY_SIZE, 0.5), lr_per_256=0.4, batch_size=32)


RECIPES: dict = {"jigsaw_resnet50": jigsaw_resnet50, "tiny_jigsaw": tiny_jigsaw}
