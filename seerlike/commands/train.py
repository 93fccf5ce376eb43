"""`seerlike train`: a recipe (or a run's saved config) + ``--data`` + overrides -> the training loop.

With ``--nproc N`` it starts N local ranks (seerlike.commands.ranks); each rank runs
:func:`seerlike.engine.loop.train`.
"""

from __future__ import annotations

import argparse

from seerlike.engine.config import TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="recipe name (`seerlike config --list`); omit to continue RUN_DIR/config.yaml")
    p.add_argument("--data", help="training images: folder, path,label CSV, shard pattern, ingested dataset or s3:// URL")
    p.add_argument("--run-dir", required=True, help="run folder: config.yaml, metrics.jsonl, checkpoints/ (resumes if present)")
    p.add_argument("--nproc", type=int, default=1, help="start this many local ranks (like torchrun --nproc-per-node)")
    p.add_argument("--max-steps", type=int, help="shorthand for loop.max_steps=N")
    p.add_argument("--fit-data", action="store_true",
                   help="fit the recipe's views, batch and evaluation size to the images (--data) and "
                   "loop.time_budget_s (docs/fit_data.md): the choice is printed and saved in config.yaml; "
                   "your own overrides win")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.1 data.batch_size=64")


def _overrides(args: argparse.Namespace) -> list[str]:
    """--data, --max-steps and --fit-data's choice as overrides, before the user's own (which win)."""
    own = list(args.overrides)
    extra = [f"loop.max_steps={args.max_steps}"] if args.max_steps is not None else []
    if args.data:
        extra.append(f"data.source={args.data}")
    if getattr(args, "fit_data", False):
        extra += fitted_overrides(args, extra + own)
    return extra + own


def fitted_overrides(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """``fit_data``'s overrides for the recipe with ``overrides`` applied; the reasons go to stderr."""
    import sys

    from seerlike.api import train_config
    from seerlike.config import ConfigError
    from seerlike.recipes.fit_data import fit_recipe

    if not args.recipe:
        raise ConfigError("--fit-data fits a recipe: give --recipe (a run continued from its config.yaml keeps "
                          "the values chosen when it started)")
    fitted, fit = fit_recipe(train_config(args.recipe, args.run_dir, overrides), ranks=args.nproc)
    for line in fit.reasons:
        print(f"fit-data: {line}", file=sys.stderr, flush=True)
    return fitted


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Recipe (or the run's saved config) + --data + --max-steps + overrides, validated."""
    from seerlike.api import train_config

    return train_config(args.recipe, args.run_dir, _overrides(args))


def preflight(args: argparse.Namespace) -> None:
    """The configuration and the inputs, checked before a job is queued (`seerlike submit train`)."""
    from seerlike.preflight import check_train_inputs, with_absolute_paths

    check_train_inputs(with_absolute_paths(build_config(args)))


def run(args: argparse.Namespace) -> int:
    from seerlike.api import pretrain
    from seerlike.engine.loop import REQUEUE_EXIT_CODE

    result = pretrain(out=args.run_dir, recipe=args.recipe, overrides=_overrides(args), nproc=args.nproc)
    return REQUEUE_EXIT_CODE if result.stopped else 0
