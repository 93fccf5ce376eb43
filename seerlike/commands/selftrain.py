"""`seerlike selftrain --method fixmatch|noisy_student`: semi-supervised training (docs/semisup.md).

FixMatch: one training run from a pretrained model (``--init``) on labeled + unlabeled images.
Noisy Student: per iteration, the teacher (``--teacher``: a `seerlike finetune` run, then each
student) labels the unlabeled images into a pseudo-label parquet, and a noised student trains in
``RUN_DIR/iterK``; ``--iterations`` and ``--students`` set how many and which backbones. A rerun
(or a requeued job) continues where the last one stopped.
"""

from __future__ import annotations

import argparse

from seerlike.commands.finetune import add_lr_arguments, layer_lr
from seerlike.semisup.stages import METHODS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, choices=METHODS,
                   help="noisy_student: a teacher labels the unlabeled images, a noised student learns them; fixmatch: "
                        "weak-view predictions above a threshold are targets for strong views (docs/semisup.md)")
    p.add_argument("--labeled", required=True, help="labeled images: class folders or a path,label CSV")
    p.add_argument("--unlabeled", required=True, help="unlabeled images: folder, CSV, shards or an ingested dataset")
    p.add_argument("--run-dir", required=True, help="run folder (resumes if present)")
    p.add_argument("--init", default="", help="pretrained model the classifier starts from (checkpoint, run or "
                   "export dir, random:ARCH)")
    p.add_argument("--teacher", default="", help="noisy_student: the first teacher (a `seerlike finetune` run)")
    p.add_argument("--recipe", default=None, help="recipe (default: METHOD_tiny)")
    p.add_argument("--iterations", type=int, help="noisy_student: shorthand for method.iterations=N")
    p.add_argument("--students", help="noisy_student: student backbone per iteration, comma-separated")
    add_lr_arguments(p)
    p.add_argument("--nproc", type=int, default=1, help="local ranks")
    p.add_argument("--max-steps", type=int, help="shorthand for loop.max_steps=N (per student)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the training config")


def overrides(args: argparse.Namespace) -> list[str]:
    """The shorthands as overrides, before the user's own (which win)."""
    extra = [f"loop.max_steps={args.max_steps}"] if args.max_steps is not None else []
    if args.iterations is not None:
        extra.append(f"method.iterations={args.iterations}")
    if args.students:
        extra.append(f"method.students={args.students}")
    return extra + list(args.overrides)


def build_config(args: argparse.Namespace):
    from seerlike.semisup.stages import selftrain_config

    return selftrain_config(args.method, labeled=args.labeled, unlabeled=args.unlabeled, init=args.init,
                            teacher=args.teacher, recipe=args.recipe, overrides=overrides(args),
                            layer_lr=layer_lr(args))


def preflight(args: argparse.Namespace) -> None:
    """The configuration and the inputs, checked before a job is queued (`seerlike submit selftrain`)."""
    from seerlike.semisup.stages import check_inputs

    check_inputs(build_config(args))


def run(args: argparse.Namespace) -> int:
    from seerlike.api import selftrain
    from seerlike.engine.loop import REQUEUE_EXIT_CODE

    result = selftrain(args.method, args.labeled, args.unlabeled, args.run_dir, init=args.init, teacher=args.teacher,
                       recipe=args.recipe, overrides=overrides(args), backbone_lr=args.backbone_lr,
                       layer_decay=args.layer_decay, nproc=args.nproc)
    return REQUEUE_EXIT_CODE if result.stopped else 0
