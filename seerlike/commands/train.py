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


#: Config keys that name local inputs: stored absolute, so the run continues from any directory.
PATH_KEYS = ("data.source", "data.labels", "method.teacher")


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the relative local paths among PATH_KEYS made absolute (URLs and ``random:`` kept)."""
    from seerlike import storage

    changes = []
    for key in PATH_KEYS:
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name, None)
        if isinstance(value, str) and value and not value.startswith("random:") and storage.absolute(value) != value:
            changes.append(f"{key}={storage.absolute(value)}")
    return configlib.apply_overrides(cfg, changes) if changes else cfg


def check_inputs(cfg: TrainConfig) -> None:
    """The run's inputs exist: the images, ClusterFit's pseudo-labels, a distillation teacher."""
    from seerlike.commands.inputs import check_data, check_model, check_path

    check_data(cfg.data.source, "--data (data.source)", cfg.data.s3_endpoint_url)
    check_path(cfg.data.labels, "data.labels", "a `seerlike cluster` output dir or a labels parquet")
    teacher = getattr(cfg.method, "teacher", "")
    if teacher:
        check_model(teacher, "--teacher (method.teacher)")


def _overrides(args: argparse.Namespace) -> list[str]:
    """--data and --max-steps as overrides, before the user's own (which win)."""
    extra = list(args.overrides)
    if args.data:
        extra.insert(0, f"data.source={args.data}")
    if args.max_steps is not None:
        extra.insert(0, f"loop.max_steps={args.max_steps}")
    return extra


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Recipe (or the run's saved config) + --data + --max-steps + overrides, validated."""
    return resolve(args.recipe, args.run_dir, _overrides(args))


def preflight(args: argparse.Namespace) -> None:
    """The configuration and the inputs, checked before a job is queued (`seerlike submit train`)."""
    check_inputs(with_absolute_paths(build_config(args)))


def child_argv(recipe: str | None, run_dir: str | os.PathLike, overrides: list[str]) -> list[str]:
    """The command each local rank runs (the launcher sets RANK and friends)."""
    argv = [sys.executable, "-m", "seerlike", "train", "--run-dir", str(run_dir)]
    if recipe:
        argv += ["--recipe", recipe]
    return argv + list(overrides)


def run(args: argparse.Namespace) -> int:
    from seerlike.api import pretrain
    from seerlike.engine.loop import REQUEUE_EXIT_CODE

    result = pretrain(out=args.run_dir, recipe=args.recipe, overrides=_overrides(args), nproc=args.nproc)
    return REQUEUE_EXIT_CODE if result.stopped else 0
