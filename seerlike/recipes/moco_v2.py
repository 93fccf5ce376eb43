"""MoCo v2 (Chen et al. 2020): the official ImageNet command and the CPU recipe.

``moco_v2_resnet50`` is facebookresearch/moco's MoCo v2 command (``--mlp --moco-t 0.2
--aug-plus --cos``, 200 epochs): ResNet-50, batch 256 over 8 ranks, SGD 0.03 with weight decay
1e-4 on every parameter, cosine without warmup, queue 65,536, momentum 0.999, per-rank BN with
the keys' batch shuffled across ranks (so ``parallel.sync_bn`` stays off), fp32 as in the
official code.
"""

from __future__ import annotations

from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.config import LoopConfig, ModelConfig, TrainConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.methods.moco_v2 import MoCoV2
from seerlike.recipes.tiny import _common, _two_views

STEPS_PER_EPOCH = 5004  # 1,281,167 images // 256 (the official loader drops the last partial batch)


def moco_v2_views(size: int = 224) -> AugmentConfig:
    """The official 'aug+' pair: crop (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2, blur 0.5, flip."""
    return AugmentConfig(views=[ViewConfig(count=2, size=size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1),
                                           jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)])


def moco_v2_resnet50() -> TrainConfig:
    """8 ranks x 32 images; SGD 0.03 per 256, momentum 0.9, wd 1e-4 (biases and BN too), cosine, 200 epochs."""
    return TrainConfig(
        model=ModelConfig(name="resnet50"),
        method=MoCoV2.Config(head_dims=(2048, 128), queue_length=65536, momentum=0.999, temperature=0.2),
        data=DataConfig(batch_size=32, num_workers=8, augment=moco_v2_views(224)),
        optim=OptimConfig(name="sgd", lr=0.03, final_lr=0.0, warmup_steps=0, momentum=0.9, weight_decay=1e-4,
                          exclude_bias_and_norm=False),
        parallel=ParallelConfig(strategy="ddp", sync_bn=False),
        precision=PrecisionConfig(dtype="fp32"),
        checkpoint=CheckpointConfig(every_steps=STEPS_PER_EPOCH, keep_last=3),
        loop=LoopConfig(max_steps=200 * STEPS_PER_EPOCH, log_every=50),
    )


def tiny_moco_v2() -> TrainConfig:
    """MoCo v2 for short CPU runs, with the official CIFAR-10 demo's queue 4,096, momentum 0.99 and
    temperature 0.1; head 512-128; crop (0.2, 1) as aug+. In a recorded sweep at equal steps
    (docs/benchmarks.md, "The six new recipes' sweeps") LR 0.3 lost 1.4 held-out kNN points."""
    moco = MoCoV2.Config(head_dims=(512, 128), queue_length=4096, momentum=0.99, temperature=0.1)
    return _common(moco, _two_views(0.2), lr_per_256=0.1)


RECIPES: dict = {"moco_v2_resnet50": moco_v2_resnet50, "tiny_moco_v2": tiny_moco_v2}
