"""The last pass over the data, kept by each rank for the samples it saw: the memory of the
clustering methods (DeepCluster-v2's k-means, SeLa's dataset-wide Sinkhorn), which label every
sample of the dataset from embeddings made while training.

A pass is ``num_samples // (batch x world)`` forward calls: the batches of one exact-mode epoch
of the data pipeline (``data.resampled=false``, no ``data.epoch_steps``), so every sample's
embedding is in the memory of exactly one rank when a pass ends. The method only sees its own
forward calls (the Method contract gives it the sample ``indices`` and ``num_samples``, not the
data's epochs), so "the pass is complete" means "this many calls since the last one". When the
data's epoch is shorter (shard sources trim a few batches so that every rank makes the same
number of steps; ``data.epoch_steps`` or resampled epochs), a pass straddles two epochs: a few
samples are then in the memory twice (the newer embedding wins where one label is kept per
sample) and a few are missing (their previous label is kept, or none).

The memory is a ring of one pass: call ``c`` writes rows ``(c mod P) x B ...`` of this rank's
share. Its buffers are per rank and non-persistent: each rank's checkpoint file keeps them
(Method contract, methods/base.py), so a resume on the same world size continues exactly; on
another world size the memory starts empty, as the data pipeline starts a new epoch then.
``stamp`` orders the rows of all ranks the way one process on the global batch would
(call, rank, row), so 2 ranks produce exactly what 1 process produces.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from seerlike.methods.common import world_and_rank


class PassMemory(nn.Module):
    """This rank's share of one pass: ``emb[v, row]`` for ``views`` embeddings of ``dim``, ``index[row]``
    the sample's global index (-1: empty), ``stamp[row]`` its global order."""

    def __init__(self, num_samples: int, views: int, dim: int) -> None:
        super().__init__()
        if num_samples < 1 or views < 1 or dim < 1:
            raise ValueError(f"PassMemory needs num_samples, views and dim >= 1, got {num_samples}, {views}, {dim}")
        self.num_samples = num_samples
        world, _ = world_and_rank()
        capacity = -(-num_samples // world)  # a rank's share of a pass is at most this
        self.register_buffer("emb", torch.zeros(views, capacity, dim), persistent=False)
        self.register_buffer("index", torch.full((capacity,), -1, dtype=torch.long), persistent=False)
        self.register_buffer("stamp", torch.full((capacity,), -1, dtype=torch.long), persistent=False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=False)
        """Forward calls written so far (the ring position and the pass count follow from it)."""
        self._call: int | None = None  # ``calls`` as read by begin, for the push of the same call

    @torch.no_grad()
    def reset(self) -> None:
        self.emb.zero_()
        self.index.fill_(-1)
        self.stamp.fill_(-1)
        self.calls.zero_()

    def period(self, batch: int) -> int:
        """Forward calls in one pass over the data at this per-rank batch size."""
        world, _ = world_and_rank()
        calls = self.num_samples // (batch * world)
        if calls < 1:
            raise ValueError(f"the global batch ({batch} x {world} ranks) is larger than the data ({self.num_samples} "
                             "samples); lower data.batch_size")
        return calls

    def begin(self, indices: Tensor, every: int = 0) -> bool:
        """Check a call's sample indices; whether the memory is due before it: every ``every`` calls
        (0: at the end of each pass). One host sync per call (SwAV's queue reads its counter too)."""
        calls, lo, hi = torch.stack([self.calls, indices.min(), indices.max()]).tolist()
        if not 0 <= lo <= hi < self.num_samples:
            raise ValueError(f"sample indices must lie in [0, {self.num_samples}), got {lo}..{hi}; "
                             "the data source changed since the method was built")
        self._call = calls
        return calls > 0 and calls % (every or self.period(indices.shape[0])) == 0

    @torch.no_grad()
    def push(self, indices: Tensor, emb: Tensor) -> None:
        """Write the rows of the call ``begin`` checked: ``indices`` (B,) and ``emb`` (views, B, dim)."""
        world, rank = world_and_rank()
        b = indices.shape[0]
        if emb.shape[:2] != (self.emb.shape[0], b) or emb.shape[2] != self.emb.shape[2]:
            raise ValueError(f"memory rows of shape {tuple(emb.shape)}, expected ({self.emb.shape[0]}, {b}, "
                             f"{self.emb.shape[2]})")
        calls, self._call = self._call, None
        if calls is None:
            raise RuntimeError("PassMemory.push without begin: call begin(indices) first in the forward")
        start = (calls % self.period(b)) * b
        rows = slice(start, start + b)
        self.emb[:, rows] = emb.to(self.emb.dtype)
        self.index[rows] = indices
        self.stamp[rows] = calls * b * world + rank * b + torch.arange(b, device=indices.device)
        self.calls += 1

    def rows(self) -> Tensor:
        """Positions of the rows that hold a sample."""
        return (self.index >= 0).nonzero().squeeze(1)


def all_gather_rows(*tensors: Tensor) -> list[Tensor]:
    """Every rank's tensors concatenated in rank order (no gradient; equal shapes on every rank)."""
    world, _ = world_and_rank()
    if world == 1:
        return list(tensors)
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts))
    return out


@torch.no_grad()
def scatter_latest(target: Tensor, index: Tensor, stamp: Tensor, values: Tensor) -> None:
    """``target[index] = values`` where, for an index given several times, the row with the largest
    ``stamp`` wins (deterministic on every device, unlike an indexed assignment with duplicates)."""
    keep = index >= 0
    index, stamp, values = index[keep], stamp[keep], values[keep]
    if index.numel() == 0:
        return
    newest = torch.full_like(target, -1, dtype=torch.long).scatter_reduce(0, index, stamp, "amax")
    win = stamp == newest[index]
    target[index[win]] = values[win].to(target.dtype)
