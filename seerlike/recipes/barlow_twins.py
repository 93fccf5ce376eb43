"""Barlow Twins on ImageNet-style data (Zbontar et al. 2021): ResNet-50, batch 2048, 1000 epochs, and its CPU recipe.

Settings from facebookresearch/barlowtwins (main.py; the README's best command before commit
046eec3, ``--epochs 1000 --batch-size 2048 --learning-rate 0.2 --lambd 0.0051 --projector
8192-8192-8192 --scale-loss 0.024``, run on 16 GPUs): LARS (eta 1e-3, momentum 0.9, weight
decay 1e-6, biases and norms neither decayed nor adapted), LR 0.2 per 256, warmup 10 epochs,
cosine to 1/1000 of the peak, SyncBatchNorm, fp16, BYOL's asymmetric views.

The loss scale: that code summed the cross-correlation with a plain all_reduce, so after
DDP's gradient averaging its updates used 1/16 of the global-batch gradient (1 / its 16
ranks; tests/dist/test_barlow_twins_dist.py shows the 1/world factor). This implementation
uses the full gradient on any number of ranks, so ``scale_loss = 0.024 / 16`` gives that
run's updates exactly. (Under LARS the factor sets the weight decay's strength relative to
the gradient and the step of the non-adapted biases and norms: 0.2 x 0.024 = 0.0048 per 256
is the ``--learning-rate-biases`` that later replaced ``--scale-loss``.)
"""

from __future__ import annotations

import dataclasses

from seerlike.data.augment import byol_views
from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.config import LoopConfig, ModelConfig, TrainConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.methods.barlow_twins import BarlowTwins
from seerlike.recipes.tiny import _common, _two_views

STEPS_PER_EPOCH = 626  # 1,281,167 images / 2048, the last partial batch kept (as the official loader)
OFFICIAL_RANKS = 16


def barlow_twins_resnet50() -> TrainConfig:
    """16 ranks x 128 images; LARS LR 0.2 per 256, warmup 10 epochs, cosine to 2e-4; lambda 0.0051."""
    return TrainConfig(
        model=ModelConfig(name="resnet50"),
        method=BarlowTwins.Config(projector_dims=(8192, 8192, 8192), lambd=0.0051,
                                  scale_loss=0.024 / OFFICIAL_RANKS),
        data=DataConfig(batch_size=128, num_workers=8, augment=byol_views(224)),
        optim=OptimConfig(name="lars", lr=0.2, final_lr=0.2 / 1000, warmup_steps=10 * STEPS_PER_EPOCH,
                          momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001),
        parallel=ParallelConfig(strategy="ddp", sync_bn=True),
        precision=PrecisionConfig(dtype="fp16"),
        checkpoint=CheckpointConfig(every_steps=STEPS_PER_EPOCH, keep_last=3),
        loop=LoopConfig(max_steps=1000 * STEPS_PER_EPOCH, log_every=50),
    )


def tiny_barlow_twins() -> TrainConfig:
    """Barlow Twins for short CPU budgets: projector 1024 x 3, lambda 0.0051, batch 32 per rank, fast LARS.

    LARS with trust 0.02 (not 1e-3), LR 0.3 per 256 and scale_loss 0.1, as solo-learn's CIFAR-10
    recipe (scripts/pretrain/cifar/barlow.yaml, whose LARS also clips; LARS makes the weights'
    steps independent of the loss scale). In 40-step runs on cifar10-dev (1 rank) the loss
    fell by 27% (the mean diagonal correlation rose from 0.19 to 0.40), while SGD at 0.2 per
    256 with scale_loss 0.024 or 0.1 stayed flat. In a recorded sweep at equal steps
    (docs/benchmarks.md, "The six new recipes' sweeps") LR 0.6 lost 2.9 held-out kNN points;
    LR 0.15 won 1.4 on seed 0 and lost 0.2 on seed 1, so 0.3 stays.
    """
    method = BarlowTwins.Config(projector_dims=(1024, 1024, 1024), lambd=0.0051, scale_loss=0.1)
    return fast_lars(_common(method, _two_views(0.2), lr_per_256=0.3, batch_size=32))


def fast_lars(cfg: TrainConfig) -> TrainConfig:
    """A tiny recipe switched to LARS with trust coefficient 0.02 (biases and norms excluded), its LR kept."""
    cfg.optim = dataclasses.replace(cfg.optim, name="lars", trust_coefficient=0.02)
    return cfg


RECIPES: dict = {"barlow_twins_resnet50": barlow_twins_resnet50, "tiny_barlow_twins": tiny_barlow_twins}
