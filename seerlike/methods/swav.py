"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn-Knopp cluster assignments.

One file holds the projection head, the prototypes, the distributed Sinkhorn, the queue
and the loss. All state (prototypes, queue, step counter) is parameters or persistent
buffers, so a checkpoint of ``state_dict()`` carries it.

The queue is kept GLOBAL and identical on every rank (it is filled with the all-gathered
embeddings of the assignment crops); each rank feeds its own slice of it into Sinkhorn.
The set of columns Sinkhorn sees is then exactly the reference code's (each rank's own
last ``queue_length / world`` embeddings), while the buffer is replicated: DCP's
de-duplication of replicated tensors is correct for it and a run can resume on another
world size.
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
from seerlike.methods.common import forward_views
from seerlike.methods.heads import mlp

log = logging.getLogger(__name__)


def _world(group: dist.ProcessGroup | None = None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float, iters: int, group: dist.ProcessGroup | None = None,
             dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinkhorn-Knopp soft assignments ``Q`` (B_local, K) of the rows of ``scores`` to K prototypes.

    Runs across all ranks of ``group`` (sums all-reduced), so it equals the single-process
    result on the concatenated batch. In fp32 unless ``dtype`` says otherwise (float64 keeps
    ``exp`` of logits far below the maximum from vanishing, as SeLa needs). The shift before ``exp`` is the
    GLOBAL max: a per-rank max would scale each rank's columns differently.
    As returned, every row (sample) sums to 1; the prototype totals over the global batch
    approach B/K as ``iters`` grows (exactly B/K before the last column normalisation).
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn expects scores of shape (batch, prototypes), got {tuple(scores.shape)}")
    world = _world(group)
    scores = scores.to(dtype)
    shift = scores.max()
    if world > 1:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    q = torch.exp((scores - shift) / epsilon).t()  # K x B_local
    k = q.shape[0]
    totals = torch.stack([q.sum(), torch.tensor(float(q.shape[1]), device=q.device, dtype=dtype)])
    if world > 1:
        dist.all_reduce(totals, group=group)
    q /= totals[0]
    b = totals[1]
    tiny = torch.finfo(dtype).tiny  # a prototype with no mass stays 0 instead of 0/0
    for _ in range(iters):
        rows = q.sum(dim=1, keepdim=True)
        if world > 1:
            dist.all_reduce(rows, group=group)
        q /= rows.clamp_min(tiny)
        q /= k
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)
        q /= b
    q *= b
    return q.t()


