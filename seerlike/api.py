"""The Python API: the same work as the commands, returning what a caller needs next.

    import seerlike
    run = seerlike.pretrain(data="images/", out="runs/swav", recipe="tiny_swav",
                            overrides={"loop.max_steps": 100})
    run.checkpoint, run.metrics["loss"]

Bad input raises :class:`seerlike.config.ConfigError` with the message the CLI prints.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seerlike.config import ConfigError


@dataclass
class PretrainResult:
    """What a training run left behind."""

    run_dir: Path
    """The run folder (config.yaml, metrics.jsonl, checkpoints/)."""
    checkpoint: Path | None
    """The newest complete checkpoint (feed it to extract / evaluate / export), or None."""
    step: int
    """Optimizer steps the run has completed."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The last metrics row (loss, lr, images/s, ...)."""
    config: Any = None
    """The resolved TrainConfig the run used."""
    stopped: bool = False
    """A stop signal ended the run early (it resumes from its checkpoint when called again)."""


def _overrides(overrides: dict[str, Any] | list[str] | None) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        return [f"{k}={json.dumps(v) if isinstance(v, (list, dict, tuple)) else v}" for k, v in overrides.items()]
    return list(overrides)


def pretrain(data: str | os.PathLike | None = None, out: str | os.PathLike = "runs/pretrain", *,
             recipe: str | None = None, overrides: dict[str, Any] | list[str] | None = None,
             nproc: int = 1) -> PretrainResult:
    """Train (or continue) the run in ``out``: a recipe (`seerlike config --list`), the images, overrides.

    Without ``recipe`` the run continues from ``out/config.yaml``. ``nproc > 1`` starts that
    many local ranks, as ``seerlike train --nproc``. Equivalent to ``seerlike train``.
    """
    from seerlike.commands.train import child_argv, resolve
    from seerlike.engine import checkpoint
    from seerlike.engine.loop import REQUEUE_EXIT_CODE

    if nproc < 1:
        raise ConfigError(f"nproc must be >= 1, got {nproc}")
    extra = ([f"data.source={data}"] if data is not None else []) + _overrides(overrides)
    out = Path(out).absolute()
    cfg = resolve(recipe, out, extra)  # fails on bad input before anything starts
    if nproc > 1 and "RANK" not in os.environ:
        from seerlike.commands.ranks import launch

        rc = launch(child_argv(recipe, out, extra), nproc)
    else:
        from seerlike.engine.loop import train

        rc = train(cfg, out)
    if rc not in (0, REQUEUE_EXIT_CODE):
        raise RuntimeError(f"training in {out} failed with exit status {rc}; see its log")
    latest = checkpoint.latest(out)
    rows = []
    if (out / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = next((r for r in reversed(rows) if "loss" in r), rows[-1] if rows else {})
    return PretrainResult(run_dir=out, checkpoint=Path(latest) if latest else None,
                          step=checkpoint.step_of(latest) if latest else 0, metrics=last, config=cfg,
                          stopped=rc == REQUEUE_EXIT_CODE)
