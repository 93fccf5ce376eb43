"""MoCo v3 (Chen, Xie, He 2021), ResNet form: the official 100-epoch ResNet-50 setup and the CPU recipe.

``moco_v3_resnet50`` is facebookresearch/moco-v3's CONFIG.md ResNet-50 100-epoch command
(``--moco-m-cos --crop-min=.2`` on main_moco.py's defaults): batch 4096, LARS 0.6 per 256
images, weight decay 1e-6, 10 warmup epochs then cosine, temperature 1.0, momentum 0.99 -> 1,
BYOL's asymmetric views with crops from 20% of the image, SyncBN everywhere, residual
blocks' last BN zero-initialised, mixed precision with a loss scaler (fp16).
"""

from __future__ import annotations

from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.config import LoopConfig, ModelConfig, TrainConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.methods.moco_v3 import MoCoV3
from seerlike.recipes.tiny import _common, _two_views

STEPS_PER_EPOCH = 313  # 1.28M images / 4096


def moco_v3_views(size: int = 224, crop_min: float = 0.2) -> AugmentConfig:
    """The official pair: jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2; view 1 always blurred,
    view 2 blurred with p 0.1 and solarized with p 0.2."""
    common = dict(size=size, scale=(crop_min, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2)
    return AugmentConfig(views=[ViewConfig(blur_p=1.0, **common), ViewConfig(blur_p=0.1, solarize_p=0.2, **common)])


def moco_v3_resnet50() -> TrainConfig:
    """64 ranks x 64 images; LARS 0.6 per 256 (9.6), eta 1e-3, wd 1e-6, warmup 10 epochs, cosine, 100 epochs."""
    return TrainConfig(
        model=ModelConfig(name="resnet50", zero_init_residual=True),
        method=MoCoV3.Config(projector_dims=(4096, 256), predictor_dims=(4096, 256), temperature=1.0, momentum=0.99),
        data=DataConfig(batch_size=64, num_workers=8, augment=moco_v3_views(224, 0.2)),
        optim=OptimConfig(name="lars", lr=0.6, final_lr=0.0, warmup_steps=10 * STEPS_PER_EPOCH, momentum=0.9,
                          weight_decay=1e-6, trust_coefficient=0.001),
        parallel=ParallelConfig(strategy="ddp", sync_bn=True),
        precision=PrecisionConfig(dtype="fp16"),
        checkpoint=CheckpointConfig(every_steps=STEPS_PER_EPOCH, keep_last=3),
        loop=LoopConfig(max_steps=100 * STEPS_PER_EPOCH, log_every=50),
    )


def tiny_moco_v3() -> TrainConfig:
    """MoCo v3 for short CPU runs: heads 512 -> 128, temperature 0.2 (1.0 suits batch 4096, not 128),
    momentum 0.9 -> 1 (the EMA rate tiny_byol measured best), tiny.py's two views. In a recorded
    sweep at equal steps (docs/benchmarks.md, "The six new recipes' sweeps") LR 0.6 lost 0.3
    held-out kNN points and temperature 0.1 won 2.0 on seed 0 and 0.1 on seed 1, so both stay.

    BatchNorm per rank, not global: on 2 gloo ranks SyncBN made a step cost 0.658 CPU s against
    0.308 without it (docs/benchmarks.md, "SyncBN in the CPU recipes").
    """
    moco = MoCoV3.Config(projector_dims=(512, 128), predictor_dims=(512, 128), temperature=0.2, momentum=0.9)
    return _common(moco, _two_views(0.2), lr_per_256=0.3)


RECIPES: dict = {"moco_v3_resnet50": moco_v3_resnet50, "tiny_moco_v3": tiny_moco_v3}
