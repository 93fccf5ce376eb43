"""What a running pipeline leaves on disk, read back: its stages' progress and their wall times.

A pipeline (launchers.pipeline) records its jobs in ``DIR/.pipeline/jobs.json``, a marker
``DIR/.pipeline/STAGE.done`` per finished stage, and every job's record in
``LOG_DIR/index/JOB_ID.json``; submitit writes each task's ``LOG_DIR/JOB_ID/JOB_ID_TASK_log.{err,out}``.
Everything here reads only those files, so it works the same for local and Slurm jobs and from
any process that sees the folders.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml

log = logging.getLogger(__name__)


def stage_seconds(run_dir: Path) -> dict[str, float]:
    """Wall seconds of every finished stage: its marker's time minus its start.

    A stage starts when its job was submitted or when the stage before it finished, whichever
    is later (on Slurm all jobs are submitted at once and wait for their predecessor).
    """
    meta = run_dir / ".pipeline"
    jobs = json.loads((meta / "jobs.json").read_text()) if (meta / "jobs.json").is_file() else {}
    spec = yaml.safe_load((meta / "pipeline.yaml").read_text()) if (meta / "pipeline.yaml").is_file() else {}
    stages = [s["name"] for s in spec.get("stages", [])]
    out: dict[str, float] = {}
    prev_end = 0.0
    for name in stages:
        marker = meta / f"{name}.done"
        rec = jobs.get(name)
        if not marker.is_file() or rec is None:
            prev_end = 0.0
            continue
        end = json.loads(marker.read_text())["finished_at"]
        index = Path(rec["log_dir"]) / "index" / f"{rec['job_id']}.json"
        submitted = json.loads(index.read_text())["submitted_at"] if index.is_file() else end
        out[name] = round(end - max(submitted, prev_end), 1)
        prev_end = end
    return out


class PipelineProgress(threading.Thread):
    """Prints the running stage, the elapsed time and the stage's new log lines, until stopped.

    Reads what any executor leaves on disk (``.pipeline/jobs.json``, the markers, submitit's
    per-task log files), so it works the same for local and Slurm jobs. Progress bars
    (carriage-return updates) are shown at most every ``bar_every_s`` seconds, as the bar's
    newest state or, when ``status_line(stage_dir)`` says something, as that.
    ``show_logs=False`` shows stage changes only.
    """

    def __init__(self, run_dir: Path, stages: list[str], out=None, poll_s: float = 1.0,
                 bar_every_s: float = 15.0, show_logs: bool = True,
                 status_line: Callable[[Path], str] | None = None):
        super().__init__(daemon=True)
        self.meta = run_dir / ".pipeline"
        self.stages, self.out, self.poll_s, self.bar_every_s = stages, out or sys.stdout, poll_s, bar_every_s
        self.show_logs, self.status_line = show_logs, status_line
        self.t0 = time.monotonic()
        self._stop_event = threading.Event()
        self._offsets: dict[Path, int] = {}
        self._current: str | None = None
        path = self.meta / "jobs.json"  # jobs of an earlier run (stages skipped now) are not shown
        self._old = {k: v["job_id"] for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}
        self._announced: set[tuple[str, str]] = set()
        self._finished: set[tuple[str, str]] = set()
        self._last_bar = 0.0

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
        self._poll()  # the last lines of the last stage

    def _say(self, text: str) -> None:
        el = int(time.monotonic() - self.t0)
        print(f"[{el // 60:02d}:{el % 60:02d}] {text}", file=self.out, flush=True)

    def run(self) -> None:
        while not self._stop_event.wait(self.poll_s):
            try:
                self._poll()
            except (OSError, ValueError, KeyError):  # files being written right now: next poll
                pass
            except Exception:  # progress output must never stop the pipeline
                log.exception("progress display failed; the pipeline goes on without it")
                return

    def _poll(self) -> None:
        path = self.meta / "jobs.json"
        jobs = json.loads(path.read_text()) if path.is_file() else {}
        for i, name in enumerate(self.stages):
            rec = jobs.get(name)
            if rec is None or self._old.get(name) == rec["job_id"] or (name, rec["job_id"]) in self._finished:
                continue
            key = (name, rec["job_id"])
            self._current = name
            if key not in self._announced:
                self._announced.add(key)
                self._say(f"stage {i + 1}/{len(self.stages)} {name}: running (job {rec['job_id']})")
            marker = self.meta / f"{name}.done"
            done = marker.is_file()  # before the tail: the marker is written after the last log line
            self._tail_job(rec)
            if not done:
                return  # later stages have not started
            self._finished.add(key)
            index = Path(rec["log_dir"]) / "index" / f"{rec['job_id']}.json"
            took = json.loads(marker.read_text())["finished_at"] - json.loads(index.read_text())["submitted_at"]
            self._say(f"stage {name}: done in {took:.0f} s")

    def _tail_job(self, rec: dict) -> None:
        folder = Path(rec["log_dir"]) / rec["job_id"]
        for path in (folder / f"{rec['job_id']}_0_log.err", folder / f"{rec['job_id']}_0_log.out"):
            self._tail(path)

    def _tail(self, path: Path) -> None:
        if not self.show_logs or not path.is_file():
            return
        seen = self._offsets.get(path, 0)
        with open(path, "rb") as f:
            f.seek(seen)
            data = f.read()
        cut = max(data.rfind(b"\n"), data.rfind(b"\r"))
        if cut < 0:
            return
        self._offsets[path] = seen + cut + 1
        bar = ""
        for line in data[:cut + 1].decode(errors="replace").split("\n"):
            if "\r" in line:  # a progress bar redrawn in place: keep only its newest state
                bar = next((p.strip() for p in reversed(line.split("\r")) if p.strip()), bar)
            elif line.strip() and not ("INFO" in line and ("submitit" in line or "launchers." in line)):
                self._say(f"  {self._current} | {line.rstrip()}")
        now = time.monotonic()
        status = self.status_line(self.meta.parent / (self._current or "")) if self.status_line else ""
        if now - self._last_bar >= self.bar_every_s and (bar or status):
            self._last_bar = now
            self._say(f"  {self._current} | {status or bar}")
