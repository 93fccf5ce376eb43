"""`seerlike train`: the TrainConfig, the command line (with a local torchrun-style launcher).

The training loop itself is :mod:`seerlike.engine.loop`; this module only turns a recipe,
``--data``, ``--max-steps`` and ``key=value`` overrides into a TrainConfig and starts one
process per rank.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

from seerlike import config as configlib
from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.methods.byol import BYOL
from seerlike.methods.clusterfit import ClusterFit
from seerlike.methods.distill import Distill
from seerlike.methods.swav import SwAV

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75
"""Exit status after a SIGUSR1/SIGTERM checkpoint-and-stop (EX_TEMPFAIL: 'try again'); launchers requeue on it."""


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "resnet50"
    """Backbone name as `seerlike model-info --list` shows it (torchvision spelling)."""
    zero_init_residual: bool = False
    """Zero the last BatchNorm gamma of every residual block."""
    drop_path: float = 0.0
    """Stochastic depth rate (0 = off)."""
    channels_last: bool = False
    """NHWC memory format for inputs and (except under FSDP, which shards contiguous params only) weights."""

    def __post_init__(self):
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"model.drop_path must be in [0, 1), got {self.drop_path}")


@dataclass(kw_only=True)
class MethodConfig:
    name: Literal["swav", "byol", "clusterfit", "distill"] = "swav"
    """Which method trains the backbone; its settings are the section of the same name."""
    swav: SwAV.Config = field(default_factory=SwAV.Config)
    """SwAV settings (used when name=swav)."""
    byol: BYOL.Config = field(default_factory=BYOL.Config)
    """BYOL settings (used when name=byol)."""
    clusterfit: ClusterFit.Config = field(default_factory=ClusterFit.Config)
    """ClusterFit settings (used when name=clusterfit; needs data.labels)."""
    distill: Distill.Config = field(default_factory=Distill.Config)
    """Distillation settings (used when name=distill)."""


@dataclass(kw_only=True)
class LoopConfig:
    max_steps: int = 1000
    """Optimizer steps in the whole run (the LR schedule and BYOL's EMA anneal over it)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (global batch = data batch x ranks x grad_accum)."""
    seed: int = 0
    """Seed of model init (same on every rank), per-rank RNG and the data pipeline."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    skip_nonfinite: bool = False
    """On a NaN/inf loss skip the step (no update) instead of stopping the run."""
    tensorboard: bool = True
    """Also write TensorBoard scalars to RUN_DIR/tensorboard."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    num_threads: int = 0
    """torch intra-op threads per rank; 0 = the CPU count divided by the local ranks."""

    def __post_init__(self):
        if self.max_steps < 1 or self.grad_accum < 1 or self.log_every < 1:
            raise ValueError("loop.max_steps, loop.grad_accum and loop.log_every must be >= 1")
        if self.num_threads < 0:
            raise ValueError(f"loop.num_threads must be >= 0, got {self.num_threads}")


@dataclass(kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone being pretrained."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """The self-supervised method (SwAV or BYOL) and its heads."""
    data: DataConfig = field(default_factory=DataConfig)
    """Images, views and batch size per rank."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule (LR per 256 images)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """FSDP2/DDP, activation checkpointing, SyncBN."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """fp32 / bf16 / fp16 autocast."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Where, how often and how many checkpoints."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Steps, accumulation, seed, logging."""

    def __post_init__(self):
        if self.optim.warmup_steps > self.loop.max_steps:
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} exceeds loop.max_steps={self.loop.max_steps}")


# ---------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="recipe name (`seerlike config --list`); omit to continue RUN_DIR/config.yaml")
    p.add_argument("--data", help="training images: folder, path,label CSV, shard pattern, ingested dataset or s3:// URL")
    p.add_argument("--run-dir", required=True, help="run folder: config.yaml, metrics.jsonl, checkpoints/ (resumes if present)")
    p.add_argument("--nproc", type=int, default=1, help="start this many local ranks (like torchrun --nproc-per-node)")
    p.add_argument("--max-steps", type=int, help="shorthand for loop.max_steps=N")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.1 data.batch_size=64")


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Recipe (or the run's saved config) + --data + --max-steps + overrides, validated."""
    from seerlike import recipes

    saved = os.path.join(args.run_dir, "config.yaml")
    if args.recipe:
        cfg = recipes.get(args.recipe)
        if not isinstance(cfg, TrainConfig):
            raise configlib.ConfigError(f"recipe {args.recipe!r} is not a training recipe ({type(cfg).__name__})")
    elif os.path.exists(saved):
        cfg = configlib.load(saved, TrainConfig)
    else:
        raise configlib.ConfigError(f"give --recipe NAME (no {saved} to continue from)")
    extra = list(args.overrides)
    if args.data:
        extra.insert(0, f"data.source={args.data}")
    if args.max_steps is not None:
        extra.insert(0, f"loop.max_steps={args.max_steps}")
    return configlib.apply_overrides(cfg, extra)


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise configlib.ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    cfg = build_config(args)  # fail on bad input before starting any process
    if args.nproc > 1 and "RANK" not in os.environ:
        return launch(args)
    from seerlike.engine.loop import train

    return train(cfg, args.run_dir)


# ---------------------------------------------------------------- local launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "seerlike", "train", "--run-dir", args.run_dir]
    if args.recipe:
        argv += ["--recipe", args.recipe]
    if args.data:
        argv += ["--data", args.data]
    if args.max_steps is not None:
        argv += ["--max-steps", str(args.max_steps)]
    return argv + list(args.overrides)


def launch(args: argparse.Namespace) -> int:
    """Start ``--nproc`` ranks with torchrun's environment; if one fails, stop the others.

    SIGTERM/SIGUSR1 sent to the launcher are forwarded to every rank (they checkpoint and
    exit with REQUEUE_EXIT_CODE). The launcher returns the first non-zero exit status. Once
    every rank has exited 0 the run is finished: SIGTERM/SIGUSR1 are then only logged, for the
    rest of this process, so that one arriving while it exits does not turn it into status 143.
    """
    n = args.nproc
    base = dict(os.environ, WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()))
    if "OMP_NUM_THREADS" not in base:
        base["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    procs = [subprocess.Popen(_child_argv(args), env=dict(base, RANK=str(r), LOCAL_RANK=str(r))) for r in range(n)]

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    def after_finish(signum, _frame):
        log.warning("caught %s after every rank finished: nothing left to stop, exiting normally",
                    signal.Signals(signum).name)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    finished = False
    try:
        status = 0
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed and status == 0:
                status = failed[0][1]
                if status != REQUEUE_EXIT_CODE:
                    log.error("rank %d exited with status %d; stopping the other ranks", *failed[0])
                    _stop(procs)
            if all(c is not None for c in codes):
                finished = status == 0
                return status if status >= 0 else 128 - status
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, after_finish if finished and s != signal.SIGINT else h)


def _stop(procs: list[subprocess.Popen]) -> None:
    # SIGKILL, not SIGTERM: SIGTERM asks a rank for a checkpoint, which needs the dead peer;
    # whatever the survivors were writing stays invisible (no COMPLETE marker)
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()
