"""SwAV on ImageNet-style data (Caron et al. 2020): ResNet-50, batch 4096, 800 epochs."""

from __future__ import annotations

from seerlike.data.augment import swav_multicrop
from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.config import LoopConfig, ModelConfig, TrainConfig
from seerlike.methods.swav import SwAV

STEPS_PER_EPOCH = 313  # 1.28M images / 4096


def swav_resnet50() -> TrainConfig:
    """64 ranks x 64 images; LR 4.8 at 4096 (0.3 per 256), warmup 10 epochs from 0.3, cosine to 0.0048."""
    return TrainConfig(
        model=ModelConfig(name="resnet50"),
        method=SwAV.Config(
            head_dims=(2048, 128), num_prototypes=3000, temperature=0.1, epsilon=0.05, sinkhorn_iters=3,
            num_crops=8, crops_for_assign=(0, 1), queue_length=0, freeze_prototypes_steps=313),
        data=DataConfig(batch_size=64, num_workers=8, augment=swav_multicrop(224, 96, 2, 6)),
        optim=OptimConfig(name="larc", lr=0.3, warmup_lr=0.3 / 16, final_lr=0.0048 / 16,
                          warmup_steps=10 * STEPS_PER_EPOCH, momentum=0.9, weight_decay=1e-6,
                          trust_coefficient=0.001, larc_clip=False),
        parallel=ParallelConfig(strategy="ddp", sync_bn=True),
        precision=PrecisionConfig(dtype="fp16"),
        checkpoint=CheckpointConfig(every_steps=STEPS_PER_EPOCH, keep_last=3),
        loop=LoopConfig(max_steps=800 * STEPS_PER_EPOCH, log_every=50),
    )


RECIPES: dict = {"swav_resnet50": swav_resnet50}
