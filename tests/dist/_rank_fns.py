"""Module-level functions run on real ranks by the dist tests (mp.spawn needs importable callables)."""

import torch
import torch.distributed as dist

from seerlike.engine import dist as sdist


def all_reduce_rank(rank: int, world: int) -> dict:
    info = sdist.init_distributed()  # must adopt the existing group, not make a new one
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": info.rank, "world": info.world_size, "sum": t.item(), "backend": info.backend}


def fail_on_rank_one(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()
