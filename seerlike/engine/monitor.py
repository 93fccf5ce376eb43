"""Online monitor: a score of the backbone being trained (kNN top-1), every few steps or minutes.

The engine decides when to score and keeps the books; what is scored is injected. The entry
points (`seerlike train`, ``seerlike.pretrain``, the distillation and semi-supervised stages)
build the scorer from the ``eval.*`` section (seerlike.eval.knn_monitor: the weighted kNN of
`seerlike eval knn` on a labeled split) and pass it to :func:`seerlike.engine.loop.train` as a
:data:`MakeScorer`; once the method exists the loop builds it and asks
:meth:`Monitor.after_step` after every step; now and then all ranks stop and call the
:class:`Scorer`. The row goes to metrics.jsonl and TensorBoard (``monitor/knn_top1``).
docs/engine.md, "Watching it learn", has the user's side; the engine's part of the design:

- **When**: ranks must agree without a collective on every step. All of them know the next
  "sync step"; there rank 0 decides (a cadence of ``every_steps`` / ``every_minutes`` of
  training, under the ``max_fraction`` cost cap) and broadcasts whether to evaluate now and the
  next sync step, estimated from the measured step time. Always at the start of a fresh run
  and after the last step (``at_start`` / ``at_end``).
- **Cost**: the wall seconds spent (the scorer's set-up included) are logged as ``<name>_s``
  (one reading, ``knn_s``), ``monitor_s`` and ``monitor_frac``. ``max_fraction`` (5 %) holds the
  share: a reading between the first and the last waits until it and the last fit under it. With
  a time budget the scorer is told the budget (``ScoringContext.run_s``) so that it can size its
  work to fit (the kNN scorer cuts its split).
- **Time budget**: monitor time does not count against ``loop.time_budget_s``: the loop pauses
  the budget's clock while the monitor runs, so switching the monitor on changes neither the
  calibrated step time nor the number of steps (the run trains exactly as without it); its cost
  comes on top of the budget.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

MONITOR_LAYERS = ("pool", "res4", "res5")


@dataclass(kw_only=True)
class KNNConfig:
    """The weighted kNN's settings (seerlike.eval.knn); here, so that the training config's eval.knn can hold them."""

    k: int = 20
    """Neighbours that vote."""
    temperature: float = 0.07
    """Vote weight is exp(cosine / temperature)."""
    chunk: int = 1024
    """Query rows scored at a time (bounds memory at chunk x num_train)."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"knn k must be >= 1, got {self.k}")
        if self.temperature <= 0:
            raise ValueError(f"knn temperature must be > 0, got {self.temperature}")


@dataclass(kw_only=True)
class MonitorConfig:
    train: str = ""
    """Labeled kNN memory bank (a path,label CSV or a class-folder tree); with eval.val it turns the monitor on."""
    val: str = ""
    """Labeled kNN queries (the same forms as eval.train)."""
    every_steps: int = 0
    """Evaluate every this many steps (0: not by steps)."""
    every_minutes: float = 0.0
    """Evaluate every this many minutes of training (0: not by time); with neither, as often as max_fraction allows."""
    max_fraction: float = 0.05
    """Cap on the monitor's share of the run's wall time: a due evaluation waits until it fits (0: no cap)."""
    at_start: bool = True
    """Evaluate before the first step of a fresh run (the curve's starting point)."""
    at_end: bool = True
    """Evaluate after the last step (the final point)."""
    max_per_class: int = 100
    """Images per class kept from each split, the first in listing order (0: all)."""
    image_size: int = 224
    """Centre-crop side fed to the backbone (`seerlike eval --image-size`)."""
    resize: int | None = None
    """Shorter side before the crop; None = image_size / 0.875 (`seerlike eval --resize`)."""
    layer: str = "pool"
    """Feature: pool (the trunk's pooled output), res4 or res5 (average-pooled maps)."""
    batch_size: int = 256
    """Images per forward on each rank."""
    knn: KNNConfig = field(default_factory=KNNConfig)
    """The weighted kNN of `seerlike eval knn` (k 20, T 0.07)."""

    def __post_init__(self) -> None:
        if bool(self.train) != bool(self.val):
            raise ValueError("eval.train and eval.val go together: give both (the kNN memory bank and its queries) "
                             "or neither")
        if self.every_steps < 0 or self.every_minutes < 0 or self.max_per_class < 0:
            raise ValueError("eval.every_steps, eval.every_minutes and eval.max_per_class must be >= 0")
        if not 0.0 <= self.max_fraction < 1.0:
            raise ValueError(f"eval.max_fraction must be in [0, 1), got {self.max_fraction}")
        if self.enabled and not (self.every_steps or self.every_minutes or self.max_fraction):
            raise ValueError("eval.max_fraction=0 needs eval.every_steps or eval.every_minutes (else every step)")
        if self.layer not in MONITOR_LAYERS:
            raise ValueError(f"eval.layer must be one of {', '.join(MONITOR_LAYERS)}, got {self.layer!r}")
        if self.image_size < 8 or self.batch_size < 1:
            raise ValueError("eval.image_size >= 8 and eval.batch_size >= 1 are required")

    @property
    def enabled(self) -> bool:
        return bool(self.train and self.val)

    @property
    def resize_side(self) -> int:
        return self.resize or round(self.image_size / 0.875)