class SwAV(MethodBase):
    """SwAV over a backbone returning pooled features ``(B, backbone.out_dim)``.

    Defaults are the SwAV paper's (its reference code, main_swav.py); SEER's values are noted.
    """

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["swav"] = "swav"
        """SwAV (Caron et al. 2020)."""
        head_dims: tuple[int, ...] = (2048, 128)
        """Projection MLP widths after the trunk (hidden..., out); SEER: (8192, 8192, 256)."""
        num_prototypes: int = 3000
        """K, the number of prototypes; SEER uses 16000."""
        temperature: float = 0.1
        """Softmax temperature of the prototype scores in the swapped-prediction loss."""
        epsilon: float = 0.05
        """Sinkhorn entropy regularisation (SEER-10B: 0.03)."""
        sinkhorn_iters: int = 3
        """Sinkhorn-Knopp iterations (SEER: 10)."""
        num_crops: int = 8
        """Number of views per sample the data pipeline yields (e.g. 2 x 224 + 6 x 96 = 8)."""
        crops_for_assign: tuple[int, ...] = (0, 1)
        """Indices of the views whose assignments (codes) are computed and predicted from the others."""
        queue_length: int = 0
        """Global queue of past embeddings fed into Sinkhorn (0: no queue; 3840 in the batch-256 recipes)."""
        queue_start_step: int = 0
        """Step from which the queue is filled; it is used once full."""
        freeze_prototypes_steps: int = 313
        """Prototypes get no gradient for this many first steps."""
        normalize: bool = True
        """L2-normalise the embeddings before the prototypes (without it the loss sticks at ln K)."""

        def __post_init__(self) -> None:
            if self.num_prototypes < 1:
                raise ValueError(f"num_prototypes must be >= 1, got {self.num_prototypes}")
            if self.temperature <= 0 or self.epsilon <= 0:
                raise ValueError(f"temperature and epsilon must be > 0, got {self.temperature}, {self.epsilon}")
            if self.sinkhorn_iters < 1:
                raise ValueError(f"sinkhorn_iters must be >= 1, got {self.sinkhorn_iters}")
            if self.num_crops < 2:
                raise ValueError(f"num_crops must be >= 2 (swapped prediction needs two views), got {self.num_crops}")
            bad = [c for c in self.crops_for_assign if not 0 <= c < self.num_crops]
            if not self.crops_for_assign or bad or len(set(self.crops_for_assign)) != len(self.crops_for_assign):
                raise ValueError(
                    f"crops_for_assign={list(self.crops_for_assign)} must be distinct view indices in "
                    f"[0, num_crops={self.num_crops}); set crops_for_assign or num_crops accordingly")
            if self.queue_length < 0 or self.queue_start_step < 0 or self.freeze_prototypes_steps < 0:
                raise ValueError("queue_length, queue_start_step and freeze_prototypes_steps must be >= 0")
            if any(d <= 0 for d in self.head_dims):
                raise ValueError(f"head_dims must be positive widths, got {list(self.head_dims)}")

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        if len(sizes) != cfg.num_crops:
            raise ValueError(f"swav: method.num_crops={cfg.num_crops} but the data config makes {len(sizes)} views "
                             f"({sizes}); set method.num_crops={len(sizes)} or change data.augment.views")

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__()
        need_backbone_dim("SwAV", backbone)
        self.cfg = cfg
        self.backbone = backbone
        self.projection = mlp(backbone.out_dim, cfg.head_dims)
        self.feat_dim = cfg.head_dims[-1] if cfg.head_dims else backbone.out_dim
        self.prototypes = nn.Linear(self.feat_dim, cfg.num_prototypes, bias=False)
        n_assign = len(cfg.crops_for_assign)
        self.register_buffer("queue", torch.zeros(n_assign, cfg.queue_length, self.feat_dim))
        # rows of the queue holding real embeddings (it is used once this reaches queue_length)
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        # the step the next forward belongs to (set by on_step_end), for queue_start_step
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._queue_used = False
        self.reset_state()

    # ------------------------------------------------------------------ forward

    def embed(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Embeddings (normalised if configured) and prototype scores of all views, view-major.

        Consecutive views of one resolution go through the trunk together (one forward per size).
        """
        z = self.projection(forward_views(self.backbone, views))
        if self.cfg.normalize:
            z = F.normalize(z, dim=1)
        return z, self.prototypes(z)

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        if len(views) != cfg.num_crops:
            raise ValueError(f"SwAV got {len(views)} views but num_crops={cfg.num_crops}; "
                             f"set method.num_crops to the number of views the data yields")
        bs = views[0].shape[0]
        if any(v.shape[0] != bs for v in views):
            raise ValueError(f"all views need the same batch size, got {[v.shape[0] for v in views]}")
        z, scores = self.embed(views)

        codes = self._assign(z, scores, bs)
        logp = F.log_softmax(scores.float() / cfg.temperature, dim=1).split(bs)
        loss = scores.new_zeros((), dtype=torch.float32)
        for code, crop in zip(codes, cfg.crops_for_assign):
            sub = sum((code * logp[v]).sum(dim=1).mean() for v in range(cfg.num_crops) if v != crop)
            loss = loss - sub / (cfg.num_crops - 1)
        loss = loss / len(cfg.crops_for_assign)
        return loss, {"queue_used": float(self._queue_used)}

    @torch.no_grad()
    def _assign(self, z: Tensor, scores: Tensor, bs: int) -> list[Tensor]:
        """Codes of the assignment crops (Sinkhorn over the global batch and the queue slice)."""
        cfg = self.cfg
        world = _world()
        rank = dist.get_rank() if world > 1 else 0
        # the queue_length test first: reading the buffers syncs a GPU
        fill = cfg.queue_length > 0 and int(self.step) >= cfg.queue_start_step
        use = fill and int(self.queue_filled) >= cfg.queue_length
        if use and not self._queue_used:
            log.info("SwAV queue full (%d embeddings): used in Sinkhorn from step %d", cfg.queue_length, int(self.step))
        self._queue_used = use
        codes, pushed = [], []
        for i, crop in enumerate(cfg.crops_for_assign):
            out = scores[crop * bs:(crop + 1) * bs].detach()
            if use:
                mine = self.queue[i].tensor_split(world)[rank]  # this rank's share of the global queue
                out = torch.cat([self._score(mine), out.float()])
            codes.append(sinkhorn(out, cfg.epsilon, cfg.sinkhorn_iters)[-bs:])
            if fill:
                pushed.append(z[crop * bs:(crop + 1) * bs].detach().float())
        if fill:
            self._push(torch.stack(pushed), world)
        return codes

    def _score(self, emb: Tensor) -> Tensor:
        # through the module (not .weight) so that a sharded prototypes layer gets unsharded
        with torch.autocast(emb.device.type, enabled=False):
            return self.prototypes(emb.to(self.prototypes.weight.dtype)).float()

    def _push(self, emb: Tensor, world: int) -> None:
        """FIFO, newest first: the all-gathered (rank order) embeddings go to the front."""
        if world > 1:
            parts = [torch.empty_like(emb) for _ in range(world)]
            dist.all_gather(parts, emb.contiguous())
            emb = torch.cat(parts, dim=1)
        length, n = self.cfg.queue_length, emb.shape[1]
        if n >= length:
            self.queue.copy_(emb[:, :length])
        else:
            self.queue[:, n:] = self.queue[:, :-n].clone()
            self.queue[:, :n] = emb
        self.queue_filled.fill_(min(int(self.queue_filled) + n, length))

    # ------------------------------------------------------------------ hooks

    @torch.no_grad()
    def reset_state(self) -> None:
        """Empty queue, step 0, unit-norm prototypes: for a model materialised from the meta device."""
        self.queue.zero_()
        self.queue_filled.zero_()
        self.step.zero_()
        self._normalize_prototypes()

    def on_after_backward(self, step: int) -> None:
        """While frozen, drop the prototypes' gradient so no optimizer (momentum, decay) moves them."""
        if step < self.cfg.freeze_prototypes_steps:
            self.prototypes.weight.grad = None

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """Re-normalise the prototypes and advance the step counter (read by the queue)."""
        self._normalize_prototypes()
        self.step.fill_(step + 1)

    @torch.no_grad()
    def _normalize_prototypes(self) -> None:
        # row-wise on the local tensor: an FSDP2 shard (dim 0) holds whole rows
        w = self.prototypes.weight
        local = w.to_local() if hasattr(w, "to_local") else w
        local.copy_(F.normalize(local, dim=1))
