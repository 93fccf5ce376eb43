"""Online kNN monitor: kNN top-1 of the backbone being trained, every few steps or minutes.

Given a labeled split (``eval.train`` as the memory bank, ``eval.val`` as queries: a
``path,label`` CSV or a class-folder tree, what `seerlike eval knn` takes), the loop asks
:meth:`KNNMonitor.after_step` after every step; now and then all ranks stop, embed the split
with ``method.backbone`` and score it with the same weighted kNN as `seerlike eval knn`
(seerlike.eval.knn; k 20, cosine, T 0.07). The row goes to metrics.jsonl and TensorBoard
(``monitor/knn_top1``). docs/engine.md, "Watching it learn", has the user's side; the design:

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
- **When**: ranks must agree without a collective on every step. All of them know the next
  "sync step"; there rank 0 decides (a cadence of ``every_steps`` / ``every_minutes`` of
  training, under the ``max_fraction`` cost cap) and broadcasts whether to evaluate now and the
  next sync step, estimated from the measured step time. Always at the start of a fresh run
  and after the last step (``at_start`` / ``at_end``).
- **Cost**: the split is listed, capped at ``max_per_class`` images per class and decoded once
  (each rank its slice, kept as uint8); an evaluation is then forward passes and one matrix
  product. The wall seconds spent (set-up included) are logged as ``monitor_s`` and
  ``monitor_frac``. ``max_fraction`` (5 %) holds the share: a reading between the first and the
  last waits until it and the last fit under it; with a time budget the split is also cut (from a
  timed probe of a few images) so that READINGS_PLANNED readings and the decoding fit in it.
- **Time budget**: monitor time does not count against ``loop.time_budget_s``: the loop pauses
  the budget's clock while the monitor runs, so switching the monitor on changes neither the
  calibrated step time nor the number of steps (the run trains exactly as without it); its cost
  comes on top of the budget.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from seerlike.config import ConfigError
from seerlike.eval.knn import KNNConfig, knn_eval

log = logging.getLogger(__name__)

MONITOR_LAYERS = ("pool", "res4", "res5")
READINGS_PLANNED = 4
"""With a time budget the split is cut so that this many readings (first, last, two between) fit in
max_fraction of it."""
MIN_PER_CLASS = 5
"""Fewest images per class the budget may cut the split to."""
PROBE_IMAGES = 16
"""Images decoded and embedded (after a 2-image warm-up) to estimate a reading's cost."""


@dataclass(kw_only=True)
class MonitorConfig:
    train: str = ""
    """Labeled kNN memory bank (a path,label CSV or a class-folder tree); with eval.val it turns the monitor on."""
    val: str = ""
    """Labeled kNN queries (the same forms as eval.train)."""
    every_steps: int = 0
    """Evaluate every this many steps (0: not by steps)."""
    every_minutes: float = 0.0
    """Evaluate every this many minutes of training (0: not by time); with neither, as often as max_fraction allows."""
    max_fraction: float = 0.05
    """Cap on the monitor's share of the run's wall time: a due evaluation waits until it fits (0: no cap)."""
    at_start: bool = True
    """Evaluate before the first step of a fresh run (the curve's starting point)."""
    at_end: bool = True
    """Evaluate after the last step (the final point)."""
    max_per_class: int = 100
    """Images per class kept from each split, the first in listing order (0: all)."""
    image_size: int = 224
    """Centre-crop side fed to the backbone (`seerlike eval --image-size`)."""
    resize: int | None = None
    """Shorter side before the crop; None = image_size / 0.875 (`seerlike eval --resize`)."""
    layer: str = "pool"
    """Feature: pool (the trunk's pooled output), res4 or res5 (average-pooled maps)."""
    batch_size: int = 256
    """Images per forward on each rank."""
    knn: KNNConfig = field(default_factory=KNNConfig)
    """The weighted kNN of `seerlike eval knn` (k 20, T 0.07)."""

    def __post_init__(self) -> None:
        if bool(self.train) != bool(self.val):
            raise ValueError("eval.train and eval.val go together: give both (the kNN memory bank and its queries) "
                             "or neither")
        if self.every_steps < 0 or self.every_minutes < 0 or self.max_per_class < 0:
            raise ValueError("eval.every_steps, eval.every_minutes and eval.max_per_class must be >= 0")
        if not 0.0 <= self.max_fraction < 1.0:
            raise ValueError(f"eval.max_fraction must be in [0, 1), got {self.max_fraction}")
        if self.enabled and not (self.every_steps or self.every_minutes or self.max_fraction):
            raise ValueError("eval.max_fraction=0 needs eval.every_steps or eval.every_minutes (else every step)")
        if self.layer not in MONITOR_LAYERS:
            raise ValueError(f"eval.layer must be one of {', '.join(MONITOR_LAYERS)}, got {self.layer!r}")
        if self.image_size < 8 or self.batch_size < 1:
            raise ValueError("eval.image_size >= 8 and eval.batch_size >= 1 are required")

    @property
    def enabled(self) -> bool:
        return bool(self.train and self.val)

    @property
    def resize_side(self) -> int:
        return self.resize or round(self.image_size / 0.875)


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
    from seerlike.eval.extract import Sample, decode_view

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


