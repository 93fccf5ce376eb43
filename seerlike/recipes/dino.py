"""DINO (Caron et al. 2021): the official code's ResNet-50 recipe and a CPU recipe.

``dino_resnet50`` is the README's ResNet-50 command of facebookresearch/dino (8 GPUs x 64
images, 100 epochs, ``--optimizer sgd --lr 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4
--global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14``) with main_dino.py's defaults for
everything it does not set: 8 local crops, head 2048 / 256 / 65536 without BN, teacher
temperature 0.04, teacher momentum 0.996, last layer frozen for 1 epoch, per-parameter gradient
clip 3.0, 10 warm-up epochs, cosine to an absolute LR of 1e-6.
"""

from __future__ import annotations

from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.config import LoopConfig, ModelConfig, TrainConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.methods.dino import DINO
from seerlike.recipes.tiny import _common, _two_views

GLOBAL_BATCH = 512
STEPS_PER_EPOCH = 2502  # 1,281,167 images / 8 ranks, 64 per rank, last partial batch dropped


def dino_multicrop(large: int = 224, small: int = 96, n_local: int = 8, global_scale=(0.14, 1.0),
                   local_scale=(0.05, 0.14)) -> AugmentConfig:
    """DataAugmentationDINO: two asymmetric global crops, then ``n_local`` small crops.

    All views: flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2. Global 1 is
    always blurred; global 2 rarely blurred and solarized with p 0.2; local crops blurred with
    p 0.5 (sigma 0.1-2 px as Pillow's radius). The local blur kernel spans 14% of the side so that
    it reaches 3 sigma at sigma 2 on 96 px (Pillow's blur has no such cut-off). Crops are resized
    bilinearly (antialiased) where DINO resizes bicubically.
    """
    common = dict(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_sigma=(0.1, 2.0))
    views = [ViewConfig(size=large, scale=global_scale, blur_p=1.0, solarize_p=0.0, **common),
             ViewConfig(size=large, scale=global_scale, blur_p=0.1, solarize_p=0.2, **common)]
    if n_local:
        views.append(ViewConfig(count=n_local, size=small, scale=local_scale, blur_p=0.5, blur_kernel_frac=0.14,
                                **common))
    return AugmentConfig(views=views)


def dino_resnet50() -> TrainConfig:
    """8 ranks x 64 images; SGD LR 0.03 per 256, wd 1e-4, warmup 10 epochs, cosine; 2 x 224 + 8 x 96 crops.

    bf16 where DINO used fp16: the per-parameter gradient clip runs in the method's
    after-backward hook, which sees fp16's loss-scaled gradients.
    """
    return TrainConfig(
        model=ModelConfig(name="resnet50"),
        method=DINO.Config(out_dim=65536, hidden_dim=2048, bottleneck_dim=256, num_layers=3, use_bn_in_head=False,
                           norm_last_layer=True, momentum_teacher=0.996, student_temp=0.1, teacher_temp=0.04,
                           warmup_teacher_temp=0.04, warmup_teacher_temp_steps=0, center_momentum=0.9,
                           freeze_last_layer_steps=STEPS_PER_EPOCH, clip_grad=3.0),
        data=DataConfig(batch_size=64, num_workers=10, augment=dino_multicrop(224, 96, 8)),
        # min_lr 1e-6 is absolute in main_dino.py; final_lr is per 256 images
        optim=OptimConfig(name="sgd", lr=0.03, final_lr=1e-6 * 256 / GLOBAL_BATCH, warmup_lr=0.0,
                          warmup_steps=10 * STEPS_PER_EPOCH, momentum=0.9, weight_decay=1e-4),
        parallel=ParallelConfig(strategy="ddp", sync_bn=True),
        precision=PrecisionConfig(dtype="bf16"),
        checkpoint=CheckpointConfig(every_steps=STEPS_PER_EPOCH, keep_last=3),
        loop=LoopConfig(max_steps=100 * STEPS_PER_EPOCH, log_every=50),
    )


def tiny_dino() -> TrainConfig:
    """DINO for short CPU budgets: 2 x 24 px global crops, no local crops, head 512 -> 128 -> 2048 with BN.

    No local crops: at 32 px a 12 px local crop carries little of the image, and dropping them made
    the step 0.83x as costly and gave +1.5 kNN points on 10,000 held-out images at equal steps
    (docs/benchmarks.md, "DINO's CPU recipe"; a teacher temperature of 0.07, LR 0.4 and a 4096-way
    head changed nothing beyond noise). BatchNorm in the head, which main_dino.py leaves off:
    without it the teacher went uniform (entropy ln 2048 = 7.62, loss stuck at ln K) within 40
    steps on cifar10-dev and stayed there through step 150; with it the teacher's entropy stayed
    at 6.0-6.4 and the loss fell from 7.6 to 7.0 (150 steps at batch 64, one process, same seed).
    Not measured for learning quality: a faster teacher (momentum 0.99; tiny_byol's target
    measured best at 0.9) and the last layer frozen for 40 steps (as tiny_swav's prototypes).
    """
    dino = DINO.Config(out_dim=2048, hidden_dim=512, bottleneck_dim=128, use_bn_in_head=True, momentum_teacher=0.99,
                       freeze_last_layer_steps=40)
    return _common(dino, _two_views(0.25), lr_per_256=0.2)


RECIPES: dict = {"dino_resnet50": dino_resnet50, "tiny_dino": tiny_dino}
