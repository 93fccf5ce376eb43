"""DeepCluster-v2 (SwAV paper, appendix): ResNet-50, batch 4096, 800 epochs, and its CPU recipe.

Settings from facebookresearch/swav scripts/deepclusterv2_800ep_pretrain.sh (main_deepclusterv2.py):
64 GPUs x 64 images, 2 x 224 + 6 x 96 crops (scales (0.14, 1) and (0.05, 0.14)), assignments
from crops 0 and 1, 3 heads of 3000 prototypes, temperature 0.1, projection 2048 -> 128; SGD
momentum 0.9 wrapped by LARC (trust 0.001, scale mode), LR 4.8 (0.3 per 256) after 10 warmup
epochs from 0.3, cosine to 0.0048, weight decay 1e-6, apex SyncBatchNorm in groups of 8 GPUs.
The reference trains in fp32; here bf16 autocast (scores, k-means and the memory stay fp32).
"""

from __future__ import annotations

from seerlike.data.augment import swav_multicrop
from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.config import LoopConfig, ModelConfig, TrainConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.methods.deepcluster_v2 import DeepClusterV2
from seerlike.recipes.tiny import _common, _two_views

STEPS_PER_EPOCH = 312  # 1,281,167 images // 4096: the reference drops the last partial batch, as the memory's pass


def deepcluster_v2_resnet50() -> TrainConfig:
    """64 ranks x 64 images; LARC LR 0.3 per 256, warmup 10 epochs from 0.3 / 16, cosine to 0.0048 / 16."""
    return TrainConfig(
        model=ModelConfig(name="resnet50"),
        method=DeepClusterV2.Config(head_dims=(2048, 128), num_prototypes=(3000, 3000, 3000), temperature=0.1,
                                    crops_for_assign=(0, 1), kmeans_iters=10),
        data=DataConfig(batch_size=64, num_workers=8, augment=swav_multicrop(224, 96, 2, 6)),
        optim=OptimConfig(name="larc", lr=0.3, warmup_lr=0.3 / 16, final_lr=0.0048 / 16,
                          warmup_steps=10 * STEPS_PER_EPOCH, momentum=0.9, weight_decay=1e-6,
                          trust_coefficient=0.001, larc_clip=False),
        parallel=ParallelConfig(strategy="ddp", sync_bn=True, sync_bn_group_size=8),
        precision=PrecisionConfig(dtype="bf16"),
        checkpoint=CheckpointConfig(every_steps=STEPS_PER_EPOCH, keep_last=3),
        loop=LoopConfig(max_steps=800 * STEPS_PER_EPOCH, log_every=50),
    )


def tiny_deepcluster_v2() -> TrainConfig:
    """DeepCluster-v2 for short CPU budgets: tiny_swav's two 24 px views, head 2048 -> 128, 3 heads of 100 clusters.

    The first pass over the data only fills the memory (loss 0); at batch 64 x 2 ranks a pass of
    cifar10-dev's 5,000 images is 39 steps. 100 clusters per head as tiny_swav's 100 prototypes.
    """
    method = DeepClusterV2.Config(head_dims=(2048, 128), num_prototypes=(100, 100, 100), temperature=0.1,
                                  crops_for_assign=(0, 1), kmeans_iters=10)
    return _common(method, _two_views(0.25), lr_per_256=0.2)


RECIPES: dict = {"deepcluster_v2_resnet50": deepcluster_v2_resnet50, "tiny_deepcluster_v2": tiny_deepcluster_v2}
