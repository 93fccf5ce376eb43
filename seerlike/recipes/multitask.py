"""Multi-task pretext training (Doersch & Zisserman 2017): rotation + jigsaw + colorization on one
trunk, each task with the settings and the view of its own recipe.

No public ResNet-50 recipe trains these three together (the paper combined relative position,
colorization, exemplar and motion segmentation on a ResNet-101 with RMSProp across many
asynchronous workers), so ``multitask_resnet50`` composes the three single-task ResNet-50
recipes of seerlike: VISSL's rotation (one random rotation per 224 px crop) and jigsaw (2,000
permutations on a 255 px crop, 64 px tiles, 2048 -> 1000 per tile) and the colorization recipe
(224 px crops at scale (0.3, 1), res5 predictions against 28x28 targets), the three losses
summed with weight 1 on every batch, with VISSL's pretext optimiser (SGD 0.1 per 256 images,
momentum 0.9, weight decay 1e-4, 105 epochs, 8 ranks x 32). Colorization's lightness reaches
the RGB trunk as a gray image (methods/multitask.py).
"""

from __future__ import annotations

from seerlike.data.augment import AugmentConfig
from seerlike.engine.config import TrainConfig
from seerlike.methods.multitask import MultiTask
from seerlike.recipes.colorization import colour_view
from seerlike.recipes.jigsaw import TINY_SIZE, puzzle_view
from seerlike.recipes.pretext import resnet50_pretext
from seerlike.recipes.rotnet import rotation_view
from seerlike.recipes.tiny import _common

TASKS = ("rotnet", "jigsaw", "colorization")


def multitask_resnet50() -> TrainConfig:
    """8 ranks x 32 images, three views (rotation 224, jigsaw 255, colour 224); SGD 0.1 per 256, wd 1e-4, 105 epochs."""
    views = AugmentConfig(views=[*rotation_view(224, 0.08).views, *puzzle_view(255, 0.5).views,
                                 *colour_view(224, 0.3).views])
    settings = {"rotnet": {"all_rotations": False, "head_dims": []},
                "jigsaw": {"num_permutations": 2000, "gap": 0.25, "tile_norm": False, "tile_dims": [1000],
                           "hidden_dims": []},
                "colorization": {"soft_neighbours": 5, "soft_sigma": 5.0, "rebalance_lambda": 0.5, "target_cells": 4}}
    method = MultiTask.Config(tasks=TASKS, weights=(1.0, 1.0, 1.0), schedule="sum", views=((0,), (1,), (2,)),
                              settings=settings)
    return resnet50_pretext(method, views)


def tiny_multitask() -> TrainConfig:
    """The three tiny recipes' tasks on one CIFAR ResNet-10, summed, batch 32 per rank: rotation (all 4) and
    colorization on one 32 px colour view, the jigsaw (100 permutations, 15 px tiles) on a 60 px view.

    Per rank and step the trunk sees 4 x 32 rotated 32 px images, 9 x 32 tiles and 32 lightness
    images: about the cost of tiny_rotnet, tiny_jigsaw and tiny_colorization at half batch each.
    LR 0.4 per 256 images as those three recipes; not tuned by a sweep.
    """
    views = AugmentConfig(views=[*colour_view(32, 0.5).views, *puzzle_view(TINY_SIZE, 0.5).views])
    settings = {"rotnet": {"all_rotations": True},
                "jigsaw": {"num_permutations": 100, "gap": 0.25, "tile_norm": True, "tile_dims": [256]},
                "colorization": {"target_cells": 4}}
    method = MultiTask.Config(tasks=TASKS, weights=(1.0, 1.0, 1.0), schedule="sum", views=((0,), (1,), (0,)),
                              settings=settings)
    return _common(method, views, lr_per_256=0.4, batch_size=32)


RECIPES: dict = {"multitask_resnet50": multitask_resnet50, "tiny_multitask": tiny_multitask}
