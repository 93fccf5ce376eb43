"""Training metrics: ``RUN_DIR/metrics.jsonl``, TensorBoard and a tqdm bar, all on rank 0 only.

Every training line carries step, loss, lr, images_per_s (global), step_time_s, data_wait_frac
(share of wall time spent waiting for the next batch) and peak_mem_mb (CUDA allocator peak,
or the process's peak RSS on CPU), plus whatever the method reports. Other lines carry no loss:
the time budget's calibration (calibrated_step_s, planned_steps) and the kNN monitor's readings
(knn_top1, ...; TensorBoard ``monitor/*``; seerlike.engine.monitor).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from pathlib import Path

import torch

from seerlike.storage import write_bytes

log = logging.getLogger(__name__)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Throughput:
    """Accumulates step and data-wait time between two log lines."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps = self.images = 0
        self.step_s = self.wait_s = 0.0

    def add(self, images: int, step_s: float, wait_s: float) -> None:
        self.steps += 1
        self.images += images
        self.step_s += step_s
        self.wait_s += wait_s

    def summary(self) -> dict[str, float]:
        total = self.step_s + self.wait_s
        return {
            "images_per_s": self.images / total if total else 0.0,
            "step_time_s": total / self.steps if self.steps else 0.0,
            "data_wait_frac": self.wait_s / total if total else 0.0,
        }


class MetricsLogger:
    """Writes metrics on rank 0; a no-op elsewhere."""

    def __init__(self, run_dir: str | Path, *, rank: int, start_step: int, max_steps: int,
                 tensorboard: bool = True, progress: bool = True):
        self.enabled = rank == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = self._bar = None
        self._file = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._file = self.path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """A resumed run re-does the steps after its checkpoint: drop their old lines."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        write_bytes(self.path, "".join(line + "\n" for line in keep).encode())

    def log(self, step: int, values: dict[str, float], *, group: str = "train") -> None:
        """One metrics.jsonl line; numbers also go to TensorBoard as ``{group}/{key}``."""
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{group}/{k}", v, step)
        if self._bar is not None and "loss" in row:
            self._bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}",
                                  ips=f"{row.get('images_per_s', 0.0):.0f}", refresh=False)

    def set_total(self, max_steps: int) -> None:
        """The run's length changed (a time budget was calibrated)."""
        if self._bar is not None:
            self._bar.total = max_steps
            self._bar.refresh()

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item()
    return v
