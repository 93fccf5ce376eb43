"""The online monitor's kNN scorer: kNN top-1 of the backbone being trained, on a labeled split.

Built by the entry points from the ``eval.*`` section (:func:`knn_scorer`) and called by the
engine's monitor on its schedule (seerlike.engine.monitor: when, cost cap, metrics.jsonl,
TensorBoard). Given a labeled split (``eval.train`` as the memory bank, ``eval.val`` as queries:
a ``path,label`` CSV or a class-folder tree, what `seerlike eval knn` takes), a reading embeds
the split with ``method.backbone`` and scores it with the same weighted kNN as `seerlike eval
knn` (seerlike.eval.knn; k 20, cosine, T 0.07). docs/engine.md, "Watching it learn", has the
user's side; the design:

- **What is measured**: the trunk a checkpoint keeps (``method.backbone``), in eval mode and
  without gradients, then every module back in its own mode. BatchNorm running statistics
  differ per rank without SyncBN; the ranks borrow rank 0's for the evaluation (they are what a
  checkpoint saves) and get their own back, so the number equals `seerlike eval knn` of a
  checkpoint written at that step. The forward runs in fp32.
- **Sharded over ranks**: rank r embeds the r-th contiguous slice of the images (padded so
  every rank runs the same number of batches: under FSDP2 each forward is a collective), the
  features are all-gathered, rank 0 scores the kNN and broadcasts the result. DDP is bypassed
  (the unwrapped backbone is called); under FSDP2 the root unit is unsharded for the duration
  and the blocks gather their own parameters as in training.
- **Cost**: the split is listed, capped at ``max_per_class`` images per class and decoded once
  (each rank its slice, kept as uint8); a reading is then forward passes and one matrix
  product. With a time budget the split is also cut (from a timed probe of a few images) so that
  READINGS_PLANNED readings and the decoding fit in ``max_fraction`` of it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from seerlike.checkpoints import Loaded
from seerlike.config import ConfigError
from seerlike.engine.monitor import MakeScorer, MonitorConfig, ScoringContext, share
from seerlike.eval.extract import Sample, decode_view, feature_fn, to_batch
from seerlike.eval.knn import knn_eval

log = logging.getLogger(__name__)

READINGS_PLANNED = 4
"""With a time budget the split is cut so that this many readings (first, last, two between) fit in
max_fraction of it."""
MIN_PER_CLASS = 5
"""Fewest images per class the budget may cut the split to."""
PROBE_IMAGES = 16
"""Images decoded and embedded (after a 2-image warm-up) to estimate a reading's cost."""


# ---------------------------------------------------------------- the labeled split, decoded once


@dataclass
class Split:
    """This rank's slice of a labeled split, decoded; the labels of the whole split."""

    images: np.ndarray
    """uint8 ``(per_rank, size, size, 3)`` centre views of this rank's slice, zero-padded."""
    ok: np.ndarray
    """bool ``(per_rank,)``: the row is a real, decodable image."""
    labels: list[str]
    """Class name of every selected image of the split, in order (all ranks)."""


def labeled_files(path: str, what: str):
    """The split's files and labels (``seerlike.data.sources.FileSource``), or a ConfigError naming ``what``."""
    from seerlike.data.sources import FileSource, resolve

    try:
        src = resolve(path)
    except (ConfigError, OSError) as e:
        raise ConfigError(f"{what} {path}: {e}") from None
    if not isinstance(src, FileSource) or not len(src) or any(lb is None for lb in src.labels):
        raise ConfigError(f"{what} {path}: expected labeled images, a path,label CSV or a class-folder tree")
    return src


def first_per_class(labels: list, cap: int) -> list[int]:
    """Indices of the first ``cap`` items of every class, in order (all when ``cap`` is 0)."""
    seen: Counter = Counter()
    keep = []
    for i, lb in enumerate(labels):
        if cap and seen[lb] >= cap:
            continue
        seen[lb] += 1
        keep.append(i)
    return keep


