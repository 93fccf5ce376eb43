"""``RUN_DIR/timing.json``: when each stretch of a run trained and where its wall time went.

One entry ("segment") per process that reached the end of its steps or stopped on a signal
(a resumed run adds one per restart; a killed process leaves none): wall times of the first
and last step, the steps, the seconds spent training and in the kNN monitor, and, for a
time-budgeted run, the plan (budget, calibrated seconds per step, planned steps) beside the
budget seconds actually used. The quickstart's report compares the plan with what happened.
Written by rank 0, atomically.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from seerlike.storage import write_bytes

log = logging.getLogger(__name__)

FILE = "timing.json"


class SegmentClock:
    """Started before the first step of this process; :meth:`record` writes its segment."""

    def __init__(self, start_step: int):
        self.start_step = start_step
        self.start_time = time.time()
        self.t0 = time.perf_counter()

    def segment(self, *, end_step: int, finished: bool, monitor_s: float = 0.0, budget=None,
                time_budget_s: float = 0.0, budget_clock: str = "wall", planned_steps: int | None = None) -> dict:
        wall = time.perf_counter() - self.t0
        seg = {"start_time": self.start_time, "end_time": time.time(), "start_step": self.start_step,
               "end_step": end_step, "finished": finished, "wall_s": round(wall, 3),
               "monitor_s": round(monitor_s, 3), "train_s": round(wall - monitor_s, 3)}
        if time_budget_s > 0:
            seg.update(time_budget_s=time_budget_s, budget_clock=budget_clock, planned_steps=planned_steps)
            if budget is not None:
                seg.update(budget_used_s=round(budget.used_s(), 3), calibrated_step_s=budget.step_s)
        return seg

    def record(self, run_dir: str | Path, **kw) -> dict:
        """Append this process's segment to ``RUN_DIR/timing.json``; returns it."""
        seg = self.segment(**kw)
        path = Path(run_dir) / FILE
        write_bytes(path, (json.dumps({"segments": [*read(path), seg]}, indent=1) + "\n").encode())
        return seg


def read(path: str | Path) -> list[dict]:
    """The segments of a ``timing.json`` (a run dir or the file); [] when absent or unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    if not path.is_file():
        return []
    try:
        segments = json.loads(path.read_text()).get("segments", [])
    except (ValueError, AttributeError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return []
    return [s for s in segments if isinstance(s, dict)] if isinstance(segments, list) else []