# ---------------------------------------------------------------- the scorer an entry point injects


@dataclass(frozen=True)
class ScoringContext:
    """What a scorer is built from once the loop has the method: the trunk, where it runs, the run's budget."""

    backbone: nn.Module
    """The trunk a checkpoint keeps (``method.backbone``)."""
    root: nn.Module
    """The method being trained: under FSDP2 the root unit to unshard for a reading."""
    device: torch.device
    """Where the backbone's parameters are."""
    autocast_dtype: torch.dtype | None = None
    """Forward under autocast to this dtype (FSDP2 gathers the parameters in it); None: fp32."""
    channels_last: bool = False
    """The model's inputs are NHWC (``model.channels_last``)."""
    run_s: float = 0.0
    """The run's time budget (``loop.time_budget_s``; 0: none): a scorer may size its work to fit in it."""
    clock: Callable[[], float] = time.perf_counter
    """The monitor's clock (tests replace it)."""


class Scorer(Protocol):
    """Scores the backbone now; seerlike.eval.knn_monitor.KNNScorer is the one the entry points build."""

    name: str
    """What it scores: a reading's cost is logged as ``<name>_s``."""

    def __call__(self) -> dict[str, float]:
        """The scores: a collective (every rank calls it at the same step) with the same keys on every rank;
        rank 0's values are the ones logged and returned."""
        ...


MakeScorer = Callable[[ScoringContext], Scorer]
"""Builds the scorer once the loop has the method; its set-up time counts as monitor time."""


