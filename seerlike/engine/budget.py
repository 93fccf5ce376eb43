"""A run that fits a wall-clock budget: ``loop.time_budget_s`` turns into ``loop.max_steps``.

The first ``loop.calibrate_steps`` steps run under the configured ``max_steps`` (an upper
bound); they are timed (the first two excluded: allocator and thread-pool warm-up), and the
median step time, taken as the slowest rank's, sets ``max_steps`` so that the steps end when
the budget does. Steps before that are identical to those of a run configured with the final
``max_steps`` whenever they lie inside the LR warmup (``optim.warmup_steps >= calibrate_steps``);
schedules that anneal over the run (momentum encoders, EMA teachers) differ in their first
steps by O((calibrate_steps / max_steps)^2), which is why the calibrated value is then saved
in the run's config.yaml and checkpoints: a resumed run continues with it, exactly.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

WARMUP_STEPS_EXCLUDED = 2
"""First steps of a process left out of the timing (allocator, thread pools, first-batch decode)."""


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""``loop.budget_clock``: wall seconds, or this rank's CPU seconds (all its threads), which a
busy machine does not stretch: a budget of S CPU-seconds per rank buys the same steps on an
idle or a loaded machine (docs/benchmarks.md, "Every method, first pass")."""


class StepBudget:
    """Times the first steps of a run and answers the ``max_steps`` that fits the budget."""

    def __init__(self, budget_s: float, calibrate_steps: int, upper_bound: int, min_steps: int,
                 clock: str = "wall") -> None:
        self.budget_s, self.calibrate_steps = budget_s, calibrate_steps
        self.upper_bound, self.min_steps = upper_bound, min_steps
        self.clock = CLOCKS[clock]
        self.t0 = self.last = self.clock()
        self.times: list[float] = []
        self.seen = 0
        self.step_s: float | None = None

    def observe(self, step: int) -> bool:
        """Record the time since the previous call (one step); True when calibration just finished (call :meth:`plan`)."""
        now = self.clock()
        step_s, self.last = now - self.last, now
        self.seen += 1
        if self.seen > WARMUP_STEPS_EXCLUDED:
            self.times.append(step_s)
        return step >= self.calibrate_steps and self.step_s is None

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside does not count: neither as budget used nor in the next step's time (the kNN monitor)."""
        t = self.clock()
        try:
            yield
        finally:
            gap = self.clock() - t
            self.t0 += gap
            self.last += gap

    def used_s(self) -> float:
        """Budget seconds used so far (paused time left out)."""
        return self.clock() - self.t0

    def plan(self, step: int, device: torch.device) -> int:
        """The ``max_steps`` that ends the run within the budget (the same on every rank)."""
        per_step = torch.tensor([statistics.median(self.times) if self.times else 0.0], dtype=torch.float64,
                                device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(per_step, op=dist.ReduceOp.MAX)
        self.step_s = float(per_step)
        elapsed = torch.tensor([self.clock() - self.t0], dtype=torch.float64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        left = max(0.0, self.budget_s - float(elapsed))
        more = int(left / self.step_s) if self.step_s > 0 else self.upper_bound
        planned = max(self.min_steps, step + 1, min(self.upper_bound, step + more))
        log.info("time budget %.0f s: %.3f s/step (median of %d steps), %.0f s used -> max_steps %d",
                 self.budget_s, self.step_s, len(self.times), float(elapsed), planned)
        return planned
