"""Rank-aware logging through the standard ``logging`` module (never a patched print)."""

from __future__ import annotations

import logging
import os
import sys


class RankFilter(logging.Filter):
    """Rank 0 logs everything; other ranks only warnings and errors unless ``all_ranks``."""

    def __init__(self, rank: int, all_ranks: bool = False):
        super().__init__()
        self.rank, self.all_ranks = rank, all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.all_ranks or self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int | None = None, all_ranks: bool | None = None, level: int | str = "INFO",
                  file: str | os.PathLike | None = None) -> None:
    """Configure the root logger once per process: rank-tagged lines, rank-0 by default.

    ``SEERLIKE_LOG_ALL_RANKS=1`` turns on all ranks without a code change.
    """
    if rank is None:
        dist = sys.modules.get("torch.distributed")
        rank = dist.get_rank() if dist is not None and dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if all_ranks is None:
        all_ranks = os.environ.get("SEERLIKE_LOG_ALL_RANKS", "0") == "1"
    fmt = logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_seerlike", False):
            root.removeHandler(h)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file is not None:
        handlers.append(logging.FileHandler(file))
    for h in handlers:
        h._seerlike = True  # type: ignore[attr-defined]
        h.setFormatter(fmt)
        h.addFilter(RankFilter(rank, all_ranks))
        root.addHandler(h)
    root.setLevel(level)
