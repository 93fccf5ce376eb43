"""SimSiam on ImageNet-style data (Chen & He 2021): ResNet-50, batch 512, 100 epochs, and its CPU recipe.

Settings from facebookresearch/simsiam (main_simsiam.py and the README's command, which
passes --fix-pred-lr): SGD, LR 0.05 per 256, momentum 0.9, weight decay 1e-4 on every
parameter, cosine decay to 0 without warmup, the predictor at the constant peak LR
(``optim.fixed_lr``), SyncBatchNorm, 8 GPUs x 64 images, fp32, MoCo v2's augmentation.
"""

from __future__ import annotations

import dataclasses

from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.config import LoopConfig, ModelConfig, TrainConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.methods.simsiam import SimSiam
from seerlike.recipes.tiny import _common, _two_views

STEPS_PER_EPOCH = 2502  # 1,281,167 images // 512 (the official loader drops the last partial batch)


def mocov2_views(size: int = 224) -> AugmentConfig:
    """MoCo v2's symmetric pair: crops at scale (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) w.p. 0.8, gray 0.2, blur 0.5."""
    return AugmentConfig(views=[ViewConfig(count=2, size=size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1),
                                           jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0))])


def simsiam_resnet50() -> TrainConfig:
    """8 ranks x 64 images; SGD LR 0.05 per 256 (0.1 at 512), cosine, no warmup; predictor LR fixed at 0.1."""
    return TrainConfig(
        model=ModelConfig(name="resnet50"),
        method=SimSiam.Config(projector_dims=(2048, 2048, 2048), predictor_dims=(512, 2048)),
        data=DataConfig(batch_size=64, num_workers=8, augment=mocov2_views(224)),
        optim=OptimConfig(name="sgd", lr=0.05, final_lr=0.0, warmup_steps=0, momentum=0.9, weight_decay=1e-4,
                          exclude_bias_and_norm=False, fixed_lr=("predictor",)),
        parallel=ParallelConfig(strategy="ddp", sync_bn=True),
        precision=PrecisionConfig(dtype="fp32"),
        checkpoint=CheckpointConfig(every_steps=STEPS_PER_EPOCH, keep_last=3),
        loop=LoopConfig(max_steps=100 * STEPS_PER_EPOCH, log_every=50),
    )


def tiny_simsiam() -> TrainConfig:
    """SimSiam for short CPU budgets: heads 512 -> 512 -> 512 and 128 -> 512, batch 32 per rank, predictor LR fixed.

    SGD at 0.4 per 256 (tiny_byol's): in 40-step runs on cifar10-dev (1 rank) the loss fell
    to -0.13 against -0.03 at 0.1, with the outputs' z_std still about 1 (no collapse). In a recorded
    sweep at equal steps (docs/benchmarks.md, "The six new recipes' sweeps") LR 0.2 and 0.8 per 256 lost 1.0 and 0.3
    held-out kNN points to it.
    """
    cfg = _common(SimSiam.Config(projector_dims=(512, 512, 512), predictor_dims=(128, 512)), _two_views(0.2),
                  lr_per_256=0.4, batch_size=32)
    cfg.optim = dataclasses.replace(cfg.optim, fixed_lr=("predictor",))
    return cfg


RECIPES: dict = {"simsiam_resnet50": simsiam_resnet50, "tiny_simsiam": tiny_simsiam}
