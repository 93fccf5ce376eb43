"""`seerlike finetune`: supervised fine-tuning of a pretrained backbone on labeled images (docs/semisup.md).

A training run of the ``finetune`` method (``seerlike.methods.classifier``): the recipe, the
labeled data (class folders or a ``path,label`` CSV: its classes set ``method.num_classes``), the
pretrained model (``--init``), then the overrides. Its run is the teacher of `seerlike selftrain
--method noisy_student`.
"""

from __future__ import annotations

import argparse

from seerlike.semisup.stages import DEFAULT_RECIPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="labeled images: class folders (ROOT/CLASS/IMAGE) or a path,label CSV")
    p.add_argument("--init", default="", help="pretrained model: checkpoint, run or export dir, or random:ARCH "
                   "(default: the recipe's method.init, else the backbone's own init)")
    p.add_argument("--run-dir", required=True, help="run folder (resumes if present)")
    p.add_argument("--recipe", default=None, help=f"fine-tuning recipe (default {DEFAULT_RECIPES['finetune']})")
    add_lr_arguments(p)
    p.add_argument("--nproc", type=int, default=1, help="local ranks")
    p.add_argument("--max-steps", type=int, help="shorthand for loop.max_steps=N")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the training config")


def add_lr_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone-lr", type=float, help="LR multiplier of the trunk against the head (e.g. 0.1)")
    p.add_argument("--layer-decay", type=float,
                   help="layer-wise LR decay per residual block towards the stem (e.g. 0.75)")


def overrides(args: argparse.Namespace) -> list[str]:
    """--max-steps as an override, before the user's own (which win)."""
    return ([f"loop.max_steps={args.max_steps}"] if args.max_steps is not None else []) + list(args.overrides)


def layer_lr(args: argparse.Namespace):
    from seerlike.semisup.stages import LayerLR

    return LayerLR.of(args.backbone_lr, args.layer_decay)


def build_config(args: argparse.Namespace):
    from seerlike.semisup.stages import finetune_config

    return finetune_config(data=args.data, init=args.init, recipe=args.recipe, overrides=overrides(args),
                           layer_lr=layer_lr(args))


def preflight(args: argparse.Namespace) -> None:
    """The configuration and the inputs, checked before a job is queued (`seerlike submit finetune`)."""
    from seerlike.semisup.stages import check_inputs

    check_inputs(build_config(args))


def run(args: argparse.Namespace) -> int:
    from seerlike.api import finetune
    from seerlike.engine.loop import REQUEUE_EXIT_CODE

    result = finetune(args.data, args.run_dir, init=args.init, recipe=args.recipe, overrides=overrides(args),
                      backbone_lr=args.backbone_lr, layer_decay=args.layer_decay, nproc=args.nproc)
    return REQUEUE_EXIT_CODE if result.stopped else 0
