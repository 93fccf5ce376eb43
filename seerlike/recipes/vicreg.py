"""VICReg on ImageNet-style data (Bardes et al. 2022): ResNet-50, batch 2048, 1000 epochs, and its CPU recipe.

Settings from facebookresearch/vicreg (main_vicreg.py; the README's 1000-epoch command
``--epochs 1000 --batch-size 2048 --base-lr 0.2`` on 4 nodes x 8 GPUs): expander
8192-8192-8192, coefficients 25 / 25 / 1, LARS (eta 1e-3, momentum 0.9, weight decay 1e-6,
biases and norms neither decayed nor adapted), LR 0.2 per 256, warmup 10 epochs, cosine to
1/1000 of the peak, SyncBatchNorm, fp16, BYOL's asymmetric views. Its gradients are the
global-batch gradients, as here, so no factor is needed to match it.
"""

from __future__ import annotations

from seerlike.data.augment import byol_views
from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.config import LoopConfig, ModelConfig, TrainConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.methods.vicreg import VICReg
from seerlike.recipes.barlow_twins import fast_lars
from seerlike.recipes.tiny import _common, _two_views

STEPS_PER_EPOCH = 626  # 1,281,167 images / 2048, the last partial batch kept (as the official loader)


def vicreg_resnet50() -> TrainConfig:
    """32 ranks x 64 images; LARS LR 0.2 per 256, warmup 10 epochs, cosine to 2e-4; weights 25 / 25 / 1."""
    return TrainConfig(
        model=ModelConfig(name="resnet50"),
        method=VICReg.Config(projector_dims=(8192, 8192, 8192), invariance_weight=25.0, variance_weight=25.0,
                             covariance_weight=1.0, gamma=1.0, eps=1e-4),
        data=DataConfig(batch_size=64, num_workers=8, augment=byol_views(224)),
        optim=OptimConfig(name="lars", lr=0.2, final_lr=0.2 / 1000, warmup_steps=10 * STEPS_PER_EPOCH,
                          momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001),
        parallel=ParallelConfig(strategy="ddp", sync_bn=True),
        precision=PrecisionConfig(dtype="fp16"),
        checkpoint=CheckpointConfig(every_steps=STEPS_PER_EPOCH, keep_last=3),
        loop=LoopConfig(max_steps=1000 * STEPS_PER_EPOCH, log_every=50),
    )


def tiny_vicreg() -> TrainConfig:
    """VICReg for short CPU budgets: expander 1024 x 3, weights 25 / 25 / 1, batch 32 per rank, fast LARS.

    LARS with trust 0.02 and LR 0.3 per 256 (solo-learn's scripts/pretrain/cifar/vicreg.yaml), as tiny_barlow_twins:
    in 40-step runs on cifar10-dev (1 rank) the invariance term fell from 0.18 to 0.094
    (0.117 with SGD at 0.02 per 256) and the covariance term from 2.2 to 0.49. In a recorded
    sweep at equal steps (docs/benchmarks.md, "The six new recipes' sweeps") LR 0.15 lost 2.0 held-out kNN points.
    """
    method = VICReg.Config(projector_dims=(1024, 1024, 1024), invariance_weight=25.0, variance_weight=25.0,
                           covariance_weight=1.0)
    return fast_lars(_common(method, _two_views(0.2), lr_per_256=0.3, batch_size=32))


RECIPES: dict = {"vicreg_resnet50": vicreg_resnet50, "tiny_vicreg": tiny_vicreg}
