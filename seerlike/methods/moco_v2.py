"""MoCo v2 (Chen, Fan, Girshick, He 2020): queries against a momentum key encoder's keys, the
negatives from a queue of the keys of past batches.

State: the key encoder (trunk + head; the submodule ``key_encoder`` with requires_grad False,
moved by the momentum in :meth:`MoCoV2.on_step_end`), the queue of ``queue_length`` keys, the
queue's write position and the number of key batches made so far (which seeds the shuffle
below), all persistent buffers. The queue is filled with the keys of ALL ranks (gathered in
rank order), so it is identical on every rank and equals the queue of one process trained on
the concatenated batch (tests/dist/test_moco_v2_dist.py).

Batch-norm leakage, prevented by shuffling BN as in the official code: a query and its
positive key must not get BatchNorm statistics from the same set of samples, or the model can
find the positive among the queue's keys by the statistics alone (MoCo, section 3.3). The keys
are computed on a random permutation of the GLOBAL batch: each rank gathers the key views of
all ranks, runs the key encoder on its own slice of the permuted batch (so its BN statistics
come from a random mix of samples from every rank instead of from the rank's query batch),
then the keys are gathered and put back in the original order. The permutation is the same on
every rank without a broadcast: it is drawn from a generator seeded by the key-batch counter,
so a resumed run draws the same ones. On a single rank there is nothing to mix across (a
warning says so). This relies on per-rank BN: leave ``parallel.sync_bn`` off (SyncBN would
normalise every key batch over the whole global batch again).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seerlike.methods.base import MethodBase, MethodConfig, need_backbone_dim, need_views
from seerlike.methods.common import MomentumEncoder, world_and_rank, gather, no_autocast

log = logging.getLogger(__name__)

QUEUE_SEED = 0
"""Seed of the queue's initial random keys: the same on every rank without a broadcast."""


def relu_mlp(in_dim: int, dims: tuple[int, ...]) -> nn.Sequential:
    """The MoCo v2 head: Linear -> ReLU for each hidden width, then a Linear; biases, no BatchNorm."""
    if in_dim <= 0 or not dims or any(d <= 0 for d in dims):
        raise ValueError(f"head widths must be positive, got in_dim={in_dim}, dims={list(dims)}")
    layers: list[nn.Module] = []
    widths = [in_dim, *dims]
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 1:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- shuffling BN across ranks


def shuffle_permutation(n: int, seed: int) -> Tensor:
    """A permutation of the ``n`` samples of the global batch, identical on every rank for one ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def shuffled_slice(x: Tensor, perm: Tensor, world: int, rank: int) -> Tensor:
    """This rank's slice of the permuted global batch: rows ``perm[rank*B:(rank+1)*B]`` of all ranks' ``x``."""
    mine = perm.view(world, -1)[rank].to(x.device)
    out = gather(x)[mine]
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)  # the trunk's layout, kept for speed
    return out


@torch.no_grad()
def unshuffle(y: Tensor, perm: Tensor) -> Tensor:
    """All ranks' outputs on their shuffled slices (``y``: this rank's), back in the global batch's order."""
    return gather(y)[torch.argsort(perm).to(y.device)]


# ---------------------------------------------------------------- the method


