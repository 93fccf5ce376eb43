"""Small CPU recipes that actually learn in minutes on 2 cores (docs/benchmarks.md, "Learning quality").

A CIFAR-style ResNet-10, two 24 px views of the 32 px images (``TRAIN_SIZE``), bf16 autocast
where the CPU has native bf16 (``precision.dtype=auto``: fp32 elsewhere, where emulated bf16 costs
17.6x; docs/engine.md, "bf16 on CPUs") + channels_last, plain SGD and many steps. The textbook
recipes scaled down (LARS, multi-crop on 32 px images, many prototypes) stay near ln K in such a
budget, so these deliberately differ from the paper recipes. Global batch 128 on 2 ranks; the LR is per 256 images (0.2 -> 0.1 at batch 128).

DDP and no DataLoader worker (the rank decodes its own 32 px JPEGs): on 2 cores, 2 ranks with
a worker each put 4 processes on 2 cores. FSDP2 made a SwAV step 1.13x and 1.27x as costly
as DDP in two runs (the second ``benchmarks/bench_step_cost.py``); a worker per rank 1.18x in
the first and no measurable cost in the second (docs/benchmarks.md, "Learning quality", the 24 px
views section, "Step cost"); FSDP2 also keeps the weights out of channels_last. FSDP2 on these
recipes stays one override away (``parallel.strategy=fsdp``) and is what the dist tests check.
"""

from __future__ import annotations

from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.config import LoopConfig, ModelConfig, TrainConfig
from seerlike.methods.base import MethodConfig
from seerlike.methods.byol import BYOL
from seerlike.methods.swav import SwAV

TRAIN_SIZE = 24
"""Side of the training views of the CPU recipes; evaluation and k-means features stay at the images' 32 px.

A SwAV step at 24 px costs 0.65x one at 32 px (``benchmarks/bench_step_cost.py``), so a
fixed CPU budget buys about 1.5x the steps; random resized crops at 24 px also show objects at about the scale a whole 32 px image
shows them at test time (FixRes). Measured on cifar10-dev (docs/benchmarks.md, "Learning quality"):
at the same CPU time, SwAV +2.8 to +3.5 and ClusterFit +1.8 points of kNN on 10,000 held-out
images over 32 px views; the same models scored at 24 px lose 1.2 points against 32 px.
"""


def _common(method: MethodConfig, augment: AugmentConfig, lr_per_256: float, batch_size: int = 64) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="resnet10_cifar", channels_last=True),
        method=method,
        data=DataConfig(batch_size=batch_size, num_workers=0, augment=augment),
        optim=OptimConfig(name="sgd", lr=lr_per_256, final_lr=0.0, warmup_steps=10, momentum=0.9,
                          weight_decay=1e-5),
        parallel=ParallelConfig(strategy="ddp"),
        precision=PrecisionConfig(dtype="auto"),
        checkpoint=CheckpointConfig(every_steps=10, keep_last=3),
        loop=LoopConfig(max_steps=2000, log_every=10),
    )


def _two_views(min_scale: float) -> AugmentConfig:
    """2 x ``TRAIN_SIZE`` crops at scale (min_scale, 1), jitter, grayscale; no blur (it erases 32 px images)."""
    return AugmentConfig(views=[ViewConfig(count=2, size=TRAIN_SIZE, scale=(min_scale, 1.0),
                                           jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_p=0.0)])


def tiny_swav() -> TrainConfig:
    """SwAV, 2 x 32 px crops at scale (0.14, 1), 100 prototypes, no queue, no blur."""
    swav = SwAV.Config(head_dims=(2048, 128), num_prototypes=100, epsilon=0.05, sinkhorn_iters=3,
                       temperature=0.1, num_crops=2, crops_for_assign=(0, 1), queue_length=0,
                       freeze_prototypes_steps=40)
    return _common(swav, _two_views(0.25), lr_per_256=0.2)


def tiny_byol() -> TrainConfig:
    """BYOL for short CPU budgets: batch 32 per rank, heads 512 -> 128, tau 0.9 -> 1, SwAV's two views.

    Measured on cifar10-dev at a fixed CPU budget (docs/benchmarks.md): smaller batches (more
    steps), smaller heads and a faster-moving target each helped (tau_base 0.9 over 0.95: +1.1
    points of kNN on 10,000 held-out images, 0.8 no further); BYOL's always-blurred view erases
    32 px images. LARS, a 10x predictor LR and more weight decay moved it by 0.5 points or less
    (docs/benchmarks.md, "BYOL's levers").
    """
    byol = BYOL.Config(projector_dims=(512, 128), predictor_dims=(512, 128), tau_base=0.9)
    return _common(byol, _two_views(0.14), lr_per_256=0.4, batch_size=32)


RECIPES: dict = {"tiny_swav": tiny_swav, "tiny_byol": tiny_byol}
