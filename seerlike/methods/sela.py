"""SeLa, self-labelling (Asano et al. 2020): classification heads trained with cross-entropy on
pseudo-labels that Sinkhorn-Knopp spreads equally over the classes of every head.

As the reference (yukimasano/self-label, main.py and sinkhornknopp.py): the labels start as a
random equipartition of the dataset; every so often each head's logits for the whole dataset
are computed with the current head from stored inputs (the reference keeps the 2048-d features
and applies each head's layer), raised to the power lambda, scaled by Sinkhorn-Knopp to
uniform marginals over the classes and the samples, and every sample takes its most likely
class. Here the stored inputs are those of the last pass over the data (``PassMemory``, each
rank its share), Sinkhorn-Knopp is the distributed one SwAV uses (:func:`seerlike.methods.swav.sinkhorn`;
``exp(logits / epsilon)`` is ``softmax(logits)**lambda`` for ``epsilon = 1 / lambda``, up to
per-sample factors that the sample marginal absorbs), and the labels are replicated on every
rank. A sample the memory does not hold keeps its label.

SeLa-v2 (SwAV paper, appendix; no public code) is these pieces with SwAV's improvements:
``head_dims`` a projection MLP ending in normalised embeddings (``normalize``), heads of unit
prototypes, ``temperature`` 0.1 and multi-crop (``crops_for_assign`` the views kept in memory;
head ``h`` is labelled from view ``crops_for_assign[h mod len]``). ``tiny_sela`` uses that form.

Differences from the reference: the labels are recomputed every ``label_every`` forward calls
(0: once per pass) rather than at 100 times spread quadratically over training, from the
embeddings made while training rather than a separate pass, with a fixed number of Sinkhorn
iterations rather than until the sample marginal changes by less than 0.1 (L1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seerlike.methods.base import MethodBase, MethodConfig, need_backbone_dim
from seerlike.methods.common import forward_views, no_autocast
from seerlike.methods.deepcluster_v2 import check_batch, need_assign_views
from seerlike.methods.heads import mlp
from seerlike.methods.pass_memory import PassMemory, all_gather_rows, scatter_latest
from seerlike.methods.swav import sinkhorn
from seerlike.sharded import local

log = logging.getLogger(__name__)


def equipartition(num_samples: int, k: int, seed: int) -> Tensor:
    """Labels ``0..k-1`` each given to ``num_samples / k`` samples (the first remainders once more), shuffled."""
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return perm % k


class SeLa(MethodBase):
    """SeLa over a backbone returning pooled features ``(B, backbone.out_dim)``."""

    needs_indices = True

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["sela"] = "sela"
        """SeLa; defaults from yukimasano/self-label (main.py flags, scripts/resnet.sh)."""
        head_dims: tuple[int, ...] = ()
        """Projection MLP widths between the trunk and the heads; () as SeLa (heads on the 2048-d features), SeLa-v2 (2048, 128)."""
        num_prototypes: tuple[int, ...] = (3000,) * 10
        """Classes of each head (scripts/resnet.sh: hc=10 heads of ncl=3000)."""
        normalize: bool = False
        """SeLa-v2: L2-normalised embeddings and unit-norm heads without bias (SwAV's prototypes); SeLa: plain linear heads."""
        temperature: float = 1.0
        """The logits are divided by it in the loss (SeLa 1; SeLa-v2 0.1)."""
        epsilon: float = 0.04
        """Sinkhorn's exp(logits / epsilon): 1 / lambda with SeLa's lambda 25; SeLa-v2 0.05."""
        sinkhorn_iters: int = 100
        """Sinkhorn-Knopp iterations per head and labelling (SeLa iterates until the sample marginal settles)."""
        sinkhorn_dtype: Literal["float32", "float64"] = "float64"
        """Precision of Sinkhorn-Knopp (SeLa: float64, or exp underflows for logits far below the maximum)."""
        crops_for_assign: tuple[int, ...] = (0,)
        """Views whose head inputs the memory keeps; head h is labelled from view crops_for_assign[h mod len]."""
        label_every: int = 0
        """Forward calls between labellings; 0: once per pass over the data (SeLa: 100 times in 400 epochs)."""
        seed: int = 42
        """Seeds the initial random labels (the reference's run seed)."""

        def __post_init__(self) -> None:
            if not self.num_prototypes or any(k < 1 for k in self.num_prototypes):
                raise ValueError(f"num_prototypes must be one or more k >= 1, got {list(self.num_prototypes)}")
            if self.temperature <= 0 or self.epsilon <= 0:
                raise ValueError(f"temperature and epsilon must be > 0, got {self.temperature}, {self.epsilon}")
            if self.sinkhorn_iters < 1 or self.label_every < 0:
                raise ValueError(f"sinkhorn_iters must be >= 1 and label_every >= 0, got {self.sinkhorn_iters}, "
                                 f"{self.label_every}")
            if not self.crops_for_assign or min(self.crops_for_assign) < 0 or \
                    len(set(self.crops_for_assign)) != len(self.crops_for_assign):
                raise ValueError(f"crops_for_assign={list(self.crops_for_assign)} must be distinct view indices >= 0")
            if any(d <= 0 for d in self.head_dims):
                raise ValueError(f"head_dims must be positive widths, got {list(self.head_dims)}")

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        need_assign_views("sela", cfg.crops_for_assign, sizes)

    def __init__(self, cfg: Config, backbone: nn.Module, *, num_samples: int) -> None:
        super().__init__()
        width = need_backbone_dim("SeLa", backbone)
        if num_samples < max(cfg.num_prototypes):
            raise ValueError(f"sela: the data holds {num_samples} samples, fewer than the {max(cfg.num_prototypes)} "
                             "classes of method.num_prototypes; lower it")
        self.cfg, self.backbone, self.num_samples = cfg, backbone, num_samples
        self.projection = mlp(width, cfg.head_dims)
        dim = cfg.head_dims[-1] if cfg.head_dims else width
        self.heads = nn.ModuleList(nn.Linear(dim, k, bias=not cfg.normalize) for k in cfg.num_prototypes)
        self.register_buffer("labels", torch.zeros(len(cfg.num_prototypes), num_samples, dtype=torch.long))
        """Pseudo-label of every sample per head; the same on every rank."""
        self.register_buffer("labellings", torch.zeros((), dtype=torch.long))
        """Sinkhorn labellings done."""
        self.memory = PassMemory(num_samples, len(cfg.crops_for_assign), dim)
        self.reset_state()

    @torch.no_grad()
    def reset_state(self) -> None:
        """Random equipartitioned labels, an empty memory, unit heads when normalised."""
        for h, k in enumerate(self.cfg.num_prototypes):
            self.labels[h] = equipartition(self.num_samples, k, self.cfg.seed + h)
        self.labellings.zero_()
        self.memory.reset()
        self._normalize_heads()

    def embed(self, views: list[Tensor]) -> Tensor:
        z = self.projection(forward_views(self.backbone, views))
        return F.normalize(z, dim=1) if self.cfg.normalize else z

    def _logits(self, h: int, z: Tensor) -> Tensor:
        # through the module, so that FSDP2-sharded heads are gathered; fp32 (3000-way softmax at T 0.1)
        with no_autocast(z):
            return self.heads[h](z.float().to(self.heads[h].weight.dtype)).float()

    def forward(self, views: list[Tensor], labels: Tensor | None = None,
                indices: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        bs = check_batch("SeLa", views, indices, cfg.crops_for_assign)
        if self.memory.begin(indices, cfg.label_every):
            self.relabel()
        z = self.embed(views)
        targets = self.labels[:, indices]
        loss = z.new_zeros((), dtype=torch.float32)
        for h in range(len(cfg.num_prototypes)):
            loss = loss + F.cross_entropy(self._logits(h, z) / cfg.temperature, targets[h].repeat(len(views)))
        self.memory.push(indices, torch.stack([z[c * bs:(c + 1) * bs].detach() for c in cfg.crops_for_assign]))
        return loss / len(cfg.num_prototypes), {"labellings": self.labellings.float()}

    @torch.no_grad()
    def relabel(self) -> None:
        """Every head: Sinkhorn-Knopp on the logits of the memory's samples; each takes its likeliest class."""
        cfg, mem = self.cfg, self.memory
        rows = mem.rows()
        dtype = getattr(torch, cfg.sinkhorn_dtype)
        for h in range(len(cfg.num_prototypes)):
            x = mem.emb[h % len(cfg.crops_for_assign)][rows]
            q = sinkhorn(self._logits(h, x), cfg.epsilon, cfg.sinkhorn_iters, dtype=dtype)
            mine = torch.full_like(mem.index, -1)
            mine[rows] = q.argmax(dim=1)
            scatter_latest(self.labels[h], *all_gather_rows(mem.index, mem.stamp, mine))
        self.labellings += 1
        log.info("sela: labelling %d done on %d samples of this rank", int(self.labellings), rows.numel())

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        self._normalize_heads()

    @torch.no_grad()
    def _normalize_heads(self) -> None:
        if not self.cfg.normalize:
            return
        for head in self.heads:  # row-wise on the local tensor: an FSDP2 shard (dim 0) holds whole rows
            w = local(head.weight)
            w.copy_(F.normalize(w, dim=1))