def rank_slice(n: int, rank: int, world: int) -> tuple[range, int]:
    """Rank ``rank``'s contiguous slice of ``n`` rows and the slice length every rank pads to."""
    per = -(-n // world)
    return range(min(rank * per, n), min((rank + 1) * per, n)), per


def per_class_within(label_lists: list[list], cap: int, images: float) -> int:
    """The largest per-class cap (<= ``cap``; 0 = none) whose subsets of all lists hold at most ``images`` rows.

    Never below ``MIN_PER_CLASS``: a smaller memory bank says little (the share may then exceed its cap).
    """
    counts = [list(Counter(labels).values()) for labels in label_lists]
    most = max(max(c) for c in counts)
    hi = min(cap, most) if cap else most
    total = lambda c: sum(min(n, c) for cs in counts for n in cs)  # noqa: E731
    lo = min(MIN_PER_CLASS, hi)
    while lo < hi:  # the largest c in [lo, hi] with total(c) <= images (total grows with c)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(mid) <= images else (lo, mid - 1)
    return lo


def decode_rows(src, rows: list[int], size: int, resize: int, out: np.ndarray, ok: np.ndarray) -> None:
    """Centre views of ``src``'s ``rows`` into ``out`` / ``ok`` (undecodable images are logged and stay False)."""
    from seerlike.data.shards import raw_file_stream

    with ThreadPoolExecutor(2) as pool:
        samples = (Sample(rec.key, rec.data, None, rec.error) for rec in raw_file_stream(src, rows, 0))
        for j, view in enumerate(pool.map(lambda s: decode_view(s, size, resize), samples)):
            if view is not None:
                out[j], ok[j] = view, True


def load_split(src, per_class: int, cfg: MonitorConfig, rank: int, world: int) -> Split:
    """Keep ``per_class`` images per class of ``src`` and decode this rank's slice."""
    chosen = first_per_class(src.labels, per_class)
    mine, per = rank_slice(len(chosen), rank, world)
    images = np.zeros((per, cfg.image_size, cfg.image_size, 3), np.uint8)
    ok = np.zeros(per, bool)
    decode_rows(src, [chosen[i] for i in mine], cfg.image_size, cfg.resize_side, images, ok)
    return Split(images, ok, [src.classes[src.labels[i]] for i in chosen])


# ---------------------------------------------------------------- the backbone, borrowed for inference


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def inference_mode(backbone: nn.Module, root: nn.Module, world: int):
    """``backbone`` in eval mode without gradients, with rank 0's BatchNorm statistics on every rank.

    Every module gets its own training flag back and every rank its own buffers afterwards;
    an FSDP2 ``root`` is unsharded for the duration (its blocks gather their own parameters).
    """
    modes = [(m, m.training) for m in backbone.modules()]
    bufs = [b for b in backbone.buffers() if b.is_floating_point() and not hasattr(b, "to_local")]
    own = [b.detach().clone() for b in bufs] if world > 1 else []
    fsdp = world > 1 and _is_fsdp(root)
    try:
        with torch.no_grad():
            for dtype in dict.fromkeys(b.dtype for b in own):  # one broadcast per dtype, same order on every rank
                group = [b for b in bufs if b.dtype == dtype]
                flat = torch.cat([b.reshape(-1) for b in group])
                dist.broadcast(flat, 0)
                offset = 0
                for b in group:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
            backbone.eval()
            if fsdp:
                # FSDP2 takes the first module run as its root; before the first training step that
                # would be a block of ours, so make the method the root first (torch is pinned: the
                # private call is stable; the root's forward does the same)
                root._get_fsdp_state()._lazy_init()
                root.unshard()
            yield
    finally:
        if fsdp:
            root.reshard()
        with torch.no_grad():
            for b, saved in zip(bufs, own):
                b.copy_(saved)
        for m, training in modes:
            m.training = training



# ---------------------------------------------------------------- the scorer


class KNNScorer:
    """kNN top-1/top-5 of the backbone on a labeled split decoded once; every rank calls it at the same step."""

    name = "knn"

    def __init__(self, cfg: MonitorConfig, context: ScoringContext):
        self.clock = context.clock
        t0 = self.clock()
        self.cfg, self.backbone, self.root, self.device = cfg, context.backbone, context.root, context.device
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.autocast_dtype = context.autocast_dtype
        self.channels_last = context.channels_last or self.device.type == "cuda"
        self.fn = feature_fn(Loaded(self.backbone, "", "training"), cfg.layer)  # the features `seerlike eval` takes
        bank_src, query_src = labeled_files(cfg.train, "eval.train"), labeled_files(cfg.val, "eval.val")
        self.per_class = cfg.max_per_class
        if context.run_s > 0 and cfg.max_fraction > 0:
            self.per_class = self._per_class_for_budget(bank_src, query_src, context.run_s)
        self.bank = load_split(bank_src, self.per_class, cfg, self.rank, self.world)
        self.queries = load_split(query_src, self.per_class, cfg, self.rank, self.world)
        self.classes = sorted(set(self.bank.labels))
        unknown = sorted(set(self.queries.labels) - set(self.classes))
        if unknown:
            raise ConfigError(f"eval.val {cfg.val} has classes absent from eval.train {cfg.train}: {unknown[:5]}")
        self.bank_ok, self.queries_ok = self._whole_mask(self.bank), self._whole_mask(self.queries)
        if not (self.bank_ok.any() and self.queries_ok.any()):
            raise ConfigError(f"eval.train {cfg.train} or eval.val {cfg.val}: no image could be decoded")
        log.info("kNN monitor: %d memory-bank and %d query images (at most %s per class), %d px, set up in %.1f s",
                 len(self.bank.labels), len(self.queries.labels), self.per_class or "all", cfg.image_size,
                 self.clock() - t0)

    def _per_class_for_budget(self, bank_src, query_src, run_s: float) -> int:
        """Images per class such that READINGS_PLANNED readings and the decoding fit in max_fraction of ``run_s``.

        The cost per image is measured on a few images of the memory bank (every rank embeds the same
        ones: a collective under FSDP2), rank 0's figures decide for all.
        """
        rows = first_per_class(bank_src.labels, self.cfg.max_per_class)[:PROBE_IMAGES + 2]
        if len(rows) < 3:  # too few images to be worth cutting (the same on every rank)
            return self.cfg.max_per_class
        views = np.zeros((len(rows), self.cfg.image_size, self.cfg.image_size, 3), np.uint8)
        t = self.clock()
        decode_rows(bank_src, rows, self.cfg.image_size, self.cfg.resize_side, views, np.zeros(len(rows), bool))
        decode_s = (self.clock() - t) / len(rows)
        with inference_mode(self.backbone, self.root, self.world):
            self._embed(views[:2], batch_size=2)  # allocator and kernel warm-up
            t = self.clock()
            self._embed(views[2:], batch_size=len(views)).cpu()  # .cpu(): wait for the device
            forward_s = (self.clock() - t) / max(len(views) - 2, 1)
        decode_s, forward_s = share((decode_s, forward_s), self.device)
        images = self.world * self.cfg.max_fraction * run_s / max(READINGS_PLANNED * forward_s + decode_s, 1e-9)
        per_class = per_class_within([bank_src.labels, query_src.labels], self.cfg.max_per_class, images)
        log.info("kNN monitor: %.1f ms per image to embed, %.1f ms to decode: %d per class let %d readings fit "
                 "in %.0f%% of the %.0f s budget", 1e3 * forward_s, 1e3 * decode_s, per_class, READINGS_PLANNED,
                 100 * self.cfg.max_fraction, run_s)
        return per_class

    def __call__(self) -> dict[str, float]:
        """kNN top-1/top-5 now (a collective: every rank calls it); the numbers are rank 0's, 0 elsewhere."""
        with inference_mode(self.backbone, self.root, self.world):
            bank_x = self._gather(self._embed(self.bank.images), self.bank)
            query_x = self._gather(self._embed(self.queries.images), self.queries)
        top1 = top5 = 0.0
        if self.rank == 0:
            index = {c: i for i, c in enumerate(self.classes)}
            ty = torch.tensor([index[c] for c, ok in zip(self.bank.labels, self.bank_ok) if ok])
            vy = torch.tensor([index[c] for c, ok in zip(self.queries.labels, self.queries_ok) if ok])
            scores, _ = knn_eval(bank_x[self.bank_ok], ty, query_x[self.queries_ok], vy, len(self.classes),
                                 self.cfg.knn)
            top1, top5 = scores["top1"], scores["top5"]
        return {"knn_top1": top1, "knn_top5": top5, "knn_images": len(self.bank.labels) + len(self.queries.labels)}

    def _embed(self, images: np.ndarray, batch_size: int | None = None) -> Tensor:
        """Features of this rank's padded slice: the same number of batches on every rank."""
        out = []
        batch_size = batch_size or self.cfg.batch_size
        for i in range(0, len(images), batch_size):
            x = to_batch(images[i:i + batch_size]).to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                  else contextlib.nullcontext()):
                out.append(self.fn(x).float())
        return torch.cat(out)

    def _gather(self, local: Tensor, split: Split) -> Tensor:
        """Every rank's features in split order (the padding rows dropped), on the CPU."""
        if self.world > 1:
            parts = [torch.empty_like(local) for _ in range(self.world)]
            dist.all_gather(parts, local.contiguous())
            local = torch.cat(parts)
        return local[:len(split.labels)].cpu()

    def _whole_mask(self, split: Split) -> Tensor:
        """Which rows of the whole split decoded (every rank's slice; a collective, once at set-up)."""
        ok = torch.from_numpy(split.ok.astype(np.uint8)).to(self.device)
        if self.world > 1:
            parts = [torch.empty_like(ok) for _ in range(self.world)]
            dist.all_gather(parts, ok)
            ok = torch.cat(parts)
        return ok[:len(split.labels)].bool().cpu()


def knn_scorer(cfg: MonitorConfig) -> MakeScorer | None:
    """The scorer of the ``eval.*`` section for seerlike.engine.loop.train (None when it names no labeled split)."""
    return functools.partial(KNNScorer, cfg) if cfg.enabled else None
