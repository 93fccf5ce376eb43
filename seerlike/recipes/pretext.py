"""What the ResNet-50 recipes of the pretext tasks share (rotation, jigsaw, relative position,
colorization, multi-task): VISSL's 8-GPU ImageNet set-up (``pretrain/rotnet/rotnet_8gpu_resnet.yaml``,
``pretrain/jigsaw/jigsaw_8gpu_resnet.yaml``) and its optimiser.

8 ranks x 32 images under DDP in bf16, a checkpoint every epoch (3 kept); SGD with momentum 0.9,
weight decay 1e-4, LR 0.1 per 256 images for 105 epochs. VISSL steps the LR down 10x at epochs
30, 60, 90 and 100; the engine's schedule is a cosine, so here a cosine decays it to 0 over the run.
"""

from __future__ import annotations

from seerlike.data.augment import AugmentConfig
from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.config import LoopConfig, ModelConfig, TrainConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.methods.base import MethodConfig

STEPS_PER_EPOCH = 5005  # 1,281,167 images / 256


def vissl_sgd(warmup_epochs: int = 0) -> OptimConfig:
    """VISSL's pretext SGD (module docstring); ``warmup_epochs`` > 0: a linear warmup from 0.025 first (its jigsaw)."""
    return OptimConfig(name="sgd", lr=0.1, warmup_lr=0.025 if warmup_epochs else 0.0, final_lr=0.0,
                       warmup_steps=warmup_epochs * STEPS_PER_EPOCH, momentum=0.9, weight_decay=1e-4)


def resnet50_pretext(method: MethodConfig, augment: AugmentConfig, *, optim: OptimConfig | None = None,
                     epochs: int = 105) -> TrainConfig:
    """A ResNet-50 trained on ``method`` with the views of ``augment`` in VISSL's set-up for ``epochs`` ImageNet
    epochs; ``optim`` defaults to :func:`vissl_sgd` without warmup."""
    return TrainConfig(
        model=ModelConfig(name="resnet50"),
        method=method,
        data=DataConfig(batch_size=32, num_workers=8, augment=augment),
        optim=optim or vissl_sgd(),
        parallel=ParallelConfig(strategy="ddp"),
        precision=PrecisionConfig(dtype="bf16"),
        checkpoint=CheckpointConfig(every_steps=STEPS_PER_EPOCH, keep_last=3),
        loop=LoopConfig(max_steps=epochs * STEPS_PER_EPOCH, log_every=100),
    )
