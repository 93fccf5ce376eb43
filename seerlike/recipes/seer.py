"""SEER (Goyal et al. 2021/2022): SwAV on uncurated images at RegNet scale."""

from __future__ import annotations

from seerlike.data.augment import swav_multicrop
from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.config import LoopConfig, ModelConfig, TrainConfig
from seerlike.methods.swav import SwAV


def seer_regnet_y_256gf() -> TrainConfig:
    """512 GPUs x 16 images (batch 8192), 1B images (~122k steps); LARC 0.001 no clip, fp16, SyncBN groups of 64."""
    return TrainConfig(
        model=ModelConfig(name="regnet_y_256gf"),
        method=SwAV.Config(
            head_dims=(8192, 8192, 256), num_prototypes=16000, temperature=0.1, epsilon=0.05,
            sinkhorn_iters=10, num_crops=6, crops_for_assign=(0, 1), queue_length=0,
            freeze_prototypes_steps=313),
        data=DataConfig(batch_size=16, num_workers=8, augment=swav_multicrop(224, 96, 2, 4)),
        optim=OptimConfig(name="larc", lr=0.3, final_lr=0.0, warmup_steps=8000, momentum=0.9,
                          weight_decay=1e-5, trust_coefficient=0.001, larc_clip=False),
        parallel=ParallelConfig(strategy="fsdp", shard_unit="block", sync_bn=True, sync_bn_group_size=64),
        precision=PrecisionConfig(dtype="fp16"),
        checkpoint=CheckpointConfig(every_steps=2000, keep_last=3),
        loop=LoopConfig(max_steps=1_000_000_000 // 8192, log_every=50),
    )


def seer_regnet_y_10b() -> TrainConfig:
    """496 GPUs x 16 (batch 7936, LR 9.3), FSDP with stage-segment checkpointing [[2],[7],[9,17],[]], 2 x 160 + 4 x 96."""
    return TrainConfig(
        model=ModelConfig(name="regnet_y_10b"),
        method=SwAV.Config(
            head_dims=(8192, 8192, 256), num_prototypes=16000, temperature=0.1, epsilon=0.03,
            sinkhorn_iters=10, num_crops=6, crops_for_assign=(0, 1), queue_length=0,
            freeze_prototypes_steps=313),
        data=DataConfig(batch_size=16, num_workers=8, augment=swav_multicrop(160, 96, 2, 4)),
        optim=OptimConfig(name="larc", lr=0.3, final_lr=0.0, warmup_steps=8000, momentum=0.9,
                          weight_decay=1e-5, trust_coefficient=0.001, larc_clip=False),
        parallel=ParallelConfig(strategy="fsdp", shard_unit="block", mixed_precision_params=True,
                                ac="segments", ac_segments=[[2], [7], [9, 17], []],
                                sync_bn=True, sync_bn_group_size=64),
        precision=PrecisionConfig(dtype="fp16"),
        checkpoint=CheckpointConfig(every_steps=1000, keep_last=3),
        loop=LoopConfig(max_steps=1_000_000_000 // 7936, log_every=50),
    )


RECIPES: dict = {"seer_regnet_y_256gf": seer_regnet_y_256gf, "seer_regnet_y_10b": seer_regnet_y_10b}
