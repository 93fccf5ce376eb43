"""`seerlike train`: a recipe (or a run's saved config) + ``--data`` + overrides -> the training loop.

With ``--nproc N`` it starts N local ranks (seerlike.commands.ranks); each rank runs
:func:`seerlike.engine.loop.train`.
"""

from __future__ import annotations

import argparse
import os
import sys

from seerlike import config as configlib
from seerlike.engine.config import TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="recipe name (`seerlike config --list`); omit to continue RUN_DIR/config.yaml")
    p.add_argument("--data", help="training images: folder, path,label CSV, shard pattern, ingested dataset or s3:// URL")
    p.add_argument("--run-dir", required=True, help="run folder: config.yaml, metrics.jsonl, checkpoints/ (resumes if present)")
    p.add_argument("--nproc", type=int, default=1, help="start this many local ranks (like torchrun --nproc-per-node)")
    p.add_argument("--max-steps", type=int, help="shorthand for loop.max_steps=N")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.1 data.batch_size=64")


def resolve(recipe: str | None, run_dir: str | os.PathLike, overrides: list[str] = ()) -> TrainConfig:
    """Recipe (or RUN_DIR/config.yaml when no recipe is given) + ``key=value`` overrides, validated."""
    from seerlike import recipes

    saved = os.path.join(run_dir, "config.yaml")
    if recipe:
        cfg = recipes.get(recipe)
        if not isinstance(cfg, TrainConfig):
            raise configlib.ConfigError(f"recipe {recipe!r} is not a training recipe ({type(cfg).__name__})")
    elif os.path.exists(saved):
        cfg = configlib.load(saved, TrainConfig)
    else:
        raise configlib.ConfigError(f"give --recipe NAME (no {saved} to continue from)")
    return configlib.apply_overrides(cfg, list(overrides))


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Recipe (or the run's saved config) + --data + --max-steps + overrides, validated."""
    extra = list(args.overrides)
    if args.data:
        extra.insert(0, f"data.source={args.data}")
    if args.max_steps is not None:
        extra.insert(0, f"loop.max_steps={args.max_steps}")
    return resolve(args.recipe, args.run_dir, extra)


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "seerlike", "train", "--run-dir", args.run_dir]
    if args.recipe:
        argv += ["--recipe", args.recipe]
    if args.data:
        argv += ["--data", args.data]
    if args.max_steps is not None:
        argv += ["--max-steps", str(args.max_steps)]
    return argv + list(args.overrides)


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise configlib.ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    cfg = build_config(args)  # fail on bad input before starting any process
    if args.nproc > 1 and "RANK" not in os.environ:
        from seerlike.commands.ranks import launch

        return launch(_child_argv(args), args.nproc)
    from seerlike.engine.loop import train

    return train(cfg, args.run_dir)