# ---------------------------------------------------------------- when (rank 0 decides)


@dataclass
class Schedule:
    """When the next evaluation is due, from rank 0's clock: a cadence, under a cap on the monitor's share."""

    every_steps: int
    every_minutes: float
    max_fraction: float
    start_step: int
    reserve_end: bool = True
    """Keep room under the cap for the reading after the last step."""
    last_step: int = 0
    """Step of the last evaluation."""
    last_train_s: float = 0.0
    """Training seconds (monitor time left out) at the last evaluation."""
    last_cost: float = 0.0
    """Wall seconds of the last evaluation: the next one is assumed to cost as much."""

    def wait_steps(self, step: int, train_s: float, spent_s: float) -> float:
        """Steps until an evaluation is due and fits the cap (<= 0: now; 1 while no step time is known).

        ``train_s``: training seconds since the monitor started; ``spent_s``: the monitor's seconds.
        """
        done = step - self.start_step
        step_s = train_s / done if done > 0 else 0.0
        if step_s <= 0:
            return 1.0
        cadence = []
        if self.every_steps:
            cadence.append(self.last_step + self.every_steps - step)
        if self.every_minutes:
            cadence.append((self.last_train_s + 60 * self.every_minutes - train_s) / step_s)
        wait = min(cadence) if cadence else 0.0  # no cadence: as often as the cap allows
        f = self.max_fraction
        if f > 0:  # after the next reading (and the last one) the monitor's share must be <= f
            need_train_s = (spent_s + self.last_cost * (2 if self.reserve_end else 1)) * (1 - f) / f
            wait = max(wait, (need_train_s - train_s) / step_s)
        return wait

    def next_step(self, step: int, train_s: float, spent_s: float) -> int:
        """The next step at which to ask again (later than ``step``)."""
        return step + max(1, math.ceil(self.wait_steps(step, train_s, spent_s)))

    def evaluated(self, step: int, train_s: float, cost: float) -> None:
        self.last_step, self.last_train_s, self.last_cost = step, train_s, cost


# ---------------------------------------------------------------- the monitor


