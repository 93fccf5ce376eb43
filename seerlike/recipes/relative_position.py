"""Relative patch position (Doersch et al. 2015): a ResNet-50 recipe and the CPU recipe.

The paper trained an AlexNet-style network and published no ResNet-50 configuration. The
pretext geometry here is the paper's: 96 px patches 48 px apart, jittered by up to 7 px, one
random neighbour per image, colour dropping; the patch grid needs 3 x (96 + 48) = 432 px, so
each image gives one square 432 px view (the paper resized images to 150K-450K pixels and
sampled patch pairs inside them). The optimisation is VISSL's ResNet-50 jigsaw recipe (the
closest siamese patch task with a ResNet-50 configuration; ``recipes/jigsaw.py``): 8 ranks x 32
images, SGD with momentum 0.9, weight decay 1e-4, LR 0.1 per 256 images after a 5-epoch
warmup from 0.025, cosine over 105 epochs.
"""

from __future__ import annotations

from seerlike.data.augment import AugmentConfig
from seerlike.engine.config import TrainConfig
from seerlike.methods.relative_position import RelativePosition
from seerlike.recipes.jigsaw import puzzle_view
from seerlike.recipes.pretext import resnet50_pretext, vissl_sgd
from seerlike.recipes.tiny import _common


TINY_SIZE = 60
"""View side of ``tiny_relative_position``: 32 px CIFAR crops upsampled to 60, 20 px cells, 13 px patches."""


def patch_view(size: int, min_scale: float) -> AugmentConfig:
    """Jigsaw's view without grayscale: colour dropping happens per patch."""
    return puzzle_view(size, min_scale, grayscale_p=0.0)


def relative_position_resnet50() -> TrainConfig:
    """8 ranks x 32 images of 432 px, one pair each; the paper's patches; VISSL's jigsaw optimisation."""
    method = RelativePosition.Config(gap=0.5, jitter=0.073, colour_drop=True, all_pairs=False,
                                     patch_dims=(4096,), pair_dims=(4096, 4096))
    return resnet50_pretext(method, patch_view(432, 0.5), optim=vissl_sgd(warmup_epochs=5))


def tiny_relative_position() -> TrainConfig:
    """Relative position for short CPU runs: one 60 px view (a 32 px image upsampled), 13 px patches, all 8 pairs.

    As ``tiny_jigsaw``: patches of a 32 px view would be 7 px; upsampled to 60 px they are 13 px
    with the paper's gap ratio (cells of 20 px). All 8 pairs of every image are classified (9
    patches per image through the trunk: 32 images per rank cost about what the two-view tiny
    recipes cost) so no decoded image is spent on a single pair. Heads of 256; LR 0.4 per 256
    images; not tuned by a sweep.
    """
    cfg = RelativePosition.Config(gap=0.5, jitter=0.073, colour_drop=True, all_pairs=True, patch_dims=(256,),
                                  pair_dims=(256,))
    return _common(cfg, patch_view(TINY_SIZE, 0.5), lr_per_256=0.4, batch_size=32)


RECIPES: dict = {"relative_position_resnet50": relative_position_resnet50,
                 "tiny_relative_position": tiny_relative_position}
