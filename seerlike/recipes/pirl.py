"""PIRL (Misra & van der Maaten 2020): VISSL's ResNet-50 recipe and the CPU recipe.

``pirl_resnet50`` is VISSL's ``pretrain/pirl/pirl_jigsaw_4node_resnet50.yaml``: 32 ranks x 32
images; the image a random resized crop (0.08, 1) to 224 px, the jigsaw made from a separate
crop (0.6, 1) to 255 px (85 px cells, 64 px tiles); colour jitter (0.4, 0.4, 0.4, 0.2) always,
grayscale 0.2, flip; 32,000 negatives, temperature 0.07, bank momentum 0.5, lambda 0.5, NCE;
SGD with momentum 0.9, weight decay 1e-4 except biases and BN, LR 0.03 per 256 images (0.12
at 1024) cosine to 1/1000 of it over 800 epochs, no warmup, fp32. VISSL's random photometric
op (``ImgPilRandomPhotometric``) has no counterpart in seerlike.data.augment and is left out.
"""

from __future__ import annotations

from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.config import LoopConfig, ModelConfig, TrainConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.methods.pirl import PIRL
from seerlike.recipes.tiny import TRAIN_SIZE, _common

STEPS_PER_EPOCH = 1251  # 1,281,167 images // 1024
TINY_PUZZLE_SIZE = 60
"""Side of ``tiny_pirl``'s jigsaw view: 32 px crops upsampled to 60, 20 px cells, 15 px tiles (as tiny_jigsaw)."""


def pirl_views(image_size: int = 224, puzzle_size: int = 255, jitter=(0.4, 0.4, 0.4, 0.2), jitter_p: float = 1.0,
               image_scale: tuple[float, float] = (0.08, 1.0)) -> AugmentConfig:
    """View 0: the image, crop ``image_scale``; view 1: the jigsaw's picture, crop (0.6, 1); both jittered,
    grayscale 0.2, flipped (VISSL's ImgPilToPatchesAndImage, ColorJitter, RandomGrayscale, RandomHorizontalFlip)."""
    common = dict(jitter=jitter, jitter_p=jitter_p, grayscale_p=0.2, blur_p=0.0)
    return AugmentConfig(views=[ViewConfig(count=1, size=image_size, scale=image_scale, **common),
                                ViewConfig(count=1, size=puzzle_size, scale=(0.6, 1.0), **common)])


def pirl_resnet50() -> TrainConfig:
    """32 ranks x 32 images; SGD 0.03 per 256 (0.12), cosine to 3e-5 per 256, wd 1e-4, 800 epochs; K 32,000, T 0.07."""
    return TrainConfig(
        model=ModelConfig(name="resnet50"),
        method=PIRL.Config(transform="jigsaw", embedding_dim=128, num_negatives=32000, temperature=0.07,
                           bank_momentum=0.5, transformed_weight=0.5, gap=0.25, loss="nce"),
        data=DataConfig(batch_size=32, num_workers=8, augment=pirl_views()),
        optim=OptimConfig(name="sgd", lr=0.03, final_lr=0.00003, warmup_steps=0, momentum=0.9, weight_decay=1e-4),
        parallel=ParallelConfig(strategy="ddp"),
        precision=PrecisionConfig(dtype="fp32"),
        checkpoint=CheckpointConfig(every_steps=STEPS_PER_EPOCH, keep_last=3),
        loop=LoopConfig(max_steps=800 * STEPS_PER_EPOCH, log_every=100),
    )


def tiny_pirl() -> TrainConfig:
    """PIRL for short CPU runs, with the paper's rotation transform: two 24 px views (the image, crop (0.14, 1); the
    rotated picture, crop (0.6, 1)), batch 32 per rank, K 4096, temperature 0.1 and the softmax loss (tiny_npid's
    reasons); LR not tuned by a sweep.

    The jigsaw transform (``pirl_resnet50``'s; ``transform=jigsaw`` with a 60 px second view, ``TINY_PUZZLE_SIZE``)
    cuts 32 px images into tiles of 8 px of content, from which no whole-image features come (docs/benchmarks.md,
    "The pretext and clustering methods": +4.3 held-out kNN points at 1,335 steps, against +17.2 for rotation at
    4,291, whose step costs a third).
    """
    pirl = PIRL.Config(transform="rotation", embedding_dim=128, num_negatives=4096, temperature=0.1, bank_momentum=0.5,
                       transformed_weight=0.5, gap=0.25, loss="softmax")
    views = pirl_views(TRAIN_SIZE, TRAIN_SIZE, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, image_scale=(0.14, 1.0))
    return _common(pirl, views, lr_per_256=0.2, batch_size=32)


RECIPES: dict = {"pirl_resnet50": pirl_resnet50, "tiny_pirl": tiny_pirl}
