"""Progress of a long stage, with rate and ETA, wherever its output goes.

On a terminal it is a tqdm bar. Anywhere else (a Slurm or submitit log, output redirected to
a file, a notebook) a bar redrawn with carriage returns is unreadable or invisible, so a
plain line is written every ``every_s`` seconds instead, and one when the stage ends::

    extract res5: 1,536/5,000 img (31%), 412 img/s, ETA 8s
    extract res5: done, 5,000 img in 12s (410 img/s)

The lines go to the ``seerlike.progress`` logger when logging is set up (every command sets
it up), else straight to stderr. ``SEERLIKE_PROGRESS_EVERY_S`` changes the interval (default 30).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TextIO

log = logging.getLogger("seerlike.progress")

DEFAULT_EVERY_S = 30.0


def _every_s() -> float:
    try:
        return float(os.environ.get("SEERLIKE_PROGRESS_EVERY_S", DEFAULT_EVERY_S))
    except ValueError:
        return DEFAULT_EVERY_S


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Counts work done towards ``total`` (None: unknown) and reports it with its rate and ETA.

    ``enabled=False`` counts silently. ``stream`` forces plain lines to that stream (tests);
    by default a terminal gets a tqdm bar and everything else plain lines.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "img", *, enabled: bool = True,
                 every_s: float | None = None, stream: TextIO | None = None):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.every_s = _every_s() if every_s is None else every_s
        self.stream = stream
        self.n = 0
        self.t0 = self._last = time.monotonic()
        self._bar = None
        self._closed = False
        if enabled and stream is None and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, *_):
        self.close(failed=exc_type is not None)

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._say(self.line(now))

    def rate(self, now: float | None = None) -> float:
        elapsed = (now or time.monotonic()) - self.t0
        return self.n / elapsed if elapsed > 0 else 0.0

    def line(self, now: float | None = None) -> str:
        """``desc: n/total unit (pct), rate unit/s, ETA t`` (what a log line says)."""
        rate = self.rate(now)
        done = f"{self.n:,}/{self.total:,} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total \
            else f"{self.n:,} {self.unit}"
        eta = ""
        if self.total and rate > 0:
            eta = f", ETA {_duration(max(self.total - self.n, 0) / rate)}"
        return f"{self.desc}: {done}, {rate:,.1f} {self.unit}/s{eta}"

    def close(self, failed: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            return
        if not failed:
            elapsed = time.monotonic() - self.t0
            self._say(f"{self.desc}: done, {self.n:,} {self.unit} in {_duration(elapsed)} "
                      f"({self.rate():,.1f} {self.unit}/s)")

    def _say(self, text: str) -> None:
        if self.stream is not None:
            print(text, file=self.stream, flush=True)
        elif logging.getLogger().handlers:
            log.info(text)
        else:
            print(text, file=sys.stderr, flush=True)
