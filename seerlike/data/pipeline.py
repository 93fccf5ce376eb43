"""The data path of training: ``build_train_data``.

A training batch is made in two places. A DataLoader worker reads its deterministic
record stream (``shards.py``), decodes at reduced size and cuts the uint8 crops of every
view (``augment.crop_sample``); the main process moves the uint8 views to the training
device and applies the photometric ops to the whole batch there (``augment.Photometric``).

Exact resume: every worker's stream is a pure function of (seed, epoch, rank, worker),
and the DataLoader returns batches round-robin over workers in a fixed order, so the
position of a rank is the number of records and batches each worker has delivered to the
trainer. ``TrainData.state_dict()`` returns it (JSON); after ``load_state_dict`` the
workers fast-forward (no decoding) and the rest of the epoch is bitwise the same as in an
uninterrupted run, views included.

Bad samples. A sample that cannot be used (undecodable, unreadable, in a shard that failed
after its retries, without a pseudo-label) is skipped and counted; skips are logged as one
count per ``SKIP_LOG_INTERVAL_S`` per worker, never a line each. A worker that cannot make
progress stops the run with ``NoUsableData`` (it reaches the training process through the
DataLoader): after ``max_consecutive_failures`` undecodable or unreadable samples in a row,
or after a whole pass over its files / shards without one usable sample.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from seerlike.data import augment as aug
from seerlike.data import shards as sh
from seerlike.data.sources import FileSource, ShardSource, resolve

log = logging.getLogger(__name__)

STATE_VERSION = 1

SKIP_LOG_INTERVAL_S = 10.0
"""Skipped samples are logged as one count per this many seconds per reader, not one line each."""


@dataclass(kw_only=True)
class DataConfig:
    """Where the images come from, how they are read, and the views made of them."""

    source: str = ""
    """Image folder, `path,label` CSV, tar brace pattern (local or s3://), or ingest dataset folder / s3:// prefix."""
    batch_size: int = 32
    """Images per rank per step."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: read in the training process)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    augment: aug.AugmentConfig = field(default_factory=aug.swav_multicrop)
    """The views of every image (see augment.swav_multicrop / augment.byol_views)."""
    shuffle_buffer: int = 1000
    """Shards: records shuffled together in one block (the samples re-read on resume is at most this)."""
    resampled: bool = False
    """Shards drawn with replacement (infinite, step-based); exact mode otherwise (every sample once per epoch)."""
    epoch_steps: int = 0
    """Batches per rank per epoch; 0 means one full pass (exact mode); required with resampled."""
    on_shard_error: Literal["skip", "fatal"] = "skip"
    """A shard still failing after the retries is logged and skipped, or stops the job."""
    max_consecutive_failures: int = 500
    """Stop the run after this many undecodable / unreadable samples in a row (a whole pass with no usable sample always stops it)."""
    s3_endpoint_url: str | None = None
    """S3 endpoint (None: AWS_ENDPOINT_URL or AWS itself)."""
    s3_retries: int = 8
    """Retries of one shard read (connection resets, timeouts, 5xx, throttling), each resuming at the byte offset."""
    s3_backoff_s: float = 0.2
    """First retry delay in seconds; doubles per retry (with jitter), capped at 10 s."""
    worker_start: Literal["fork", "forkserver", "spawn"] = "fork"
    """How DataLoader workers start: fork is instant; spawn re-imports everything per worker and epoch."""
    labels: str = ""
    """Pseudo-labels joined to the samples by key (a `seerlike cluster` output dir or labels parquet; ClusterFit); samples without one are skipped."""

    # Keys older configs hold that this section no longer has -> what to use instead. A saved
    # config.yaml holding one still loads (the key is dropped with a warning); an override
    # that sets one is an error naming the replacement (seerlike.config.removed_keys).
    REMOVED_KEYS = {
        "eval_size": "the centre crop of extraction and evaluation is `seerlike extract --image-size` "
                     "(and `seerlike eval knn/linear --image-size`)",
        "eval_resize": "the resize before that crop is `seerlike extract --resize` (and `seerlike eval knn/linear --resize`)",
    }

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0 or self.prefetch_factor < 1:
            raise ValueError(f"num_workers must be >= 0 and prefetch_factor >= 1, got {self.num_workers}, {self.prefetch_factor}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1 (1 disables shuffling), got {self.shuffle_buffer}")
        if self.max_consecutive_failures < 1:
            raise ValueError(f"max_consecutive_failures must be >= 1, got {self.max_consecutive_failures}")
        if self.epoch_steps < 0:
            raise ValueError(f"epoch_steps must be >= 0, got {self.epoch_steps}")
        if self.resampled and self.epoch_steps == 0:
            raise ValueError("resampled=true needs epoch_steps > 0 (batches per rank per epoch)")


@dataclass
class Batch:
    """One step's data on the training device."""

    views: list[torch.Tensor]
    """Float32 (B, 3, H, W), normalised, in AugmentConfig view order."""
    keys: list[str]
    """Sample keys, in batch order."""
    labels: torch.Tensor | None
    """Class indices (int64) when the source has labels for every sample, else None."""
    indices: torch.Tensor | None = None
    """Training batches: each sample's global index (int64) in [0, num_samples), its position in the
    source's listing (``FileSource`` / ``ShardSource``): the same in every epoch, run and world size."""


# ---------------------------------------------------------------- bad samples


class NoUsableData(RuntimeError):
    """A data worker cannot make progress: the samples it reads cannot be used."""


class SkipLog:
    """The skipped samples of one reader, logged as a count per interval instead of a line each.

    The first skip is logged at once; later ones are counted and logged (count and last
    error) at most once per ``interval_s``, and by ``flush``. A corpus of corrupt files
    therefore costs a few lines of log, not one per sample.
    """

    def __init__(self, who: str, *, interval_s: float = SKIP_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.who, self.interval_s, self.clock = who, interval_s, clock
        self.total = 0
        self.first: str | None = None
        """``key: error`` of the first skip."""
        self._pending, self._last, self._since = 0, "", 0.0

    def add(self, key: str, error: str) -> None:
        self.total += 1
        note = f"{key}: {error}"
        if self.first is None:
            self.first, self._since = note, self.clock()
            log.warning("%s: skipping sample %s (further skips are counted and logged every %.0f s)",
                        self.who, note, self.interval_s)
            return
        self._pending, self._last = self._pending + 1, note
        if self.clock() - self._since >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        now = self.clock()
        log.warning("%s: skipped %d samples in the last %.0f s (%d in all); last error: %s",
                    self.who, self._pending, now - self._since, self.total, self._last)
        self._pending, self._since = 0, now


def _no_progress(cfg: DataConfig, who: str, skips: SkipLog, in_a_row: int, *, whole_pass: bool,
                 failed_shards: set[str]) -> NoUsableData:
    if whole_pass:
        why = f"a whole pass over its {in_a_row} samples"
    else:
        why = f"data.max_consecutive_failures={cfg.max_consecutive_failures} undecodable or unreadable in a row"
    if failed_shards:
        why += f"; {len(failed_shards)} of its shards could not be read"
    fix = ("restore the unreadable shards or ingest the data again" if failed_shards
           else "remove or replace the undecodable images")
    if not whole_pass:
        fix += ", or raise data.max_consecutive_failures if such runs are expected"
    if cfg.labels:
        fix += f"; samples without a pseudo-label in data.labels ({cfg.labels}) are skipped too"
    return NoUsableData(f"data source {cfg.source!r}: none of the last {in_a_row} samples read by {who} could be "
                        f"used ({why}; {skips.total} skipped in all); first error: {skips.first}; {fix}")


# ---------------------------------------------------------------- worker side


def _reader_options(cfg: DataConfig) -> sh.ShardReaderOptions:
    return sh.ShardReaderOptions(endpoint_url=cfg.s3_endpoint_url, retries=cfg.s3_retries,
                                 backoff_s=cfg.s3_backoff_s, on_shard_error=cfg.on_shard_error)


def _stream_length(source, plan: sh.WorkerPlan) -> int:
    """Records in one pass over the worker's files / shards."""
    if isinstance(source, FileSource):
        return len(plan.files)
    return sum(source.counts[s] for s in plan.shards)


def _records_from(source, plan: sh.WorkerPlan, start: int, cfg: DataConfig, seed_parts: tuple) -> Iterator[sh.Record]:
    """The worker's stream from emitted record ``start``; wraps around (logged) when exhausted."""
    length = _stream_length(source, plan)
    if isinstance(source, FileSource):
        def once(p):
            return sh.raw_file_stream(source, plan.files, p)
    else:
        block = cfg.shuffle_buffer

        def once(p):
            return sh.block_shuffled(lambda q: sh.raw_shard_stream(source, plan.shards, q, _reader_options(cfg)),
                                     p, block, seed_parts)
    if length == 0:
        raise RuntimeError(f"worker {seed_parts} was assigned no samples")
    cycle, offset = divmod(start, length)
    while True:
        yield from once(offset)
        cycle, offset = cycle + 1, 0
        if cycle & (cycle - 1) == 0:  # passes 2, 3, 5, 9, ...: a slow worker does not flood the log
            log.warning("worker %s ran out of usable samples before its quota (corrupt samples or failed shards); "
                        "re-reading its stream (pass %d)", seed_parts, cycle + 1)


def _read_position(source, plan: sh.WorkerPlan, records: int, block: int) -> dict:
    """Human-readable position: shards done, the shard in progress and the offset read in it."""
    if isinstance(source, FileSource):
        return {"files_done": min(records, len(plan.files))}
    return sh.shard_position(source, plan, records, block)


class _TrainStream(IterableDataset):
    """What the DataLoader workers of one rank run for one epoch."""

    def __init__(self, cfg: DataConfig, source, plans: list[sh.WorkerPlan], positions: list[dict],
                 *, seed: int, epoch: int, rank: int, first_worker: int, label_map: dict[str, int] | None = None):
        self.cfg, self.source, self.plans, self.positions = cfg, source, plans, positions
        self.seed, self.epoch, self.rank, self.first_worker = seed, epoch, rank, first_worker
        self.label_map = label_map

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        W = len(self.plans)
        # Physical worker 0 is asked first; after a resume that must be the worker that was next.
        worker = (self.first_worker + physical) % W
        plan = self.plans[worker]
        records = self.positions[worker]["records"]
        batches = self.positions[worker]["batches"]
        cfg, B = self.cfg, self.cfg.batch_size
        stream = _records_from(self.source, plan, records, cfg, (self.seed, self.epoch, self.rank, worker))
        labelled = self.label_map is not None or (
            isinstance(self.source, FileSource) and all(l is not None for l in self.source.labels))
        who = f"rank {self.rank} worker {worker}"
        skips = SkipLog(who)
        pass_length = _stream_length(self.source, plan)
        # since_good: any unusable record (a whole pass of them stops the worker); bad_in_a_row:
        # undecodable / unreadable samples only, as a failed shard or a sample without a
        # pseudo-label says nothing about the samples after it
        since_good, bad_in_a_row, failed_shards = 0, 0, set()
        while batches < plan.quota:
            keys, labels, indices, crops, corrupt = [], [], [], [], []
            while len(keys) < B:
                rec = next(stream)
                records += 1
                unlabelled = False
                if rec.error is None and self.label_map is not None:
                    rec = rec._replace(label=self.label_map.get(rec.key))
                    if rec.label is None:
                        rec, unlabelled = rec._replace(error="no pseudo-label for this key in data.labels"), True
                if rec.error is None:
                    try:
                        views = aug.crop_sample(rec.data, rec.key, cfg.augment, self.seed, self.epoch)
                    except aug.CorruptSample as e:
                        rec = rec._replace(error=str(e))
                if rec.error is not None:
                    skips.add(rec.key, rec.error)
                    corrupt.append(rec.key)
                    since_good += 1
                    if rec.failed_shard is not None:
                        failed_shards.add(rec.failed_shard)
                    elif not unlabelled:
                        bad_in_a_row += 1
                    if since_good >= pass_length or bad_in_a_row >= cfg.max_consecutive_failures:
                        raise _no_progress(cfg, who, skips, since_good,
                                           whole_pass=since_good >= pass_length, failed_shards=failed_shards)
                    continue
                since_good, bad_in_a_row = 0, 0
                keys.append(rec.key)
                labels.append(rec.label)
                indices.append(rec.index)
                crops.append(views)
            batches += 1
            if batches == plan.quota:  # the worker's last batch of the epoch: report the skips not yet logged
                skips.flush()
            views = aug.stack_views(crops, cfg.augment)
            yield {
                "views": views,
                "keys": keys,
                "labels": torch.tensor(labels, dtype=torch.long) if labelled else None,
                "indices": torch.tensor(indices, dtype=torch.long),
                "worker": worker,
                "position": {"records": records, "batches": batches,
                             **_read_position(self.source, plan, records, cfg.shuffle_buffer)},
                "corrupt": corrupt,
            }


# ---------------------------------------------------------------- main side


class TrainData:
    """Iterating yields ``Batch``es forever, epoch after epoch; ``state_dict`` is the exact position."""

    def __init__(self, cfg: DataConfig, source: FileSource | ShardSource, *, rank: int, world_size: int,
                 seed: int, device: torch.device | str = "cpu"):
        self.cfg, self.source = cfg, source
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device(device)
        self.num_workers = max(1, cfg.num_workers)
        self.photometric = aug.Photometric(cfg.augment)
        self.epoch = 0
        self.step_in_epoch = 0
        self.next_worker = 0
        self.corrupt = 0
        self.label_map: dict[str, int] | None = None
        self._plan_cache: tuple[int, sh.EpochPlan] | None = None
        self._positions = self._fresh_positions()
        self.steps_per_epoch  # noqa: B018 - plan epoch 0 now so a bad setup fails at build time

    # -- plan and position

    def _plan(self, epoch: int) -> sh.EpochPlan:
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            plan = sh.plan_epoch(self.source, epoch=epoch, seed=self.seed, world_size=self.world_size,
                                 num_workers=self.num_workers, batch_size=self.cfg.batch_size,
                                 resampled=self.cfg.resampled, epoch_steps=self.cfg.epoch_steps)
            self._plan_cache = (epoch, plan)
        return self._plan_cache[1]

    @property
    def steps_per_epoch(self) -> int:
        return self._plan(self.epoch).steps

    @property
    def num_samples(self) -> int:
        return len(self.source)

    def _fresh_positions(self) -> list[dict]:
        return [{"records": 0, "batches": 0} for _ in range(self.num_workers)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.cfg.batch_size,
            "num_samples": self.num_samples,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "next_worker": self.next_worker,
            "workers": [dict(p) for p in self._positions],
            "corrupt": self.corrupt,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r} is not {STATE_VERSION}")
        same = {k: (state.get(k), v) for k, v in (("seed", self.seed), ("world_size", self.world_size),
                                                    ("num_workers", self.num_workers),
                                                    ("batch_size", self.cfg.batch_size),
                                                    ("num_samples", self.num_samples))}
        changed = {k: v for k, v in same.items() if v[0] != v[1]}
        self.corrupt = int(state.get("corrupt", 0))
        if changed:
            # A different split cannot continue the same epoch exactly; start the next one clean.
            nxt = state["epoch"] + (1 if state["step_in_epoch"] else 0)
            log.warning("data position saved with %s; it cannot be continued exactly, starting epoch %d",
                        ", ".join(f"{k}={a} (now {b})" for k, (a, b) in changed.items()), nxt)
            self.epoch, self.step_in_epoch, self.next_worker = nxt, 0, 0
            self._positions = self._fresh_positions()
            return
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.next_worker = int(state["next_worker"])
        self._positions = [dict(p) for p in state["workers"]]

    # -- iteration

    def _loader(self, stream: _TrainStream):
        if self.cfg.num_workers == 0:
            return iter(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                               prefetch_factor=self.cfg.prefetch_factor, in_order=True,
                               pin_memory=self.device.type == "cuda", persistent_workers=False,
                               multiprocessing_context=self.cfg.worker_start))

    def __iter__(self) -> Iterator[Batch]:
        while True:
            plan = self._plan(self.epoch)
            if self.step_in_epoch < plan.steps:
                stream = _TrainStream(self.cfg, self.source, plan.workers[self.rank],
                                      [dict(p) for p in self._positions], seed=self.seed, epoch=self.epoch,
                                      rank=self.rank, first_worker=self.next_worker, label_map=self.label_map)
                for item in self._loader(stream):
                    w = item["worker"]
                    self._positions[w] = item["position"]
                    self.next_worker = (w + 1) % self.num_workers
                    self.corrupt += len(item["corrupt"])
                    step = self.step_in_epoch
                    self.step_in_epoch += 1
                    views = [v.to(self.device, non_blocking=True) for v in item["views"]]
                    views = self.photometric(views, seed=self.seed, epoch=self.epoch, step=step, rank=self.rank)
                    labels = item["labels"].to(self.device) if item["labels"] is not None else None
                    yield Batch(views=views, keys=item["keys"], labels=labels,
                                indices=item["indices"].to(self.device, non_blocking=True))
                if self.step_in_epoch != plan.steps:
                    raise RuntimeError(f"rank {self.rank} epoch {self.epoch}: the workers made {self.step_in_epoch} "
                                       f"batches, the plan says {plan.steps}")
            self.epoch += 1
            self.step_in_epoch = 0
            self.next_worker = 0
            self._positions = self._fresh_positions()


def build_train_data(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                     device: torch.device | str = "cpu") -> TrainData:
    """The training data of one rank; every rank makes ``steps_per_epoch`` batches per epoch."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    source = resolve(cfg.source, cfg.s3_endpoint_url)
    data = TrainData(cfg, source, rank=rank, world_size=world_size, seed=seed, device=device)
    if cfg.labels:
        from seerlike.pseudo_labels import label_map

        data.label_map = label_map(cfg.labels)
    log.info("data: %s, %d samples, %d steps/epoch at batch %d x %d ranks, %d views", cfg.source,
             data.num_samples, data.steps_per_epoch, cfg.batch_size, world_size, cfg.augment.num_views)
    return data