def share(values: tuple[float, ...], device: torch.device) -> tuple[float, ...]:
    """Rank 0's ``values`` on every rank, as floats."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tuple(float(v) for v in values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return tuple(t.tolist())


# ---------------------------------------------------------------- when (rank 0 decides)


@dataclass
class Schedule:
    """When the next evaluation is due, from rank 0's clock: a cadence, under a cap on the monitor's share."""

    every_steps: int
    every_minutes: float
    max_fraction: float
    start_step: int
    reserve_end: bool = True
    """Keep room under the cap for the reading after the last step."""
    last_step: int = 0
    """Step of the last evaluation."""
    last_train_s: float = 0.0
    """Training seconds (monitor time left out) at the last evaluation."""
    last_cost: float = 0.0
    """Wall seconds of the last evaluation: the next one is assumed to cost as much."""

    def wait_steps(self, step: int, train_s: float, spent_s: float) -> float:
        """Steps until an evaluation is due and fits the cap (<= 0: now; 1 while no step time is known).

        ``train_s``: training seconds since the monitor started; ``spent_s``: the monitor's seconds.
        """
        done = step - self.start_step
        step_s = train_s / done if done > 0 else 0.0
        if step_s <= 0:
            return 1.0
        cadence = []
        if self.every_steps:
            cadence.append(self.last_step + self.every_steps - step)
        if self.every_minutes:
            cadence.append((self.last_train_s + 60 * self.every_minutes - train_s) / step_s)
        wait = min(cadence) if cadence else 0.0  # no cadence: as often as the cap allows
        f = self.max_fraction
        if f > 0:  # after the next reading (and the last one) the monitor's share must be <= f
            need_train_s = (spent_s + self.last_cost * (2 if self.reserve_end else 1)) * (1 - f) / f
            wait = max(wait, (need_train_s - train_s) / step_s)
        return wait

    def next_step(self, step: int, train_s: float, spent_s: float) -> int:
        """The next step at which to ask again (later than ``step``)."""
        return step + max(1, math.ceil(self.wait_steps(step, train_s, spent_s)))

    def evaluated(self, step: int, train_s: float, cost: float) -> None:
        self.last_step, self.last_train_s, self.last_cost = step, train_s, cost


# ---------------------------------------------------------------- the monitor


class Monitor:
    """Calls a scorer on the schedule and logs its row; every rank calls the same methods at the same steps."""

    def __init__(self, cfg: MonitorConfig, make_scorer: MakeScorer, context: ScoringContext, *, metrics,
                 start_step: int):
        self.cfg, self.metrics, self.device = cfg, metrics, context.device
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.clock = context.clock
        self.t0 = self.clock()
        self.scorer = make_scorer(context)
        # wall seconds this rank spent in the monitor, set-up included (rank 0's drive the schedule)
        self.spent_s = self.clock() - self.t0
        self.schedule = Schedule(every_steps=cfg.every_steps, every_minutes=cfg.every_minutes,
                                 max_fraction=cfg.max_fraction, start_step=start_step, last_step=start_step,
                                 reserve_end=cfg.at_end)
        self.next_sync = start_step + 1  # known to every rank: where rank 0 is asked next

    # ------------------------------------------------------------ hooks the loop calls

    def start(self, step: int, budget=None) -> None:
        """Before the first step: the curve's starting point (a fresh run only)."""
        if self.cfg.at_start and step == 0:
            with _paused(budget):
                self.evaluate(step)

    def after_step(self, step: int, *, final: bool, budget=None) -> None:
        """After step ``step`` (all ranks, unless the run is stopping): evaluate when due."""
        if final:
            if self.cfg.at_end:
                with _paused(budget):
                    self.evaluate(step)
            return
        if step != self.next_sync:
            return
        with _paused(budget):
            t = self.clock()
            if self.rank == 0:
                wait = self.schedule.wait_steps(step, self.train_s(), self.spent_s)
                decision = (1.0, 0.0) if wait <= 0 else (0.0, float(step + max(1, math.ceil(wait))))
            now, later = share(decision if self.rank == 0 else (0.0, 0.0), self.device)
            self.spent_s += self.clock() - t
            if now:
                self.evaluate(step)
            else:
                self.next_sync = int(later)

    # ------------------------------------------------------------ one evaluation

    def evaluate(self, step: int) -> dict[str, float]:
        """The scores now and the monitor's books (a collective: every rank calls it); rank 0 logs the row."""
        t = self.clock()
        train_s = self.train_s()
        scores = self.scorer()
        cost = self.clock() - t
        self.spent_s += cost
        self.schedule.evaluated(step, train_s, cost)
        nxt = self.schedule.next_step(step, self.train_s(), self.spent_s) if self.rank == 0 else 0
        *shared, nxt = share((*scores.values(), nxt), self.device)
        if self.rank != 0:
            scores = dict(zip(scores, shared))
        self.next_sync = int(nxt)
        self.spent_s += self.clock() - t - cost
        row = {**scores, f"{self.scorer.name}_s": cost, "monitor_s": self.spent_s,
               "monitor_frac": self.fraction(), "elapsed_s": t - self.t0}
        self.metrics.log(step, row, group="monitor")
        log.info("step %d: %s (%.1f s; monitor %.1f%% of the run so far)", step,
                 ", ".join(f"{k} {v:g}" for k, v in scores.items()), cost, 100 * row["monitor_frac"])
        return row

    def train_s(self) -> float:
        """Seconds since the monitor started, its own left out."""
        return self.clock() - self.t0 - self.spent_s

    def fraction(self) -> float:
        """The monitor's share of the wall time since it started."""
        total = self.clock() - self.t0
        return self.spent_s / total if total > 0 else 0.0


def _paused(budget):
    """The time budget's clock stops while the monitor runs (module docstring, "Time budget")."""
    return budget.paused() if budget is not None else contextlib.nullcontext()


def build_monitor(cfg, method: nn.Module, make_scorer: MakeScorer | None, *, metrics, device: torch.device,
                  start_step: int, budget=None) -> Monitor | None:
    """The monitor of a TrainConfig with its scorer, set up and at its starting point (None without a scorer).

    A config that names a labeled split (``eval.train``/``eval.val``) but comes without a scorer is
    refused rather than trained without its readings.
    """
    if make_scorer is None:
        if cfg.eval.enabled:
            raise ValueError("eval.train/eval.val are set but train() got no scorer: pass "
                             "scorer=seerlike.eval.knn_monitor.knn_scorer(cfg.eval)")
        return None
    mixed = (cfg.parallel.strategy == "fsdp" and cfg.parallel.mixed_precision_params
             and cfg.precision.torch_dtype != torch.float32)  # parameters gathered in the compute dtype
    context = ScoringContext(backbone=method.backbone, root=method, device=device,
                             autocast_dtype=cfg.precision.torch_dtype if mixed else None,
                             channels_last=cfg.model.channels_last, run_s=cfg.loop.time_budget_s)
    with _paused(budget):
        monitor = Monitor(cfg.eval, make_scorer, context, metrics=metrics, start_step=start_step)
    monitor.start(start_step, budget)
    return monitor
