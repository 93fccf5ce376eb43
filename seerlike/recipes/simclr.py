"""SimCLR (Chen et al. 2020): the official ImageNet command and the CPU recipe.

``simclr_resnet50`` is the google-research/simclr README's ImageNet pretraining command:
ResNet-50 (last BN of every residual block zero-initialised, as its resnet.py does), batch
4096, 100 epochs, LARS at 0.3 per 256 images (the README's 0.075 with square-root scaling is
the same LR at batch 4096), weight decay 1e-4, 10 warmup epochs then cosine, temperature 0.1,
a 3-layer projection head and BatchNorm over all devices (``parallel.sync_bn``).
"""

from __future__ import annotations

from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.config import LoopConfig, ModelConfig, TrainConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.methods.simclr import SimCLR
from seerlike.recipes.tiny import _common, _two_views

STEPS_PER_EPOCH = 313  # 1.28M images / 4096


def simclr_views(size: int = 224) -> AugmentConfig:
    """Two identically distributed views: crop (0.08, 1), flip, jitter of strength 1.0 (p 0.8), grayscale 0.2, blur 0.5."""
    return AugmentConfig(views=[ViewConfig(count=2, size=size, scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2),
                                           jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)])


def simclr_resnet50() -> TrainConfig:
    """64 ranks x 64 images; LARS 0.3 per 256 (4.8), eta 1e-3, wd 1e-4, warmup 10 epochs, cosine; T 0.1; global BN."""
    return TrainConfig(
        model=ModelConfig(name="resnet50", zero_init_residual=True),
        method=SimCLR.Config(temperature=0.1, proj_layers=3, proj_hidden=0, proj_out=128),
        data=DataConfig(batch_size=64, num_workers=8, augment=simclr_views(224)),
        optim=OptimConfig(name="lars", lr=0.3, final_lr=0.0, warmup_steps=10 * STEPS_PER_EPOCH, momentum=0.9,
                          weight_decay=1e-4, trust_coefficient=0.001),
        parallel=ParallelConfig(strategy="ddp", sync_bn=True),
        precision=PrecisionConfig(dtype="bf16"),
        checkpoint=CheckpointConfig(every_steps=STEPS_PER_EPOCH, keep_last=3),
        loop=LoopConfig(max_steps=100 * STEPS_PER_EPOCH, log_every=50),
    )


def tiny_simclr() -> TrainConfig:
    """SimCLR for short CPU runs: temperature 0.2 (as solo-learn's CIFAR runs; the official CIFAR-10 runs
    use 0.5), jitter strength 0.5 (tiny.py's two views), head 256-256-128 (the trunk's width).

    Temperature and LR from a recorded sweep at equal steps (docs/benchmarks.md, "The six new recipes'
    sweeps"): 0.2 beat 0.5 by 1.3 and 2.1 held-out kNN points on seeds 0 and 1; LR 0.6 lost 2.1.

    BatchNorm per rank, not global: on 2 gloo ranks the all-reduce of every BN layer made a step
    cost 0.466 CPU s against 0.275 without it (docs/benchmarks.md, "SyncBN in the CPU recipes"),
    and the official CIFAR-10 runs train on one device, where BN sees the device's batch.
    """
    return _common(SimCLR.Config(temperature=0.2, proj_layers=3, proj_hidden=0, proj_out=128),
                   _two_views(0.14), lr_per_256=0.3)


RECIPES: dict = {"simclr_resnet50": simclr_resnet50, "tiny_simclr": tiny_simclr}
