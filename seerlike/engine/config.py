"""The training config: one dataclass per part of a run, each beside nothing but its own checks.

``TrainConfig`` is what a recipe returns, what ``seerlike train`` resolves from a recipe and
overrides, and what every run and checkpoint saves as ``config.yaml``. The ``method`` section
is the chosen method's own config (``method.name`` picks it; seerlike.methods.base).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from seerlike.data.pipeline import DataConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.monitor import MonitorConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.methods import method_class
from seerlike.methods.base import MethodConfig, default_method


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
class LoopConfig:
    max_steps: int = 1000
    """Optimizer steps in the whole run (the LR schedule and momentum schedules anneal over it)."""
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
    time_budget_s: float = 0.0
    """Wall seconds for the training steps; > 0: max_steps (then an upper bound) is set from timed first steps."""
    calibrate_steps: int = 12
    """With time_budget_s: steps timed (the first 2 left out) before max_steps is set and saved."""
    budget_clock: Literal["wall", "cpu"] = "wall"
    """What time_budget_s counts: wall seconds, or each rank's CPU seconds (steps independent of machine load)."""

    def __post_init__(self):
        if self.max_steps < 1 or self.grad_accum < 1 or self.log_every < 1:
            raise ValueError("loop.max_steps, loop.grad_accum and loop.log_every must be >= 1")
        if self.num_threads < 0:
            raise ValueError(f"loop.num_threads must be >= 0, got {self.num_threads}")
        if self.time_budget_s < 0 or self.calibrate_steps < 3:
            raise ValueError(f"loop.time_budget_s must be >= 0 and loop.calibrate_steps >= 3, "
                             f"got {self.time_budget_s}, {self.calibrate_steps}")


@dataclass(kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone being pretrained."""
    method: MethodConfig = field(default_factory=default_method)
    """The method (method.name) and its own settings: heads, temperatures, momentum, queues."""
    data: DataConfig = field(default_factory=DataConfig)
    """Images, views and batch size per rank."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule (LR per 256 images)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """FSDP2/DDP, activation checkpointing, SyncBN."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """fp32 / bf16 / fp16 autocast, or auto (bf16 where the device has it natively)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Where, how often and how many checkpoints."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Steps, accumulation, seed, logging."""
    eval: MonitorConfig = field(default_factory=MonitorConfig)
    """Online kNN monitor on a labeled split (eval.train, eval.val): kNN top-1 while training."""

    def __post_init__(self):
        if self.optim.warmup_steps > self.loop.max_steps:
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} exceeds loop.max_steps={self.loop.max_steps}")
        method_class(self.method.name).check_views(self.method, [v.size for v in self.data.augment.expanded()])
        for key in ("mean", "std"):  # a method that undoes the views' normalisation (colorization, distill)
            theirs, ours = getattr(self.method, key, None), getattr(self.data.augment, key)
            if theirs is not None and tuple(theirs) != tuple(ours):
                raise ValueError(f"method.{key}={tuple(theirs)} must equal data.augment.{key}={tuple(ours)} "
                                 f"(the method undoes the views' normalisation); set both to the same values")
