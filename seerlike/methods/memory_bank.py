"""A memory bank of one unit embedding per training sample, sharded over the ranks, and the
noise-contrastive loss against it (NPID, Wu et al. 2018; PIRL, Misra & van der Maaten 2020).

**Sharding.** Rank ``r`` of ``W`` holds the rows of samples ``[r*S, min((r+1)*S, N))`` with
``S = ceil(N / W)`` (contiguous ranges, so each rank initialises its own rows without making
anyone else's). The rows are a non-persistent buffer: per-rank state that the engine saves in
each rank's own checkpoint file (docs/methods.md, "The contract").

**An exact global view.** A step needs the rows of the global batch's samples (each sample's
positive is its own row) and of the step's negatives. The negatives are drawn by a generator
seeded with (the run's sampling seed, the number of draws so far), so every rank draws the same
indices without communicating; the batch's indices are all-gathered. Each rank writes the rows
it owns into a zero tensor of all the wanted rows and one ``all_reduce(SUM)`` completes it:
every row has exactly one owner and ``x + 0 = x``, so every rank ends with the very rows one
process holding the whole bank would read. The cost is ``(global batch + K) x dim`` floats per
step, whatever the dataset's size.

**Negatives shared by the batch.** The official code (zhirongw/lemniscate.pytorch,
lib/NCEAverage.py; VISSL's nce_loss.py) draws K negatives per sample. Here one set of K
uniform draws (with replacement, as the official alias sampler with uniform weights) serves the
whole global batch: each sample still sees K independent uniform negatives, while the rows to
exchange stay K instead of batch x K (a per-sample draw on a sharded bank would move
batch x K x dim floats per rank and step: 0.5 GB at PIRL's 32 x 32,000 x 128).

**Updates** (:meth:`MemoryBank.update`): ``row := normalise(m * row + (1 - m) * feature)``
(momentum ``m``; the official update), for the batch's samples, applied after the optimizer step
(``on_step_end``), so a step skipped for a non-finite loss leaves the bank untouched. Every rank
gathers the whole batch's features and updates the rows it owns among them; a sample twice in
one batch (``data.resampled``) takes its last feature. With gradient accumulation each
micro-batch's update is applied in turn.

**NCE** (:func:`nce_loss`): the official NCECriterion. A score ``P = exp(s / T) / Z`` per
(embedding, row) pair, noise probability ``1 / N``; the positive is classified as data and the
K negatives as noise: ``-(log P+ / (P+ + K/N) + sum_k log (K/N) / (P_k + K/N))`` averaged over
the batch. ``Z`` is estimated once, on the first batch, as N times the mean of
``exp(s / T)`` over every score of the global batch (the official code's estimate), and kept
(a persistent buffer) once that step is taken (a skipped first step's estimate is dropped).
Computed in log space, so no temperature overflows; the official ``eps = 1e-7`` only guards a
log of 0, which log space cannot meet.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from seerlike.methods.common import gather, no_autocast, world_and_rank

log = logging.getLogger(__name__)

BANK_SEED = 0
"""Seed of the initial rows: a sample's initial row is the same on every world size."""
INIT_BLOCK = 4096
"""Rows per seeded block of the initial values (a rank makes only the blocks its range touches)."""