def moco_loss(q: Tensor, k: Tensor, negatives: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """InfoNCE: the positive ``(q_i, k_i)`` against the ``negatives``; (loss, top-1 accuracy).

    ``k`` and ``negatives`` are unit rows (no gradient); the logits are fp32.
    """
    with no_autocast(q):
        q = F.normalize(q.float(), dim=1)
        positive = (q * k).sum(dim=1, keepdim=True)
        logits = torch.cat([positive, q @ negatives.t()], dim=1) / temperature
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        loss = F.cross_entropy(logits, target)
        acc = (logits.detach().argmax(dim=1) == 0).float().mean()
    return loss, acc


class MoCoV2(MethodBase):
    """MoCo v2 over a backbone returning pooled features ``(B, backbone.out_dim)``.

    View 0 gives the queries and view 1 the keys; with ``symmetric`` each view also plays the
    other part and both losses are summed (the official CIFAR-10 demo's option).
    """

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["moco_v2"] = "moco_v2"
        """MoCo v2 (Chen et al. 2020); defaults from the official code (facebookresearch/moco, main_moco.py with --mlp --moco-t 0.2)."""
        head_dims: tuple[int, ...] = (2048, 128)
        """Head widths after the trunk (hidden..., out): Linear -> ReLU, no BN (official --mlp: 2048-ReLU-128)."""
        queue_length: int = 65536
        """Keys in the queue of negatives (official --moco-k); at least the keys of one step (global batch, x2 if symmetric)."""
        momentum: float = 0.999
        """Momentum of the key encoder, constant (official --moco-m)."""
        temperature: float = 0.2
        """Softmax temperature (official MoCo v2 command: --moco-t 0.2)."""
        symmetric: bool = False
        """Also use view 1 as queries against view 0's keys and sum both losses (the official CIFAR-10 demo's option)."""
        shuffle_bn: bool = True
        """Compute the keys on a random permutation of the global batch across ranks (shuffling BN, see the module docstring)."""

        def __post_init__(self) -> None:
            if not self.head_dims or any(d <= 0 for d in self.head_dims):
                raise ValueError(f"head_dims must be positive widths ending with the key width, got {list(self.head_dims)}")
            if self.queue_length < 1:
                raise ValueError(f"queue_length must be >= 1, got {self.queue_length}")
            if not 0.0 <= self.momentum <= 1.0:
                raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")
            if self.temperature <= 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        need_views("moco_v2", sizes, 2, "set data.augment.views to one group of count 2 (query and key views)")

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__()
        width = need_backbone_dim("MoCo v2", backbone)
        self.cfg = cfg
        self.backbone = backbone
        self.head = relu_mlp(width, cfg.head_dims)
        self.key_encoder = MomentumEncoder(backbone=backbone, head=self.head)
        self.register_buffer("queue", torch.zeros(cfg.queue_length, cfg.head_dims[-1]))
        # where the next key goes (the queue is a ring: the oldest keys are overwritten)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # key batches made so far: seeds the shuffle permutation of the next one
        self.register_buffer("key_batches", torch.zeros((), dtype=torch.long))
        self._warned_single_rank = False
        self.reset_state()

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        if len(views) != 2:
            raise ValueError(f"MoCo v2 takes exactly 2 views, got {len(views)}; set the data views to 2")
        bs = views[0].shape[0]
        if views[1].shape[0] != bs:
            raise ValueError(f"both views need the same batch size, got {bs} and {views[1].shape[0]}")
        world, _ = world_and_rank()
        new_keys = bs * world * (2 if cfg.symmetric else 1)
        if new_keys > cfg.queue_length:
            raise ValueError(f"MoCo v2 makes {new_keys} keys per step but method.queue_length={cfg.queue_length}; "
                             f"set method.queue_length to at least {new_keys}")
        negatives = self.queue.clone()  # the queue before this batch's keys go in
        roles = [(0, 1), (1, 0)] if cfg.symmetric else [(0, 1)]
        loss, acc, keys = 0.0, 0.0, {}
        for qv, kv in roles:
            q = self.head(self.backbone(views[qv]))
            k, keys[kv] = self._keys(views[kv])
            term, hit = moco_loss(q, k, negatives, cfg.temperature)
            loss, acc = loss + term, acc + hit / len(roles)
        self._enqueue(torch.cat([keys[v] for v in sorted(keys)]))  # view order, as the official demo
        return loss, {"acc": acc}

    @torch.no_grad()
    def _keys(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Unit keys of ``x``: (this rank's, all ranks' in rank order), BN shuffled across ranks."""
        world, rank = world_and_rank()
        shuffle = self.cfg.shuffle_bn and world > 1
        seed = int(self.key_batches) if shuffle else 0  # reading a buffer syncs the device: only when needed
        self.key_batches.add_(1)
        if not shuffle:
            if self.cfg.shuffle_bn and not self._warned_single_rank:
                log.warning("MoCo v2 on one rank: no other rank to shuffle BN across, so the key encoder's "
                            "BatchNorm statistics come from the same images as the queries'")
                self._warned_single_rank = True
            k = F.normalize(self.key_encoder(x).float(), dim=1)
            return k, gather(k)
        perm = shuffle_permutation(x.shape[0] * world, seed)
        k = F.normalize(self.key_encoder(shuffled_slice(x, perm, world, rank)).float(), dim=1)
        everyone = unshuffle(k, perm)
        return everyone.view(world, -1, everyone.shape[1])[rank], everyone

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        """Write the keys at the queue's position, wrapping around; no device sync."""
        length = self.cfg.queue_length
        where = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % length
        self.queue.index_copy_(0, where, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % length)

    @torch.no_grad()
    def reset_state(self) -> None:
        """Key encoder := query encoder; the queue random unit keys (the official start), position 0."""
        self.key_encoder.copy_from([self.backbone, self.head])
        g = torch.Generator().manual_seed(QUEUE_SEED)
        self.queue.copy_(F.normalize(torch.randn(self.queue.shape, generator=g), dim=1))
        self.queue_ptr.zero_()
        self.key_batches.zero_()

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """key = m key + (1 - m) query: the update the official code makes at the start of the next forward."""
        self.key_encoder.update([self.backbone, self.head], self.cfg.momentum)
