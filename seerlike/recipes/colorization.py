"""Colorization (Zhang et al. 2016): a ResNet-50 recipe and the CPU recipe.

The paper trained a VGG-style network with dilated convolutions (output stride 4) in Caffe and
VISSL has no colorization configuration, so ``colorization_resnet50`` keeps the paper's task
(lightness in, 5-nearest soft-encoding with sigma 5, lambda 0.5 rebalancing, grayscale images
left out) and its optimiser: Adam with betas (0.9, 0.99) at 3e-5 for batches of 40 images
(1.92e-4 per 256 images, scaled linearly to 8 ranks x 32), for the paper's ~450k iterations of
40 images (14 epochs of ImageNet). The paper's L2 weight decay of 1e-3 becomes AdamW's
decoupled decay at the same value (not the same regulariser). Views: 224 px random resized
crops at scale (0.3, 1) with flips and no colour augmentation (it would change the targets;
the paper: 176 px crops of 256 px images). The prediction is on ResNet-50's res5 (7x7 at
224 px), scored against 28x28 targets (``target_cells=4``, the paper's output stride of 4 on
its 176 px crops gave 44x44).
"""

from __future__ import annotations

from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.engine.config import TrainConfig
from seerlike.engine.optim import OptimConfig
from seerlike.methods.colorization import Colorization
from seerlike.recipes.pretext import resnet50_pretext
from seerlike.recipes.tiny import _common


def colour_view(size: int, min_scale: float) -> AugmentConfig:
    """One random resized crop and flip per image; no colour jitter or grayscale (they would change the targets)."""
    return AugmentConfig(views=[ViewConfig(count=1, size=size, scale=(min_scale, 1.0), jitter=(0.0, 0.0, 0.0, 0.0),
                                           jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)])


def colorization_resnet50() -> TrainConfig:
    """8 ranks x 32 images of 224 px; AdamW 1.92e-4 per 256 (the paper's 3e-5 at 40), betas (0.9, 0.99), 14 epochs."""
    method = Colorization.Config(soft_neighbours=5, soft_sigma=5.0, rebalance_lambda=0.5, prior_sigma=5.0,
                                 target_cells=4)
    optim = OptimConfig(name="adamw", lr=3e-5 * 256 / 40, final_lr=0.0, warmup_steps=0, betas=(0.9, 0.99),
                        weight_decay=1e-3)
    return resnet50_pretext(method, colour_view(224, 0.3), optim=optim, epochs=14)  # the paper's optimiser


def tiny_colorization() -> TrainConfig:
    """Colorization for short CPU runs: one 32 px view per image (a 4x4 res5 map, 16x16 targets), batch 64.

    The whole 32 px image keeps the most colour to predict; 64 images of 32 px per rank cost
    about what the two 24 px views of the other tiny recipes cost. SGD as the other tiny
    recipes (LR 0.4 per 256 images); not tuned by a sweep.
    """
    cfg = Colorization.Config(soft_neighbours=5, soft_sigma=5.0, rebalance_lambda=0.5, prior_sigma=5.0, target_cells=4)
    return _common(cfg, colour_view(32, 0.5), lr_per_256=0.4, batch_size=64)


RECIPES: dict = {"colorization_resnet50": colorization_resnet50, "tiny_colorization": tiny_colorization}