def initial_rows(lo: int, hi: int, dim: int, *, normalize: bool) -> Tensor:
    """The initial rows of samples ``[lo, hi)``: uniform in ``[-a, a]``, ``a = 1 / sqrt(dim / 3)``
    (the official NCEAverage init: each row's expected squared norm is 1), unit rows if ``normalize``
    (VISSL's ``norm_init``). Row ``i`` depends on ``i`` only, not on which rank makes it."""
    a = 1.0 / math.sqrt(dim / 3)
    out = torch.empty(hi - lo, dim)
    for block in range(lo // INIT_BLOCK, -(-hi // INIT_BLOCK)):
        start = block * INIT_BLOCK
        g = torch.Generator().manual_seed(BANK_SEED * 1_000_003 + block)
        values = torch.rand(INIT_BLOCK, dim, generator=g).mul_(2 * a).sub_(a)
        a_lo, a_hi = max(lo, start), min(hi, start + INIT_BLOCK)
        out[a_lo - lo:a_hi - lo] = values[a_lo - start:a_hi - start]
    return F.normalize(out, dim=1) if normalize else out


def last_occurrences(idx: Tensor) -> Tensor:
    """A mask of the entries of ``idx`` that no later entry repeats (no device sync)."""
    order = torch.sort(idx, stable=True).indices
    s = idx[order]
    last_in_run = torch.ones_like(s, dtype=torch.bool)
    last_in_run[:-1] = s[1:] != s[:-1]
    return torch.empty_like(last_in_run).scatter_(0, order, last_in_run)


class MemoryBank(nn.Module):
    """This rank's share of a bank of ``num_samples`` rows of width ``dim`` (module docstring).

    ``rows`` holds the owned rows and one scratch row after them: writes of rows this rank does
    not own are sent there, so an update needs no data-dependent indexing (no device sync).
    """

    def __init__(self, num_samples: int, dim: int, *, momentum: float, normalize_init: bool) -> None:
        super().__init__()
        if num_samples < 1 or dim < 1:
            raise ValueError(f"a memory bank needs num_samples >= 1 and dim >= 1, got {num_samples} and {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"bank momentum must be in [0, 1], got {momentum}")
        self.num_samples, self.dim, self.momentum, self.normalize_init = num_samples, dim, momentum, normalize_init
        self.world, self.rank = world_and_rank()
        share = -(-num_samples // self.world)
        self.lo = min(self.rank * share, num_samples)
        self.hi = min(self.lo + share, num_samples)
        self.register_buffer("rows", torch.empty(self.hi - self.lo + 1, dim), persistent=False)
        # updates applied to this rank's rows: 0 after a (re)initialisation
        self.register_buffer("updates", torch.zeros((), dtype=torch.long), persistent=False)
        self.reset()

    @property
    def owned(self) -> int:
        return self.hi - self.lo

    @torch.no_grad()
    def reset(self) -> None:
        if self.rows.is_meta:
            return
        self.rows[:-1].copy_(initial_rows(self.lo, self.hi, self.dim, normalize=self.normalize_init))
        self.rows[-1].zero_()
        self.updates.zero_()

    def _local(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(which entries this rank owns, their row in ``rows``; the scratch row for the others)."""
        if world_and_rank() != (self.world, self.rank):
            world, rank = world_and_rank()
            raise RuntimeError(f"the memory bank was built for rank {self.rank} of {self.world} but runs as rank "
                               f"{rank} of {world}; build the method after the process group is initialised")
        mine = (idx >= self.lo) & (idx < self.hi)
        return mine, torch.where(mine, idx - self.lo, self.owned)

    @torch.no_grad()
    def fetch(self, idx: Tensor) -> Tensor:
        """The rows of samples ``idx`` (the same tensor on every rank), exactly, on every rank: a collective."""
        mine, local = self._local(idx.to(self.rows.device))
        out = torch.where(mine[:, None], self.rows[local], 0.0)
        if self.world > 1:
            dist.all_reduce(out)
        return out

    @torch.no_grad()
    def update(self, idx: Tensor, features: Tensor) -> None:
        """``row := normalise(m row + (1 - m) feature)`` for the owned rows among ``idx`` (every rank's
        samples, the same on every rank); a sample listed twice takes its last feature."""
        idx = idx.to(self.rows.device)
        mine, local = self._local(idx)
        local = torch.where(mine & last_occurrences(idx), local, self.owned)
        new = F.normalize(self.rows[local].lerp(features.to(self.rows), 1.0 - self.momentum), dim=1)
        self.rows.index_copy_(0, local, new)
        self.rows[-1].zero_()
        self.updates.add_(1)


def nce_loss(pos: Tensor, neg: Tensor, log_z: Tensor, num_samples: int) -> Tensor:
    """The official NCECriterion on scores ``s / T``: ``pos`` ``(B,)``, ``neg`` ``(B, K)``, ``log Z``.

    With ``P = exp(score) / Z`` and ``c = K / N``: ``-(1/B) sum_i [log(P+ / (P+ + c)) + sum_k log(c / (P_k + c))]``;
    ``log(P / (P + c)) = -softplus(log c - log P)`` and ``log(c / (P + c)) = -softplus(log P - log c)``.
    """
    log_c = math.log(neg.shape[1] / num_samples)
    data = F.softplus(log_c - (pos - log_z))
    noise = F.softplus((neg - log_z) - log_c).sum(dim=1)
    return (data + noise).mean()


def softmax_loss(pos: Tensor, neg: Tensor) -> Tensor:
    """Cross-entropy of the positive among the K+1 scores (InfoNCE; VISSL's ``loss_type: cross_entropy``)."""
    logits = torch.cat([pos[:, None], neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device))


class BankContrast(nn.Module):
    """A :class:`MemoryBank`, its negatives and its loss: the part NPID and PIRL share.

    Per step: :meth:`lookup` (the rows of the batch and K negatives, a collective), :meth:`loss`
    for each embedding to contrast, :meth:`remember` the features that update the bank; the
    method's ``on_after_backward`` and ``on_step_end`` call :meth:`close_step` and :meth:`commit`.
    State: the bank (per rank), the draw counter, the sampling seed and ``log Z`` (persistent,
    the same on every rank).
    """

    def __init__(self, num_samples: int, dim: int, *, num_negatives: int, temperature: float, momentum: float,
                 loss: str, normalize_init: bool) -> None:
        super().__init__()
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if loss not in ("nce", "softmax"):
            raise ValueError(f"loss must be 'nce' or 'softmax', got {loss!r}")
        self.num_samples, self.num_negatives = num_samples, num_negatives
        self.temperature, self.kind = temperature, loss
        self.bank = MemoryBank(num_samples, dim, momentum=momentum, normalize_init=normalize_init)
        # drawn from the global RNG, which the engine seeds identically on every rank before building
        self._initial_seed = int(torch.randint(2**62, (), device="cpu"))
        self.register_buffer("seed", torch.tensor(self._initial_seed, dtype=torch.long))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        self.register_buffer("log_z", torch.zeros(()))
        self.register_buffer("z_known", torch.zeros((), dtype=torch.bool))
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._ready: list[tuple[Tensor, Tensor]] = []
        self._z_estimate: Tensor | None = None  # this step's estimate of log Z, kept once the step is taken
        self._z_ready: Tensor | None = None
        self._forget_mirrors()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._forget_mirrors())

    def _forget_mirrors(self) -> None:
        """Python copies of the scalar buffers, read back (one device sync) at the next forward."""
        self._draws: int | None = None
        self._seed: int | None = None
        self._z_known: bool | None = None

    @torch.no_grad()
    def reset(self) -> None:
        self.bank.reset()
        self.seed.fill_(self._initial_seed)
        self.draws.zero_()
        self.log_z.zero_()
        self.z_known.fill_(False)
        self._pending, self._ready = [], []
        self._z_estimate = self._z_ready = None
        self._forget_mirrors()

    # ------------------------------------------------------------ per step

    @torch.no_grad()
    def negatives(self, device: torch.device) -> Tensor:
        """This step's K negative sample indices: uniform with replacement, the same on every rank."""
        if self._draws is None:
            self._draws, self._seed = int(self.draws), int(self.seed)
            if self._draws > 0 and int(self.bank.updates) == 0:
                log.warning("the memory bank starts from its initial rows at draw %d (a resume on another world "
                            "size, or per-rank state not restored): its rows refill as the samples come by",
                            self._draws)
        g = torch.Generator().manual_seed((self._seed + self._draws) % 2**63)
        idx = torch.randint(self.num_samples, (self.num_negatives,), generator=g)
        self._draws += 1
        self.draws.fill_(self._draws)
        return idx.to(device)

    @torch.no_grad()
    def lookup(self, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(the bank rows of this rank's samples ``(B, dim)``, the K negatives' rows ``(K, dim)``, the
        global batch's indices): one all-gather and one all-reduce, identical rows on every rank."""
        if indices.dtype != torch.long or indices.dim() != 1:
            raise ValueError(f"sample indices must be an int64 vector, got {indices.dtype} {tuple(indices.shape)}")
        batch_idx = gather(indices)
        rows = self.bank.fetch(torch.cat([batch_idx, self.negatives(indices.device)]))
        _, rank = world_and_rank()
        b = indices.shape[0]
        return rows[rank * b:(rank + 1) * b], rows[batch_idx.shape[0]:], batch_idx

    def loss(self, q: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
        """(the loss of unit embeddings ``q`` against their rows ``pos`` and the negatives ``neg``,
        the fraction of samples whose own row scores above every negative); fp32."""
        with no_autocast(q):
            q = q.float()
            s_pos = (q * pos).sum(dim=1) / self.temperature
            s_neg = q @ neg.t() / self.temperature
            if self.kind == "softmax":
                loss = softmax_loss(s_pos, s_neg)
            else:
                loss = nce_loss(s_pos, s_neg, self._log_z(s_pos, s_neg), self.num_samples)
            acc = (s_pos.detach() > s_neg.detach().amax(dim=1)).float().mean()
        return loss, acc

    @torch.no_grad()
    def _log_z(self, s_pos: Tensor, s_neg: Tensor) -> Tensor:
        """``log Z``; until a step with it is taken, estimated as ``log(N * mean exp(s))`` over the global
        batch's scores (kept from the first such step on; a skipped step's estimate is dropped)."""
        if self._z_known is None:
            self._z_known = bool(self.z_known)
        if self._z_known:
            return self.log_z
        if self._z_estimate is None:  # the step's first micro-batch: later ones use the same estimate
            scores = torch.cat([s_pos[:, None], s_neg], dim=1).double()
            peak = scores.max()
            world, _ = world_and_rank()
            if world > 1:
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            count = torch.tensor(float(scores.numel()), dtype=torch.float64, device=scores.device)
            total = torch.stack([(scores - peak).exp().sum(), count])
            if world > 1:
                dist.all_reduce(total)
            self._z_estimate = (peak + total[0].log() - total[1].log() + math.log(self.num_samples)).float()
        return self._z_estimate

    @torch.no_grad()
    def remember(self, batch_idx: Tensor, features: Tensor) -> None:
        """Keep this rank's unit ``features`` (all ranks' are gathered here) to update the bank after the step."""
        if self.training:
            self._pending.append((batch_idx, gather(features.detach().float().contiguous())))

    def close_step(self) -> None:
        """The step's forwards are done (``on_after_backward``): what they remembered is this step's update."""
        self._ready, self._pending = self._pending, []
        self._z_ready, self._z_estimate = self._z_estimate, None

    @torch.no_grad()
    def commit(self) -> None:
        """Apply the step's updates and keep its Z estimate (``on_step_end``: only after a step the optimizer took)."""
        for batch_idx, features in self._ready:
            self.bank.update(batch_idx, features)
        self._ready = []
        if self._z_ready is not None:
            self.log_z.copy_(self._z_ready)
            self.z_known.fill_(True)
            self._z_known, self._z_ready = True, None
            log.info("NCE normalisation constant set: log Z = %.4f", float(self.log_z))
