"""Run a function on N real gloo ranks (tests and benchmarks).

``mp.spawn`` with a file rendezvous: no TCP port to pick, so parallel test runs cannot
race for one. A failure on any rank is re-raised in the caller with that rank's traceback.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def micro_batch(views: list[torch.Tensor], labels: torch.Tensor | None = None, indices: torch.Tensor | None = None):
    """A training-step input (``.views``, ``.labels``, ``.indices``) from plain tensors, for tests of ``train_step``."""
    from seerlike.data.pipeline import Batch

    return Batch(views=list(views), keys=[str(i) for i in range(views[0].shape[0])], labels=labels, indices=indices)


class RankFailed(RuntimeError):
    """A function run by :func:`run_on_ranks` raised on some rank."""


def _worker(rank: int, fn: Callable, world: int, init_file: str, result_dir: str, args: tuple, timeout_s: float) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # N ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        out = fn(rank, world, *args)
        torch.save(out, os.path.join(result_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], world: int = 2, *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` processes; return each rank's result.

    ``fn`` must be importable (a module-level function). Results travel through
    ``torch.save``, so tensors, dicts and numbers come back as they were.
    """
    with tempfile.TemporaryDirectory(prefix="seerlike-ranks-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        try:
            mp.spawn(_worker, args=(fn, world, init_file, tmp, args, timeout_s), nprocs=world, join=True)
        except Exception as e:
            errors = []
            for r in range(world):
                p = os.path.join(tmp, f"rank{r}.err")
                if os.path.exists(p):
                    errors.append(f"--- rank {r} ---\n{open(p).read()}")
            raise RankFailed("\n".join(errors) or str(e)) from e
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]
