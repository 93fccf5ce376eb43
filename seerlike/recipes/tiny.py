"""Small CPU recipes that actually learn in minutes on 2 cores (FACTS.md, "What learns in 15 minutes").

A CIFAR-style ResNet-10, two 32 px views, bf16 autocast + channels_last, plain SGD and many
steps. The textbook recipes scaled down (LARS, multi-crop on 32 px images, many prototypes)
stay near ln K in such a budget, so these deliberately differ from the paper recipes.
Global batch 128 on 2 ranks; the LR is per 256 images (0.2 -> 0.1 at batch 128).
"""

from __future__ import annotations

from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.train import LoopConfig, MethodConfig, ModelConfig, TrainConfig
from seerlike.methods.byol import BYOL
from seerlike.methods.swav import SwAV


def _common(method: MethodConfig, augment: AugmentConfig, lr_per_256: float, batch_size: int = 64) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="resnet10_cifar", channels_last=True),
        method=method,
        data=DataConfig(batch_size=batch_size, num_workers=1, augment=augment),
        optim=OptimConfig(name="sgd", lr=lr_per_256, final_lr=0.0, warmup_steps=10, momentum=0.9,
                          weight_decay=1e-5),
        parallel=ParallelConfig(strategy="fsdp"),
        precision=PrecisionConfig(dtype="bf16"),
        checkpoint=CheckpointConfig(every_steps=10, keep_last=3),
        loop=LoopConfig(max_steps=2000, log_every=10),
    )


def _two_views() -> AugmentConfig:
    """2 x 32 px crops at scale (0.14, 1), jitter, grayscale; no blur (it erases 32 px images)."""
    return AugmentConfig(views=[ViewConfig(count=2, size=32, scale=(0.14, 1.0), jitter=(0.4, 0.4, 0.4, 0.1),
                                           jitter_p=0.8, grayscale_p=0.2, blur_p=0.0)])


def tiny_swav() -> TrainConfig:
    """SwAV, 2 x 32 px crops at scale (0.14, 1), 100 prototypes, no queue, no blur."""
    swav = SwAV.Config(head_dims=(2048, 128), num_prototypes=100, epsilon=0.05, sinkhorn_iters=3,
                       temperature=0.1, num_crops=2, crops_for_assign=(0, 1), queue_length=0,
                       freeze_prototypes_steps=40)
    return _common(MethodConfig(name="swav", swav=swav), _two_views(), lr_per_256=0.2)


def tiny_byol() -> TrainConfig:
    """BYOL for short CPU budgets: batch 32 per rank, heads 512 -> 128, tau 0.95 -> 1, SwAV's two views.

    Measured on cifar10-dev at a fixed CPU budget (docs/benchmarks.md): smaller batches (more
    steps), smaller heads and a faster-moving target each helped; BYOL's always-blurred view
    erases 32 px images.
    """
    byol = BYOL.Config(projector_dims=(512, 128), predictor_dims=(512, 128), tau_base=0.95)
    return _common(MethodConfig(name="byol", byol=byol), _two_views(), lr_per_256=0.4, batch_size=32)


RECIPES: dict = {"tiny_swav": tiny_swav, "tiny_byol": tiny_byol}
