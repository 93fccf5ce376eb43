"""Tensors that may be FSDP2 shards (DTensors): this rank's part, and whole-tensor norms.

Used by the optimizers (LARC/LARS trust ratios) and by methods that clip or average
parameters (DINO, momentum encoders); it sits below both.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor


def local(t: Tensor) -> Tensor:
    """This rank's part of an FSDP2-sharded tensor (the tensor itself when it is not sharded)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _shard_groups(t: Tensor) -> tuple[dist.ProcessGroup, ...]:
    """Process groups over which ``t``'s local part is a shard (empty for plain or replicated tensors)."""
    placements = getattr(t, "placements", None)
    if placements is None:
        return ()
    mesh = t.device_mesh
    return tuple(mesh.get_group(d) for d, p in enumerate(placements) if p.is_shard())


def squared_norms(tensors: list[Tensor]) -> Tensor:
    """Squared L2 norm of each whole (unsharded) tensor, in fp32.

    DTensors sharded over a mesh (FSDP2) contribute their local squares, summed over the
    shard groups with one all-reduce per group (not one per tensor; ``vector_norm`` on a
    DTensor would give a Partial result needing a collective each).
    """
    if not tensors:
        return torch.zeros(0)
    sq = torch.stack([n.float() for n in torch._foreach_norm([local(t) for t in tensors])]).square()
    by_groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups = _shard_groups(t)
        if groups:
            by_groups[groups].append(i)
    for groups, idx in by_groups.items():
        part = sq[idx]
        for g in groups:
            dist.all_reduce(part, group=g)
        sq[idx] = part
    return sq
