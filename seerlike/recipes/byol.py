"""BYOL on ImageNet-style data (Grill et al. 2020): ResNet-50, batch 4096, 1000 epochs."""

from __future__ import annotations

from seerlike.data.augment import byol_views
from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.config import LoopConfig, ModelConfig, TrainConfig
from seerlike.methods.byol import BYOL

STEPS_PER_EPOCH = 313  # 1.28M images / 4096


def byol_resnet50() -> TrainConfig:
    """64 ranks x 64 images; LARS eta 1e-3, LR 0.2 per 256, warmup 10 epochs, cosine; tau 0.996."""
    return TrainConfig(
        model=ModelConfig(name="resnet50"),
        method=BYOL.Config(projector_dims=(4096, 256), predictor_dims=(4096, 256),
                                                          tau_base=0.996),
        data=DataConfig(batch_size=64, num_workers=8, augment=byol_views(224)),
        optim=OptimConfig(name="lars", lr=0.2, final_lr=0.0, warmup_steps=10 * STEPS_PER_EPOCH, momentum=0.9,
                          weight_decay=1.5e-6, trust_coefficient=0.001),
        parallel=ParallelConfig(strategy="ddp", sync_bn=True),
        precision=PrecisionConfig(dtype="bf16"),
        checkpoint=CheckpointConfig(every_steps=STEPS_PER_EPOCH, keep_last=3),
        loop=LoopConfig(max_steps=1000 * STEPS_PER_EPOCH, log_every=50),
    )


RECIPES: dict = {"byol_resnet50": byol_resnet50}
