"""Deterministic record streams per (epoch, rank, worker), resumable at any record.

The plan of an epoch (``plan_epoch``) is a pure function of (seed, epoch, world size,
workers, batch size and the source's sample counts): an epoch-seeded permutation of the
shards (or of the files) split by rank and then by worker, and the number of batches
every worker makes (``quota``). Every rank makes the same number of steps per epoch.

A worker's stream is the records of its shards in order, shuffled in blocks of
``shuffle_buffer`` records with an RNG seeded by (seed, epoch, rank, worker, block). So a
position is one integer, the number of records emitted, and resuming at it reads only
the current block again: whole shards before it are skipped by their sample counts.

A shard always yields exactly the number of records its count says: a shard that fails
after the retries (``skip`` policy) or lacks members pads the rest with error records
(``Record.failed_shard`` names the shard), which the worker skips and counts like corrupt
images, so positions never drift.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from seerlike.config import ConfigError
from seerlike.data.augment import stable_seed
from seerlike.data.s3stream import ShardReadError, open_shard
from seerlike.data.sources import IMAGE_EXTS, FileSource, ShardSource, split_key

log = logging.getLogger(__name__)


class Record(NamedTuple):
    """One sample before decoding; ``error`` is set when it cannot be used."""

    key: str
    data: bytes | None
    label: int | None
    error: str | None = None
    failed_shard: str | None = None
    """The shard's URL when the record stands in for a sample of a shard that could not be read."""
    meta: bytes | None = None
    """The sample's ``.json`` member when its shard has one (ingest writes key, source and any label there)."""
    index: int = -1
    """Global sample index in the source (see ``FileSource`` / ``ShardSource``); -1 if unknown."""


@dataclass
class WorkerPlan:
    """What one (rank, worker) reads in an epoch and how many batches it makes."""

    quota: int
    """Batches this worker makes in the epoch."""
    shards: list[int] = field(default_factory=list)
    """Shard indices in reading order (shard sources)."""
    files: list[int] = field(default_factory=list)
    """File indices in reading order (file sources)."""
    _ends: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    """Cache of ``shard_ends``: filled on first use, in the process that uses it."""

    def shard_ends(self, counts: list[int]) -> np.ndarray:
        """Raw position at which each of the worker's shards ends (computed once per plan)."""
        if self._ends is None:
            self._ends = np.cumsum(np.asarray([counts[s] for s in self.shards], dtype=np.int64))
        return self._ends


@dataclass
class EpochPlan:
    steps: int
    """Batches per rank in the epoch (identical on every rank)."""
    workers: list[list[WorkerPlan]]
    """``workers[rank][worker]``."""


def _rng(*parts: object) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(stable_seed(*parts)))


def _round_robin_quotas(steps: int, num_workers: int) -> list[int]:
    return [len(range(w, steps, num_workers)) for w in range(num_workers)]


def plan_epoch(source: FileSource | ShardSource, *, epoch: int, seed: int, world_size: int, num_workers: int,
               batch_size: int, resampled: bool = False, epoch_steps: int = 0) -> EpochPlan:
    W, B = num_workers, batch_size
    if isinstance(source, FileSource):
        return _plan_files(len(source), epoch, seed, world_size, W, B, resampled, epoch_steps)
    return _plan_shards(source.counts, epoch, seed, world_size, W, B, resampled, epoch_steps)


def _plan_files(n: int, epoch: int, seed: int, world: int, W: int, B: int, resampled: bool, epoch_steps: int) -> EpochPlan:
    if resampled:
        steps = epoch_steps
        order = _rng("files", seed, epoch).integers(0, n, size=steps * world * B)
    else:
        steps = n // (world * B)
        if steps == 0:
            raise ConfigError(f"the data source has {n} images, fewer than one global batch "
                              f"({world} ranks x batch {B}); lower data.batch_size")
        if epoch_steps:
            steps = min(steps, epoch_steps)
        order = _rng("files", seed, epoch).permutation(n)
    quotas = _round_robin_quotas(steps, W)
    workers = []
    for r in range(world):
        row = []
        for w in range(W):
            idx = [int(i) for j in range(w, steps, W) for i in order[(j * world + r) * B:(j * world + r + 1) * B]]
            row.append(WorkerPlan(quota=quotas[w], files=idx))
        workers.append(row)
    return EpochPlan(steps, workers)


