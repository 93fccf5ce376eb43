"""ClusterFit recipes: retrain from scratch on k-means pseudo-labels (`seerlike cluster`).

Set ``data.labels`` to the cluster output and ``method.num_classes`` to its k:
``seerlike train --recipe clusterfit_tiny --data TRAIN --run-dir RUN data.labels=CLUSTERS
method.num_classes=K``. "Standard augmentation" is the supervised ImageNet one:
one random resized crop (scale 0.08-1) with a flip and light colour jitter.
"""

from __future__ import annotations

from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.config import LoopConfig, ModelConfig, TrainConfig
from seerlike.methods.clusterfit import ClusterFit
from seerlike.recipes.tiny import TRAIN_SIZE


def standard_view(size: int) -> AugmentConfig:
    """One supervised-style view: random resized crop, flip, light colour jitter."""
    return AugmentConfig(views=[ViewConfig(count=1, size=size, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.0),
                                           jitter_p=0.8, grayscale_p=0.0, blur_p=0.0)])


def clusterfit_resnet50() -> TrainConfig:
    """ClusterFit as in VISSL: ResNet-50 from scratch on 16,000 pseudo-classes, SGD 0.1 per 256, ~105 epochs of ImageNet."""
    return TrainConfig(
        model=ModelConfig(name="resnet50", zero_init_residual=True),
        method=ClusterFit.Config(num_classes=16000),
        data=DataConfig(batch_size=32, num_workers=8, augment=standard_view(224)),
        optim=OptimConfig(name="sgd", lr=0.1, final_lr=0.0, warmup_steps=5000, momentum=0.9, weight_decay=1e-4),
        parallel=ParallelConfig(strategy="ddp"),
        precision=PrecisionConfig(dtype="bf16"),
        checkpoint=CheckpointConfig(every_steps=5000, keep_last=3),
        loop=LoopConfig(max_steps=525_000, log_every=100),
    )


def clusterfit_tiny() -> TrainConfig:
    """CPU-sized ClusterFit: ResNet-10 (CIFAR stem) on 24 px views, 200 pseudo-classes, plain SGD at LR 0.8 per 256.

    Chosen on cifar10-dev at a fixed 3-minute budget from one SwAV model's features
    (docs/benchmarks.md, "Learning quality", the 24 px views section, its ClusterFit table): 24 px
    views (more steps in the same time;
    the kNN at 32 px gains), k 200 instead of 100 and LR 0.8 instead of 0.2 each added about
    0.5-1.5 points; lighter crops, label smoothing and LR 0.4 changed nothing measurable.
    """
    return TrainConfig(
        model=ModelConfig(name="resnet10_cifar", channels_last=True),
        method=ClusterFit.Config(num_classes=200),
        data=DataConfig(batch_size=64, num_workers=0, augment=standard_view(TRAIN_SIZE)),
        optim=OptimConfig(name="sgd", lr=0.8, final_lr=0.0, warmup_steps=10, momentum=0.9, weight_decay=5e-4),
        parallel=ParallelConfig(strategy="ddp"),
        precision=PrecisionConfig(dtype="auto"),
        checkpoint=CheckpointConfig(every_steps=100, keep_last=2),
        loop=LoopConfig(max_steps=1000, log_every=10),
    )


RECIPES: dict = {"clusterfit_resnet50": clusterfit_resnet50, "clusterfit_tiny": clusterfit_tiny}
