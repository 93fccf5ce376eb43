"""Distributed bootstrap: one ``init_distributed()`` for torchrun, Slurm/submitit and one process.

The environment decides: torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) win; otherwise Slurm's (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID, SLURM_JOB_NODELIST); otherwise a single process. gloo on CPU, nccl on CUDA.
A single process still gets a (world size 1) process group so that FSDP2, DCP and the
collectives in the methods run the same code path everywhere.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``gpu[003-005,010],cpu1``."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^,\[]+)(?:\[([0-9]+))?", nodelist)
    if not m:
        return nodelist
    return m.group(1) + (m.group(2) or "")


def env_from_slurm(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """The torchrun-style variables that a Slurm task implies (empty outside Slurm)."""
    if "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return {}
    job_id = environ.get("SLURM_ARRAY_JOB_ID") or environ.get("SLURM_JOB_ID", "0")
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or "127.0.0.1"
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0],
        "MASTER_ADDR": environ.get("MASTER_ADDR") or _first_host(nodelist),
        # one port per job so two jobs sharing a node do not collide
        "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000),
    }


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join (or create) the process group described by the environment.

    Safe to call when a group already exists (e.g. set up by a test harness): it then
    only reports rank, world and device.
    """
    if not dist.is_initialized():
        env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE") if k in os.environ}
        if len(env) < 2:
            os.environ.update(env_from_slurm())
        use_cuda = torch.cuda.is_available()
        backend = backend or ("nccl" if use_cuda else "gloo")
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if backend == "nccl":
                torch.cuda.set_device(local_rank % max(torch.cuda.device_count(), 1))
            dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
        else:
            store_path = tempfile.NamedTemporaryFile(prefix="seerlike-pg-", delete=False).name
            store = dist.FileStore(store_path, 1)
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timedelta(seconds=timeout_s))
    info = current()
    log.debug("process group: rank %d/%d backend %s device %s", info.rank, info.world_size, info.backend, info.device)
    return info


def current() -> DistInfo:
    """Rank, world and device of this process (world 1 without a process group)."""
    if dist.is_initialized():
        rank, world, backend = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    else:
        rank, world, backend = 0, 1, "none"
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if backend == "nccl" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, local_world, device, backend)


def teardown() -> None:
    """Leave the process group (idempotent)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # a dead peer must not turn shutdown into a hang or a second error
            pass
        dist.destroy_process_group()


# logging lives in seerlike.logs (no torch import, so light commands start fast)
from seerlike.logs import RankFilter, setup_logging  # noqa: E402,F401