def _plan_shards(counts: list[int], epoch: int, seed: int, world: int, W: int, B: int,
                 resampled: bool, epoch_steps: int) -> EpochPlan:
    n = len(counts)
    slots = world * W
    if resampled:
        if epoch_steps <= 0:
            raise ConfigError("data.resampled=true needs data.epoch_steps > 0 (batches per rank per epoch)")
        quotas = _round_robin_quotas(epoch_steps, W)
        workers = []
        for r in range(world):
            row = []
            for w in range(W):
                rng = _rng("resample", seed, epoch, r, w)
                need, shards = quotas[w] * B + B, []
                while need > 0:  # enough shards for the quota plus one batch of spares
                    s = int(rng.integers(0, n))
                    shards.append(s)
                    need -= counts[s]
                row.append(WorkerPlan(quota=quotas[w], shards=shards))
            workers.append(row)
        return EpochPlan(epoch_steps, workers)
    if n < slots:
        raise ConfigError(f"exact (non-resampled) reading needs at least one shard per rank x worker: "
                          f"{n} shards < {world} ranks x {W} workers; use fewer data.num_workers, "
                          "more shards, or data.resampled=true")
    perm = _rng("shards", seed, epoch).permutation(n)
    assign = [[[int(s) for s in perm[r * W + w::slots]] for w in range(W)] for r in range(world)]
    quotas = [[sum(counts[s] for s in assign[r][w]) // B for w in range(W)] for r in range(world)]
    steps = min(sum(q) for q in quotas)
    if epoch_steps:
        steps = min(steps, epoch_steps)
    if steps == 0:
        raise ConfigError(f"the shards hold {sum(counts)} samples, fewer than one batch per rank "
                          f"({world} ranks x {W} workers x batch {B}); lower data.batch_size")
    for q in quotas:  # trim the fullest workers until every rank makes exactly `steps` batches
        while sum(q) > steps:
            q[q.index(max(q))] -= 1
    return EpochPlan(steps, [[WorkerPlan(quota=quotas[r][w], shards=assign[r][w]) for w in range(W)]
                             for r in range(world)])


def shard_position(source: ShardSource, plan: WorkerPlan, records: int, block: int) -> dict:
    """Shards done, the shard in progress and the offset read in it after ``records`` emitted records.

    A binary search over the worker's shard ends: every batch reports its position, so a
    walk over the shards would cost shards x batches per epoch (docs/scale.md).
    """
    ends = plan.shard_ends(source.counts)
    total = int(ends[-1]) if len(ends) else 0
    read = min(-(-records // block) * block, total) if block > 1 else records
    done = int(np.searchsorted(ends, read, side="right"))
    if done == len(ends):
        return {"shards_done": done, "shard": None, "shard_offset": 0}
    start = int(ends[done - 1]) if done else 0
    return {"shards_done": done, "shard": source.urls[plan.shards[done]], "shard_offset": read - start}


# ---------------------------------------------------------------- reading tars


def iter_tar_records(f, url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a tar stream; members of a key must be consecutive."""
    key, parts = None, {}
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = split_key(member.name)
            if k != key and key is not None:
                yield key, parts
                parts = {}
            key = k
            data = tar.extractfile(member)
            parts[ext] = data.read() if data else b""
    if key is not None:
        yield key, parts


@dataclass
class ShardReaderOptions:
    endpoint_url: str | None = None
    retries: int = 8
    backoff_s: float = 0.2
    on_shard_error: str = "skip"


def _image_of(parts: dict[str, bytes]) -> bytes | None:
    for ext in IMAGE_EXTS:
        if ext in parts:
            return parts[ext]
    return None


def shard_records(url: str, count: int, skip: int, opts: ShardReaderOptions, first_index: int | None = None) -> Iterator[Record]:
    """Exactly ``count - skip`` records of one shard, from record ``skip`` on.

    Record ``i`` of the shard has global index ``first_index + i`` (``ShardSource.starts``);
    without ``first_index`` every record's index is -1 (readers that need no indices).
    """
    def index(i: int) -> int:
        return -1 if first_index is None else first_index + i

    emitted = 0
    try:
        f = open_shard(url, endpoint_url=opts.endpoint_url, retries=opts.retries, backoff_s=opts.backoff_s)
        with f:
            for i, (key, parts) in enumerate(iter_tar_records(f, url)):
                if i >= count:
                    log.warning("shard %s holds more samples than its count %d; ignoring the rest", url, count)
                    break
                if i < skip:
                    continue
                data = _image_of(parts)
                yield Record(key, data, None, None if data is not None else f"no image member in {url}",
                             meta=parts.get("json"), index=index(i))
                emitted += 1
    except (ShardReadError, tarfile.TarError, OSError, EOFError) as e:
        if opts.on_shard_error == "fatal":
            raise ShardReadError(f"shard {url} failed: {type(e).__name__}: {e} "
                                 "(data.on_shard_error=skip would skip it and go on)") from e
        log.error("shard %s failed after %d of its %d samples (%s: %s); skipping the rest of it",
                  url, skip + emitted, count, type(e).__name__, e)
        reason = f"shard unreadable ({type(e).__name__}: {e})"
    else:
        reason = f"shard ended after {skip + emitted} of its {count} samples"
        if skip + emitted < count:
            if opts.on_shard_error == "fatal":
                raise ShardReadError(f"shard {url} holds {skip + emitted} samples, its count says {count} "
                                     "(data.on_shard_error=skip would skip the missing ones and go on)")
            log.warning("shard %s holds %d samples, its count says %d", url, skip + emitted, count)
    for j in range(skip + emitted, count):
        yield Record(f"{url}#missing{j}", None, None, reason, failed_shard=url, index=index(j))


def raw_shard_stream(source: ShardSource, shards: list[int], start: int, opts: ShardReaderOptions) -> Iterator[Record]:
    """The records of ``shards`` in order from raw position ``start`` (whole shards skipped unread)."""
    pos = 0
    for s in shards:
        n = source.counts[s]
        if pos + n <= start:
            pos += n
            continue
        yield from shard_records(source.urls[s], n, max(0, start - pos), opts, source.starts[s])
        pos += n


def raw_file_stream(source: FileSource, files: list[int], start: int) -> Iterator[Record]:
    for i in files[start:]:
        try:
            with open(source.paths[i], "rb") as f:
                data, err = f.read(), None
        except OSError as e:
            data, err = None, f"cannot read {source.paths[i]}: {e}"
        yield Record(source.keys[i], data, source.labels[i], err, index=i)


def block_shuffled(raw_from, start: int, block: int, seed_parts: tuple) -> Iterator[Record]:
    """Shuffle a stream in consecutive blocks of ``block`` records; resume at emitted record ``start``.

    ``raw_from(p)`` must return the raw stream from raw position ``p``. Block ``b`` holds raw
    records ``[b*block, (b+1)*block)`` in the order ``permutation(seed_parts, b)``.
    """
    if block <= 1:
        yield from raw_from(start)
        return
    b = start // block
    raw = raw_from(b * block)
    skip = start - b * block
    while True:
        buf = []
        for rec in raw:
            buf.append(rec)
            if len(buf) == block:
                break
        if not buf:
            return
        order = _rng("block", *seed_parts, b).permutation(len(buf))
        for i in order[skip:]:
            yield buf[i]
        skip = 0
        b += 1
