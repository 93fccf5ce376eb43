"""DeepCluster-v2 (Caron et al. 2020, SwAV paper appendix): k-means on the last pass's embeddings,
then cross-entropy of every view's prototype scores against its sample's cluster.

As the reference (facebookresearch/swav, main_deepclusterv2.py): a projection head ends in
L2-normalised embeddings; each rank keeps those of the assignment views of the samples it saw
during the last pass over the data (``PassMemory``); at the start of every pass, each prototype
head ``h`` runs spherical k-means on the memory of view ``h mod len(crops_for_assign)``; its
centroids become the head's prototypes (frozen: buffers, never trained, as the reference freezes
them for all its iterations) and every sample of the memory gets its cluster. The loss is the
cross-entropy of ``scores / temperature`` of ALL views against the cluster of their sample,
averaged over the heads; samples without a cluster (the first pass, see below) are left out.

Differences from the reference, each so that N ranks equal 1 process and runs resume exactly:
- the first pass trains on nothing (the loss is 0 until the memory holds one pass) instead of
  the reference's gradient-free pass over the data before epoch 0: a streaming pipeline has no
  such pass, and the two produce the same first memory up to the optimizer's weight decay;
- the initial centroids are the embeddings of the samples with the smallest ranks in a seeded
  permutation of the sample indices (the same choice on any number of ranks), not random rows
  of rank 0's memory;
- the loss is the mean over ALL ranks' assigned rows (a global count), not of each rank's mean;
- the centroid sums are one-hot matrix products (deterministic on GPUs, unlike atomic adds).

When a pass ends: see :mod:`seerlike.methods.pass_memory` (``num_samples // global batch``
forward calls, an exact-mode epoch of the data pipeline).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from seerlike.methods.base import MethodBase, MethodConfig, need_backbone_dim
from seerlike.methods.common import forward_views, no_autocast, world_and_rank
from seerlike.methods.heads import mlp
from seerlike.methods.pass_memory import PassMemory, all_gather_rows, scatter_latest

log = logging.getLogger(__name__)

IGNORE = -100
"""The cluster of a sample the last clustering did not see (cross-entropy's ignore index)."""

_CHUNK = 1 << 24
"""Memory rows x centroids computed at once (64 MiB of fp32 scores)."""


def _all_reduce(t: Tensor) -> Tensor:
    if world_and_rank()[0] > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def nearest(x: Tensor, centroids: Tensor) -> Tensor:
    """Index of the centroid with the largest dot product for every row of ``x`` (chunked)."""
    step = max(1, _CHUNK // max(1, centroids.shape[0]))
    out = [(x[i:i + step] @ centroids.t()).argmax(dim=1) for i in range(0, x.shape[0], step)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


@torch.no_grad()
def spherical_kmeans(x: Tensor, centroids: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """Spherical k-means over the rows of ``x`` on every rank together: (centroids, local assignments).

    ``x`` holds this rank's unit-norm rows, ``centroids`` the same (k, d) start on every rank.
    Each iteration assigns every row to its nearest centroid, all-reduces the per-centroid sums
    and counts, and moves each centroid that has rows to the normalised mean of its rows (an
    empty one stays where it is). The returned assignments are to the final centroids.
    """
    c = centroids.clone()
    k = c.shape[0]
    for _ in range(iters):
        a = nearest(x, c)
        sums = torch.zeros_like(c)
        step = max(1, _CHUNK // k)
        for i in range(0, x.shape[0], step):
            sums += F.one_hot(a[i:i + step], k).to(x.dtype).t() @ x[i:i + step]
        counts = _all_reduce(torch.bincount(a, minlength=k))
        sums = _all_reduce(sums)
        moved = counts > 0
        c[moved] = sums[moved] / counts[moved].unsqueeze(1).to(x.dtype)
        c = F.normalize(c, dim=1)
    return c, nearest(x, c)


class DeepClusterV2(MethodBase):
    """DeepCluster-v2 over a backbone returning pooled features ``(B, backbone.out_dim)``."""

    needs_indices = True

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["deepcluster_v2"] = "deepcluster_v2"
        """DeepCluster-v2; defaults from facebookresearch/swav main_deepclusterv2.py and its 800-epoch script."""
        head_dims: tuple[int, ...] = (2048, 128)
        """Projection MLP widths after the trunk (hidden..., out): hidden_mlp 2048, feat_dim 128."""
        num_prototypes: tuple[int, ...] = (3000, 3000, 3000)
        """k of each k-means head (nmb_prototypes 3000 3000 3000)."""
        temperature: float = 0.1
        """Softmax temperature of the prototype scores in the loss."""
        crops_for_assign: tuple[int, ...] = (0, 1)
        """Views whose embeddings the memory keeps; head h clusters view crops_for_assign[h mod len]."""
        kmeans_iters: int = 10
        """k-means iterations per head and pass (cluster_memory's nmb_kmeans_iters)."""
        seed: int = 31
        """Seeds the choice of the initial centroids (the reference's run seed)."""

        def __post_init__(self) -> None:
            if not self.num_prototypes or any(k < 1 for k in self.num_prototypes):
                raise ValueError(f"num_prototypes must be one or more k >= 1, got {list(self.num_prototypes)}")
            if self.temperature <= 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")
            if not self.crops_for_assign or min(self.crops_for_assign) < 0 or \
                    len(set(self.crops_for_assign)) != len(self.crops_for_assign):
                raise ValueError(f"crops_for_assign={list(self.crops_for_assign)} must be distinct view indices >= 0")
            if self.kmeans_iters < 1:
                raise ValueError(f"kmeans_iters must be >= 1, got {self.kmeans_iters}")
            if any(d <= 0 for d in self.head_dims):
                raise ValueError(f"head_dims must be positive widths, got {list(self.head_dims)}")

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        need_assign_views("deepcluster_v2", cfg.crops_for_assign, sizes)

    def __init__(self, cfg: Config, backbone: nn.Module, *, num_samples: int) -> None:
        super().__init__()
        width = need_backbone_dim("DeepCluster-v2", backbone)
        if num_samples < max(cfg.num_prototypes):
            raise ValueError(f"deepcluster_v2: the data holds {num_samples} samples, fewer than the "
                             f"{max(cfg.num_prototypes)} clusters of method.num_prototypes; lower it")
        self.cfg, self.backbone, self.num_samples = cfg, backbone, num_samples
        self.projection = mlp(width, cfg.head_dims)
        dim = cfg.head_dims[-1] if cfg.head_dims else width
        for h, k in enumerate(cfg.num_prototypes):  # the centroids of the last clustering
            self.register_buffer(f"prototypes{h}", torch.zeros(k, dim))
        self.register_buffer("assignments", torch.full((len(cfg.num_prototypes), num_samples), IGNORE))
        """Cluster of every sample per head (IGNORE: not clustered yet); the same on every rank."""
        self.register_buffer("clusterings", torch.zeros((), dtype=torch.long))
        """Clusterings done (seeds each one's initial centroids)."""
        self.memory = PassMemory(num_samples, len(cfg.crops_for_assign), dim)
        self.reset_state()

    def prototypes(self, h: int) -> Tensor:
        return getattr(self, f"prototypes{h}")

    @torch.no_grad()
    def reset_state(self) -> None:
        """No clusters yet, an empty memory, random unit prototypes (unused until the first clustering)."""
        for h in range(len(self.cfg.num_prototypes)):
            p = self.prototypes(h)
            p.copy_(F.normalize(torch.randn(p.shape), dim=1))
        self.assignments.fill_(IGNORE)
        self.clusterings.zero_()
        self.memory.reset()

    # ------------------------------------------------------------------ forward

    def forward(self, views: list[Tensor], labels: Tensor | None = None,
                indices: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        bs = check_batch("DeepCluster-v2", views, indices, cfg.crops_for_assign)
        if self.memory.begin(indices):
            self.cluster()
        z = F.normalize(self.projection(forward_views(self.backbone, views)), dim=1)
        targets = self.assignments[:, indices]  # (heads, B)
        n_views = len(views)
        world, _ = world_and_rank()
        assigned = _all_reduce((targets[0] != IGNORE).sum() * n_views)  # rows with a cluster, all ranks
        with no_autocast(z):
            zf = z.float()
            loss = zf.new_zeros(())
            for h in range(len(cfg.num_prototypes)):
                scores = zf @ self.prototypes(h).t() / cfg.temperature
                loss = loss + F.cross_entropy(scores, targets[h].repeat(n_views), ignore_index=IGNORE, reduction="sum")
            # the sum over this rank's rows / the global count x world: after data parallelism averages
            # the gradients over the ranks, they are those of the mean over all ranks' rows
            loss = loss * world / assigned.clamp_min(1) / len(cfg.num_prototypes)
        self.memory.push(indices, torch.stack([z[c * bs:(c + 1) * bs].detach() for c in cfg.crops_for_assign]))
        return loss, {"assigned": assigned.float() / (n_views * bs * world)}

    # ------------------------------------------------------------------ clustering

    @torch.no_grad()
    def cluster(self) -> None:
        """k-means of every head on the memory; prototypes := centroids, assignments := clusters."""
        cfg, mem = self.cfg, self.memory
        rows = mem.rows()
        total = int(_all_reduce(torch.tensor(rows.numel(), device=rows.device)))
        if total < max(cfg.num_prototypes):
            raise ValueError(f"deepcluster_v2: the memory holds {total} samples, fewer than the "
                             f"{max(cfg.num_prototypes)} clusters of method.num_prototypes; lower it")
        index, stamp = mem.index[rows], mem.stamp[rows]
        new = torch.full_like(self.assignments, IGNORE)
        for h, k in enumerate(cfg.num_prototypes):
            x = mem.emb[h % len(cfg.crops_for_assign)][rows]
            seed = cfg.seed + 1_000_003 * int(self.clusterings) + 7919 * h
            start = initial_centroids(index, stamp, x, k, self.num_samples, seed)
            centroids, local = spherical_kmeans(x, start, cfg.kmeans_iters)
            self.prototypes(h).copy_(centroids)
            mine = torch.full_like(mem.index, IGNORE)
            mine[rows] = local
            scatter_latest(new[h], *all_gather_rows(mem.index, mem.stamp, mine))
        self.assignments.copy_(new)
        self.clusterings += 1
        log.info("deepcluster_v2: clustering %d done on %d samples", int(self.clusterings), total)


@torch.no_grad()
def initial_centroids(index: Tensor, stamp: Tensor, x: Tensor, k: int, num_samples: int, seed: int) -> Tensor:
    """The rows (over all ranks) of the ``k`` samples first in a ``seed``-ed permutation of all
    sample indices: the same choice however the rows are spread over ranks. A sample in the
    memory twice counts once, with its newest row."""
    rank_of = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    prio = rank_of[index.cpu()].to(x.device)
    first = _first_k(prio, stamp, k)
    pad = k - first.numel()  # every rank sends k candidates (all-gather needs equal shapes)
    cand_prio = torch.cat([prio[first], prio.new_full((pad,), num_samples)])
    cand_stamp = torch.cat([stamp[first], stamp.new_full((pad,), -1)])
    cand_x = torch.cat([x[first], x.new_zeros(pad, x.shape[1])])
    cand_prio, cand_stamp, cand_x = all_gather_rows(cand_prio, cand_stamp, cand_x)
    return cand_x[_first_k(cand_prio, cand_stamp, k)]


def _first_k(prio: Tensor, stamp: Tensor, k: int) -> Tensor:
    """Positions of the k smallest ``prio``, duplicates of one sample dropped but the newest ``stamp``."""
    order = torch.argsort(stamp, descending=True, stable=True)
    order = order[torch.argsort(prio[order], stable=True)]
    p = prio[order]
    first_of_sample = torch.ones_like(p, dtype=torch.bool)
    first_of_sample[1:] = p[1:] != p[:-1]
    return order[first_of_sample][:k]


def need_assign_views(method: str, crops_for_assign: tuple[int, ...], sizes: list[int]) -> None:
    """A ``check_views`` helper: every assignment view index names a view of the data config."""
    if max(crops_for_assign) >= len(sizes):
        raise ValueError(f"{method}: method.crops_for_assign={list(crops_for_assign)} names view "
                         f"{max(crops_for_assign)} but the data config makes {len(sizes)} views ({sizes}); "
                         "set method.crops_for_assign or data.augment.views")


def check_batch(method: str, views: list[Tensor], indices: Tensor | None, crops_for_assign: tuple[int, ...]) -> int:
    """The batch size, after checking the views and the sample indices a memory method needs."""
    bs = views[0].shape[0]
    if any(v.shape[0] != bs for v in views):
        raise ValueError(f"all views need the same batch size, got {[v.shape[0] for v in views]}")
    need_assign_views(method, crops_for_assign, [v.shape[-1] for v in views])
    if indices is None or indices.shape != (bs,):
        raise ValueError(f"{method} needs the batch's sample indices, a ({bs},) tensor; got "
                         f"{None if indices is None else tuple(indices.shape)}")
    return bs