class KNNMonitor:
    """Evaluates kNN top-1 of ``backbone`` on a labeled split; every rank calls the same methods at the same steps."""

    def __init__(self, cfg: MonitorConfig, backbone: nn.Module, *, root: nn.Module, metrics, device: torch.device,
                 start_step: int, run_s: float = 0.0, autocast_dtype: torch.dtype | None = None,
                 channels_last: bool = False, clock=time.perf_counter):
        from seerlike.checkpoints import Loaded
        from seerlike.eval.extract import feature_fn

        self.cfg, self.backbone, self.root, self.metrics, self.device = cfg, backbone, root, metrics, device
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last or device.type == "cuda"
        self.fn = feature_fn(Loaded(backbone, "", "training"), cfg.layer)  # the features `seerlike eval` takes
        self.clock = clock
        self.t0 = clock()
        bank_src, query_src = labeled_files(cfg.train, "eval.train"), labeled_files(cfg.val, "eval.val")
        self.per_class = cfg.max_per_class
        if run_s > 0 and cfg.max_fraction > 0:
            self.per_class = self._per_class_for_budget(bank_src, query_src, run_s)
        self.bank = load_split(bank_src, self.per_class, cfg, self.rank, self.world)
        self.queries = load_split(query_src, self.per_class, cfg, self.rank, self.world)
        self.classes = sorted(set(self.bank.labels))
        unknown = sorted(set(self.queries.labels) - set(self.classes))
        if unknown:
            raise ConfigError(f"eval.val {cfg.val} has classes absent from eval.train {cfg.train}: {unknown[:5]}")
        self.bank_ok, self.queries_ok = self._whole_mask(self.bank), self._whole_mask(self.queries)
        if not (self.bank_ok.any() and self.queries_ok.any()):
            raise ConfigError(f"eval.train {cfg.train} or eval.val {cfg.val}: no image could be decoded")
        # wall seconds this rank spent in the monitor, set-up included (rank 0's drive the schedule)
        self.spent_s = clock() - self.t0
        self.schedule = Schedule(every_steps=cfg.every_steps, every_minutes=cfg.every_minutes,
                                 max_fraction=cfg.max_fraction, start_step=start_step, last_step=start_step,
                                 reserve_end=cfg.at_end)
        self.next_sync = start_step + 1  # known to every rank: where rank 0 is asked next
        log.info("kNN monitor: %d memory-bank and %d query images (at most %s per class), %d px, set up in %.1f s",
                 len(self.bank.labels), len(self.queries.labels), self.per_class or "all", cfg.image_size, self.spent_s)

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
        decode_s, forward_s = self._share((decode_s, forward_s))
        images = self.world * self.cfg.max_fraction * run_s / max(READINGS_PLANNED * forward_s + decode_s, 1e-9)
        per_class = per_class_within([bank_src.labels, query_src.labels], self.cfg.max_per_class, images)
        log.info("kNN monitor: %.1f ms per image to embed, %.1f ms to decode: %d per class let %d readings fit "
                 "in %.0f%% of the %.0f s budget", 1e3 * forward_s, 1e3 * decode_s, per_class, READINGS_PLANNED,
                 100 * self.cfg.max_fraction, run_s)
        return per_class

    # ------------------------------------------------------------ hooks the loop calls

    def start(self, step: int, budget=None) -> None:
        """Before the first step: the curve's starting point (a fresh run only)."""
        if self.cfg.at_start and step == 0:
            with _paused(budget):
                self.evaluate(step)

    def after_step(self, step: int, *, final: bool, budget=None) -> None:
        """After step ``step`` (all ranks, unless the run is stopping): evaluate when due."""
        if final:
            if self.cfg.at_end:
                with _paused(budget):
                    self.evaluate(step)
            return
        if step != self.next_sync:
            return
        with _paused(budget):
            t = self.clock()
            if self.rank == 0:
                wait = self.schedule.wait_steps(step, self.train_s(), self.spent_s)
                decision = (1.0, 0.0) if wait <= 0 else (0.0, float(step + max(1, math.ceil(wait))))
            now, later = self._share(decision if self.rank == 0 else (0.0, 0.0))
            self.spent_s += self.clock() - t
            if now:
                self.evaluate(step)
            else:
                self.next_sync = int(later)

    # ------------------------------------------------------------ one evaluation

    def evaluate(self, step: int) -> dict[str, float]:
        """kNN top-1/top-5 now (a collective: every rank calls it); rank 0 logs the row."""
        t = self.clock()
        train_s = self.train_s()
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
        cost = self.clock() - t
        self.spent_s += cost
        self.schedule.evaluated(step, train_s, cost)
        nxt = self.schedule.next_step(step, self.train_s(), self.spent_s) if self.rank == 0 else 0
        top1, top5, nxt = self._share((top1, top5, nxt))
        self.next_sync = int(nxt)
        self.spent_s += self.clock() - t - cost
        row = {"knn_top1": top1, "knn_top5": top5, "knn_s": cost, "monitor_s": self.spent_s,
               "monitor_frac": self.fraction(), "elapsed_s": t - self.t0,
               "knn_images": len(self.bank.labels) + len(self.queries.labels)}
        self.metrics.log(step, row, group="monitor")
        log.info("step %d: kNN top-1 %.2f (%.1f s; monitor %.1f%% of the run so far)",
                 step, top1, cost, 100 * row["monitor_frac"])
        return row

    def train_s(self) -> float:
        """Seconds since the monitor started, its own left out."""
        return self.clock() - self.t0 - self.spent_s

    def fraction(self) -> float:
        """The monitor's share of the wall time since it started."""
        total = self.clock() - self.t0
        return self.spent_s / total if total > 0 else 0.0

    def _embed(self, images: np.ndarray, batch_size: int | None = None) -> Tensor:
        """Features of this rank's padded slice: the same number of batches on every rank."""
        from seerlike.eval.extract import to_batch

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

    def _share(self, values: tuple[float, ...]) -> tuple[float, ...]:
        """Rank 0's ``values`` on every rank."""
        if self.world == 1:
            return tuple(float(v) for v in values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(t, 0)
        return tuple(t.tolist())


def _paused(budget):
    """The time budget's clock stops while the monitor runs (module docstring, "Time budget")."""
    return budget.paused() if budget is not None else contextlib.nullcontext()


def build_monitor(cfg, method: nn.Module, *, metrics, device: torch.device, start_step: int,
                  budget=None) -> KNNMonitor | None:
    """The monitor of a TrainConfig, set up and at its starting point (None without ``eval.train``/``eval.val``)."""
    if not cfg.eval.enabled:
        return None
    mixed = (cfg.parallel.strategy == "fsdp" and cfg.parallel.mixed_precision_params
             and cfg.precision.torch_dtype != torch.float32)  # parameters gathered in the compute dtype
    with _paused(budget):
        monitor = KNNMonitor(cfg.eval, method.backbone, root=method, metrics=metrics, device=device,
                             start_step=start_step, run_s=cfg.loop.time_budget_s,
                             autocast_dtype=cfg.precision.torch_dtype if mixed else None,
                             channels_last=cfg.model.channels_last)
    monitor.start(start_step, budget)
    return monitor
