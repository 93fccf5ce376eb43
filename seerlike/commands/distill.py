"""`seerlike distill`: `seerlike train` with a distillation recipe, the teacher, student and data filled in."""

from __future__ import annotations

import argparse
import os
import sys

from seerlike import config as configlib
from seerlike.config import ConfigError
from seerlike.engine.config import TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher: checkpoint dir, run dir or export dir")
    p.add_argument("--student", required=True, help="student backbone name (`seerlike model-info --list`)")
    p.add_argument("--data", required=True, help="unlabeled training images (shards, dataset dir, folder, CSV)")
    p.add_argument("--run-dir", required=True, help="run folder of the student (resumes if present)")
    p.add_argument("--recipe", default="distill_tiny", help="distillation recipe (`seerlike config --list`)")
    p.add_argument("--targets", choices=["logits", "prototypes", "none"], help="override method.targets")
    p.add_argument("--nproc", type=int, default=1, help="local ranks")
    p.add_argument("--max-steps", type=int, help="shorthand for loop.max_steps=N")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the training config")


def build_config(args: argparse.Namespace) -> TrainConfig:
    from seerlike import recipes

    cfg = recipes.get(args.recipe)
    if not isinstance(cfg, TrainConfig) or cfg.method.name != "distill":
        raise ConfigError(f"recipe {args.recipe!r} is not a distillation recipe (method.name must be distill)")
    extra = [f"model.name={args.student}", f"method.teacher={args.teacher}", f"data.source={args.data}"]
    if args.targets:
        extra.append(f"method.targets={args.targets}")
    if args.max_steps is not None:
        extra.append(f"loop.max_steps={args.max_steps}")
    return configlib.apply_overrides(cfg, extra + list(args.overrides))


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "seerlike", "distill", "--teacher", args.teacher, "--student", args.student,
            "--data", args.data, "--run-dir", args.run_dir, "--recipe", args.recipe]
    if args.targets:
        argv += ["--targets", args.targets]
    if args.max_steps is not None:
        argv += ["--max-steps", str(args.max_steps)]
    return argv + list(args.overrides)


def preflight(args: argparse.Namespace) -> None:
    """The configuration and the inputs, checked before a job is queued (`seerlike submit distill`)."""
    from seerlike.preflight import check_train_inputs, with_absolute_paths

    check_train_inputs(with_absolute_paths(build_config(args)))


def run(args: argparse.Namespace) -> int:
    from seerlike.preflight import check_train_inputs, with_absolute_paths

    cfg = with_absolute_paths(build_config(args))  # fail on bad input before starting any process
    if int(os.environ.get("RANK", "0")) == 0:
        check_train_inputs(cfg)
    if args.nproc > 1 and "RANK" not in os.environ:
        from seerlike.commands.ranks import launch

        return launch(_child_argv(args), args.nproc)
    from seerlike.engine.loop import train
    from seerlike.eval.knn_monitor import knn_scorer

    return train(cfg, args.run_dir, scorer=knn_scorer(cfg.eval))
