"""Distributed bootstrap on real gloo ranks: the test helper, torchrun env, Slurm env."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from seerlike.engine.dist import env_from_slurm
from seerlike.testing import RankFailed, run_on_ranks
from tests.dist import _rank_fns

pytestmark = pytest.mark.dist


def test_all_reduce_rank_and_world():
    out = run_on_ranks(_rank_fns.all_reduce_rank, 2)
    assert [o["rank"] for o in out] == [0, 1]
    assert all(o["world"] == 2 and o["sum"] == 3.0 and o["backend"] == "gloo" for o in out)


def test_failure_on_any_rank_is_reraised_with_its_traceback():
    with pytest.raises(RankFailed) as e:
        run_on_ranks(_rank_fns.fail_on_rank_one, 2, timeout_s=20)
    assert "rank 1" in str(e.value) and "ValueError: boom on rank 1" in str(e.value)


def test_slurm_env_translates_to_torchrun_env():
    env = env_from_slurm({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                          "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "1234",
                          "SLURM_JOB_NODELIST": "gpu[003-004]"})
    assert env["RANK"] == "3" and env["WORLD_SIZE"] == "8" and env["LOCAL_RANK"] == "1"
    assert env["LOCAL_WORLD_SIZE"] == "4"
    assert env["MASTER_ADDR"] == "gpu003" and env["MASTER_PORT"] == str(20000 + 1234)
    assert env_from_slurm({}) == {}


_CHILD = """
import torch, torch.distributed as dist
from seerlike.engine.dist import init_distributed, teardown
info = init_distributed()
t = torch.tensor([float(info.rank + 1)])
dist.all_reduce(t)
print(f"RESULT {info.rank} {info.world_size} {info.local_rank} {t.item()}")
teardown()
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("style", ["torchrun", "slurm", "single"])
def test_init_distributed_from_the_environment(style):
    port = _port()
    world = 1 if style == "single" else 2
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_"))}
        if style == "torchrun":
            env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        elif style == "slurm":
            env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_JOB_ID="77",
                       SLURM_JOB_NODELIST="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE, text=True))
    lines = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), lines
    results = sorted(line.split()[1:] for out in lines for line in out.splitlines() if line.startswith("RESULT"))
    expected_sum = str(float(sum(range(1, world + 1))))
    assert results == [[str(r), str(world), str(r), expected_sum] for r in range(world)]
