"""RotNet (Gidaris et al. 2018): VISSL's ResNet-50 recipe and the CPU recipe.

``rotnet_resnet50`` is VISSL's ``pretrain/rotnet/rotnet_8gpu_resnet.yaml``: 8 ranks x 32
images, a 224 px random resized crop and a flip (no colour augmentation), one random rotation
per image, a linear head 2048 -> 4, SGD with momentum 0.9, weight decay 1e-4, LR 0.1 per 256
images for 105 epochs. VISSL steps the LR down 10x at epochs 30, 60, 90 and 100; the engine's
schedule is a cosine, so the decay here is a cosine over the same 105 epochs. VISSL also
decays biases but not BN parameters; here neither is decayed (``exclude_bias_and_norm``).
"""

from __future__ import annotations

from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.engine.config import TrainConfig
from seerlike.methods.rotnet import RotNet
from seerlike.recipes.pretext import resnet50_pretext
from seerlike.recipes.tiny import TRAIN_SIZE, _common


def rotation_view(size: int, min_scale: float) -> AugmentConfig:
    """One random resized crop and flip per image, no colour augmentation (RotNet's and VISSL's input)."""
    return AugmentConfig(views=[ViewConfig(count=1, size=size, scale=(min_scale, 1.0), jitter=(0.0, 0.0, 0.0, 0.0),
                                           jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)])


def rotnet_resnet50() -> TrainConfig:
    """8 ranks x 32 images, one rotation each; SGD 0.1 per 256, wd 1e-4, 105 epochs (cosine for VISSL's steps)."""
    return resnet50_pretext(RotNet.Config(all_rotations=False, head_dims=()), rotation_view(224, 0.08))


def tiny_rotnet() -> TrainConfig:
    """RotNet for short CPU runs: one 24 px view per image in all 4 rotations, batch 32 per rank.

    The trunk sees 4 x 32 = 128 images per rank and step, as many as the two-view tiny recipes
    (2 x 64); no colour augmentation (the official code and VISSL use none). LR 0.4 per 256
    images is 0.1 at the global batch of 64 images, the official code's LR; not tuned by a sweep.
    """
    return _common(RotNet.Config(all_rotations=True, head_dims=()), rotation_view(TRAIN_SIZE, 0.25),
                   lr_per_256=0.4, batch_size=32)


RECIPES: dict = {"rotnet_resnet50": rotnet_resnet50, "tiny_rotnet": tiny_rotnet}
