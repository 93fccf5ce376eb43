"""Distillation recipes for `seerlike distill --teacher T --student ARCH --data D --run-dir R`.

The teacher sees view 0 (weak augmentation), the student view 1 (strong augmentation):
Noisy Student's recipe, with dropout before the student's heads and stochastic depth in
its trunk (``model.drop_path``) in the ``noisy`` variants.
"""

from __future__ import annotations

import dataclasses

from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.config import LoopConfig, ModelConfig, TrainConfig
from seerlike.methods.distill import Distill
from seerlike.recipes.tiny import TRAIN_SIZE


def teacher_student_views(size: int, strong: bool) -> AugmentConfig:
    """View 0 for the teacher (mild crop + flip), view 1 for the student (strong when ``strong``)."""
    weak = ViewConfig(count=1, size=size, scale=(0.5, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    if strong:
        student = ViewConfig(count=1, size=size, scale=(0.14, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8,
                             grayscale_p=0.2, blur_p=0.5 if size >= 64 else 0.0, solarize_p=0.2)
    else:
        student = ViewConfig(count=1, size=size, scale=(0.35, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.5,
                             grayscale_p=0.1, blur_p=0.0)
    return AugmentConfig(views=[weak, student])


def distill_tiny() -> TrainConfig:
    """CPU-sized: a resnet10_cifar student on 24 px views, KL at T=2 on the teacher's logits, plain SGD.

    LR 0.8 per 256 images: in 750 steps the half-width student gained 2.3 points of kNN over
    0.2 from the same teacher (docs/benchmarks.md, "Learning quality", "Distillation sweep"); a
    short schedule wants a high LR. 24 px views instead of 32 px: 1,000 steps in the time of 750,
    and 46.1 instead of 44.2 kNN on 10,000 held-out images from the same teacher (the same page,
    the 24 px views section).
    """
    return TrainConfig(
        model=ModelConfig(name="resnet10_cifar", channels_last=True),
        method=Distill.Config(targets="logits", temperature=2.0),
        data=DataConfig(batch_size=64, num_workers=0, augment=teacher_student_views(TRAIN_SIZE, strong=False)),
        optim=OptimConfig(name="sgd", lr=0.8, final_lr=0.0, warmup_steps=10, momentum=0.9, weight_decay=5e-4),
        parallel=ParallelConfig(strategy="ddp"),
        precision=PrecisionConfig(dtype="auto"),
        checkpoint=CheckpointConfig(every_steps=100, keep_last=2),
        loop=LoopConfig(max_steps=1000, log_every=10),
    )


def distill_noisy_student() -> TrainConfig:
    """Noisy Student at ImageNet scale: ResNet-50 student, strong views, dropout 0.5, stochastic depth 0.2."""
    return TrainConfig(
        model=ModelConfig(name="resnet50", drop_path=0.2),
        method=Distill.Config(targets="logits", temperature=1.0, dropout=0.5),
        data=DataConfig(batch_size=64, num_workers=8, augment=teacher_student_views(224, strong=True)),
        optim=OptimConfig(name="sgd", lr=0.1, final_lr=0.0, warmup_steps=2500, momentum=0.9, weight_decay=1e-4),
        parallel=ParallelConfig(strategy="ddp"),
        precision=PrecisionConfig(dtype="bf16"),
        checkpoint=CheckpointConfig(every_steps=5000, keep_last=3),
        loop=LoopConfig(max_steps=350_000, log_every=100),
    )


def distill_swav_tiny() -> TrainConfig:
    """CPU-sized SwAV-style distillation: the student predicts a SwAV teacher's Sinkhorn assignments."""
    distill = Distill.Config(targets="prototypes", assignment="sinkhorn", swav_temperature=0.1)
    return dataclasses.replace(distill_tiny(), method=distill)


RECIPES: dict = {"distill_tiny": distill_tiny, "distill_noisy_student": distill_noisy_student,
                 "distill_swav_tiny": distill_swav_tiny}
