"""SeLa (Asano et al. 2020): ResNet-50, batch 256, 400 epochs, and its CPU recipe (the SeLa-v2 form).

Settings from yukimasano/self-label scripts/resnet.sh and main.py: 10 heads of 3000 classes on
the 2048-d features, lambda 25 (epsilon 0.04), 100 labellings in 400 epochs (spread
quadratically there; every 4 epochs here), batch 256 on 4 GPUs, SGD LR 0.05, momentum 0.9,
weight decay 1e-5, LR x 0.1 every 150 epochs (a cosine to 5e-5 here: the engine's schedule),
augmentation level 3 (random resized crop, grayscale 0.2, colour jitter 0.4 on all four, flip).
The reference trunk is a pre-activation ResNet-50; here torchvision's.
"""

from __future__ import annotations

from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.config import LoopConfig, ModelConfig, TrainConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.methods.sela import SeLa
from seerlike.recipes.tiny import _common, _two_views

STEPS_PER_EPOCH = 5004  # 1,281,167 images // 256


def sela_resnet50() -> TrainConfig:
    """4 ranks x 64 images; SGD LR 0.05 per 256, wd 1e-5, cosine to 5e-5; 10 heads x 3000, relabel every 4 epochs."""
    view = ViewConfig(size=224, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, grayscale_p=0.2)
    return TrainConfig(
        model=ModelConfig(name="resnet50"),
        method=SeLa.Config(head_dims=(), num_prototypes=(3000,) * 10, normalize=False, temperature=1.0,
                           epsilon=1 / 25, crops_for_assign=(0,), label_every=4 * STEPS_PER_EPOCH),
        data=DataConfig(batch_size=64, num_workers=8, augment=AugmentConfig(views=[view])),
        optim=OptimConfig(name="sgd", lr=0.05, final_lr=0.05e-3, momentum=0.9, weight_decay=1e-5),
        parallel=ParallelConfig(strategy="ddp"),
        precision=PrecisionConfig(dtype="bf16"),
        checkpoint=CheckpointConfig(every_steps=STEPS_PER_EPOCH, keep_last=3),
        loop=LoopConfig(max_steps=400 * STEPS_PER_EPOCH, log_every=50),
    )


def tiny_sela() -> TrainConfig:
    """SeLa-v2 for short CPU budgets: tiny_swav's two 24 px views, head 2048 -> 128 normalised, 3 heads of 100
    unit prototypes, temperature 0.1, epsilon 0.05, relabelled once per pass (39 steps of cifar10-dev at 64 x 2)."""
    method = SeLa.Config(head_dims=(2048, 128), num_prototypes=(100, 100, 100), normalize=True, temperature=0.1,
                         epsilon=0.05, crops_for_assign=(0, 1), label_every=0)
    return _common(method, _two_views(0.25), lr_per_256=0.2)


RECIPES: dict = {"sela_resnet50": sela_resnet50, "tiny_sela": tiny_sela}
