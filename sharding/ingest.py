"""Ingest: plan -> chunks (in parallel, resumable) -> merge.

The work is split so that a billion inputs need no more memory than one chunk:

- ``plan(cfg)`` streams the input listing once into chunk lists
  (``_ingest/chunks/{k:06d}.parquet``, ``chunk_size`` inputs each) and records
  ``_ingest/plan.json``. The listing is shuffled as a whole first (``shuffle``, seeded; a
  two-level scatter in bounded memory, ``sharding.shuffle``), so every chunk and shard draws
  from the whole corpus. A rerun reuses the plan, so the listing is frozen: resuming
  never sees a different corpus.
- ``ingest_chunk(cfg, k)`` fetches, validates, converts and writes chunk ``k``'s images to
  ``shards/{k:06d}-{j:04d}.tar``, then writes its manifest part (``_ingest/parts/``) and,
  last, its done marker (``_ingest/done/{k:06d}.json``). Chunks share nothing, so they run
  as local processes or as the tasks of a Slurm job array. A chunk killed midway is
  simply redone: its output is a deterministic function of its inputs.
- ``merge(cfg)`` runs once all chunks are done: cross-chunk exact dedup (hash-partitioned,
  first in planned order wins, ``merge_prepare``), rewrites the shards that held a later
  copy (``merge_chunk``, per chunk: an array of tasks on Slurm), writes
  ``manifest.parquet``, ``shards.parquet`` and ``summary.json`` (``merge_finish``) and
  checks that written + duplicate + rejected == seen (sharding.merge has the layout).

``ingest(cfg)`` does all three on one machine with ``cfg.workers`` processes and a
progress bar.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seerlike import storage
from seerlike.config import ConfigError
from sharding import dedup, shuffle
from sharding.config import IngestConfig
from sharding.manifest import MANIFEST, SCHEMA, SHARDS, SUMMARY, WORK, read_table, table_to_bytes
from sharding.merge import DUP_GROUP, DUP_SCHEMA, ManifestAssembler, chunk_summary, shard_index_table
from sharding.process import REASONS, process_image
from sharding.sources import FetchError, Source, check_inputs, iter_sources, normalize_ref, prefetch
from sharding.writer import SHARDS_DIR, ShardWriter, rewrite_shard, staged

log = logging.getLogger(__name__)

Progress = Callable[[int, Counter], None]
"""progress(images_done, Counter of statuses/reasons for those images)."""


@dataclass(frozen=True)
class Plan:
    """The chunks of an ingest; iterating it yields the chunk indices (the Slurm array)."""

    n_inputs: int
    n_chunks: int
    chunk_size: int

    @property
    def chunks(self) -> range:
        return range(self.n_chunks)

    def __iter__(self):
        return iter(self.chunks)

    def __len__(self) -> int:
        return self.n_chunks

    def chunk_len(self, k: int) -> int:
        return min(self.chunk_size, self.n_inputs - k * self.chunk_size)


def sample_key(chunk: int, index: int) -> str:
    """Keys are positions, never names: no '/', '..', dots or control characters can leak in."""
    return f"{chunk:06d}_{index:07d}"


def normalize(cfg: IngestConfig) -> IngestConfig:
    """Absolute local paths for inputs and output, so every process and rerun agrees."""
    if not cfg.out:
        raise ConfigError("no output: pass --out DIR or --out s3://bucket/prefix")
    out = cfg.out if storage.is_s3_url(cfg.out) else os.path.abspath(os.path.expanduser(cfg.out))
    if storage.is_s3_url(out):
        try:
            storage.split_s3_url(out)
        except ValueError as e:
            raise ConfigError(f"--out {cfg.out!r}: {e}") from None
    return cfg.replace(inputs=tuple(normalize_ref(r) for r in cfg.inputs), out=out.rstrip("/") or out)


def _work(cfg: IngestConfig, *parts: str) -> str:
    return storage.join(cfg.out, WORK, *parts)


def _ep(cfg: IngestConfig) -> str | None:
    return cfg.endpoint_url or None


# ---------------------------------------------------------------- plan


def _check_config(cfg: IngestConfig) -> None:
    """Record the output-defining config; refuse to continue an output made with another."""
    url = _work(cfg, "config.json")
    want = {k: v for k, v in cfg.output_fields().items() if k != "out"}
    want["inputs"] = list(cfg.inputs)
    if storage.exists(url, endpoint_url=_ep(cfg)):
        have = json.loads(storage.read_bytes(url, endpoint_url=_ep(cfg)))
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        if diff:
            shown = ", ".join(f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in diff)
            raise ConfigError(
                f"{cfg.out} holds an ingest made with a different config ({shown}); "
                "use another --out, or delete it to start over"
            )
        return
    storage.write_bytes(url, json.dumps(want, indent=1).encode(), endpoint_url=_ep(cfg))


def load_plan(cfg: IngestConfig) -> Plan | None:
    url = _work(cfg, "plan.json")
    if not storage.exists(url, endpoint_url=_ep(cfg)):
        return None
    return Plan(**json.loads(storage.read_bytes(url, endpoint_url=_ep(cfg))))


def plan(cfg: IngestConfig) -> Plan:
    """List the inputs once into chunk lists (or reuse the existing plan); returns the Plan."""
    cfg = normalize(cfg)
    check_inputs(cfg)
    _check_config(cfg)
    existing = load_plan(cfg)
    if existing is not None:
        return existing
    t0 = time.perf_counter()
    # Listings come sorted (one folder per class, crawl or date); a training reader mixes only
    # a few consecutive shards, so shards cut from the listing's order make class-pure batches.
    if cfg.shuffle:
        tables = shuffle.shuffled(iter_sources(cfg), cfg.seed, os.path.join(_spool_dir(cfg), "plan"))
    else:
        tables = _in_order(iter_sources(cfg), cfg.chunk_size)
    n, k, carry = 0, 0, None
    for t in tables:
        n += t.num_rows
        carry = t if carry is None else pa.concat_tables([carry, t])
        while carry.num_rows >= cfg.chunk_size:
            _write_chunk_list(cfg, k, carry.slice(0, cfg.chunk_size))
            k, carry = k + 1, carry.slice(cfg.chunk_size)
    if carry is not None and carry.num_rows:
        _write_chunk_list(cfg, k, carry)
        k += 1
    with contextlib.suppress(OSError):
        os.rmdir(_spool_dir(cfg))  # gone when empty
    p = Plan(n_inputs=n, n_chunks=k, chunk_size=cfg.chunk_size)
    storage.write_bytes(_work(cfg, "plan.json"), json.dumps(p.__dict__).encode(), endpoint_url=_ep(cfg))
    log.info("planned %d inputs in %d chunks of %d (%.1fs)", n, k, cfg.chunk_size, time.perf_counter() - t0)
    return p


def _in_order(sources, size: int):
    buf = []
    for src in sources:
        buf.append(src)
        if len(buf) == size:
            yield shuffle.as_table(buf)
            buf = []
    if buf:
        yield shuffle.as_table(buf)


def _write_chunk_list(cfg: IngestConfig, k: int, table: pa.Table) -> None:
    storage.write_bytes(_work(cfg, "chunks", f"{k:06d}.parquet"), table_to_bytes(table.combine_chunks()),
                        endpoint_url=_ep(cfg))


def chunk_sources(cfg: IngestConfig, k: int) -> list[Source]:
    t = read_table(_work(cfg, "chunks", f"{k:06d}.parquet"), endpoint_url=_ep(cfg)).to_pydict()
    return [Source(r, lab) for r, lab in zip(t["source"], t["label"])]


def done_chunks(cfg: IngestConfig) -> set[int]:
    """Chunks whose done marker exists (one listing, not one request per chunk)."""
    cfg = normalize(cfg)
    done = set()
    for url, _ in storage.list_files(_work(cfg, "done") + ("/" if storage.is_s3_url(cfg.out) else ""), endpoint_url=_ep(cfg)):
        name = url.rsplit("/", 1)[-1]
        if name.endswith(".json") and name[:-5].isdigit():
            done.add(int(name[:-5]))
    return done


def pending_chunks(cfg: IngestConfig) -> list[int]:
    p = plan(cfg)
    done = done_chunks(cfg)
    return [k for k in p.chunks if k not in done]


# ---------------------------------------------------------------- one chunk


def _spool_dir(cfg: IngestConfig) -> str:
    """Local scratch space: S3 shards are built here before their upload; the merge spills here.

    Local outputs use ``_ingest/tmp`` (the output's own filesystem: the system temp dir may
    be small or on another device); S3 outputs one folder per output (not per process) under
    ``spool_dir`` or the system temp dir, so a rerun on this machine finds and removes the
    temp files of a killed attempt.
    """
    if storage.is_s3_url(cfg.out):
        base = cfg.spool_dir or tempfile.gettempdir()
        return os.path.join(base, "seerlike-ingest-" + hashlib.sha256(cfg.out.encode()).hexdigest()[:12])
    return _work(cfg, "tmp")


def _remove_temps(folder: str, pattern: str) -> None:
    """Delete files a killed attempt left in a local folder (no-op for S3, which has no temp objects)."""
    if storage.is_s3_url(folder):
        return
    for stale in Path(folder).glob(pattern):
        stale.unlink(missing_ok=True)


def _remove_chunk_temps(cfg: IngestConfig, k: int) -> None:
    """Temp files of chunk ``k``: shards beside their destination (S3: in the spool), parts, marker."""
    _remove_temps(storage.join(cfg.out, SHARDS_DIR), f".{k:06d}-*.tmp")
    for d in ("parts", "done"):
        _remove_temps(_work(cfg, d), f".{k:06d}.*.tmp")
    if storage.is_s3_url(cfg.out):
        spool = _spool_dir(cfg)
        _remove_temps(spool, f".{k:06d}-*.tmp")
        _remove_temps(spool, f"{k:06d}-*.tar")


def ingest_chunk(cfg: IngestConfig, chunk_index: int, progress: Progress | None = None) -> dict:
    """Ingest one chunk; a no-op returning its recorded counts if it is already done."""
    cfg = normalize(cfg)
    k = chunk_index
    done_url = _work(cfg, "done", f"{k:06d}.json")
    if storage.exists(done_url, endpoint_url=_ep(cfg)):
        return json.loads(storage.read_bytes(done_url, endpoint_url=_ep(cfg)))
    t0, c0 = time.perf_counter(), time.process_time()
    sources = chunk_sources(cfg, k)
    spool = _spool_dir(cfg)
    _remove_chunk_temps(cfg, k)  # of a killed attempt
    writer = ShardWriter(
        cfg.out,
        k,
        max_samples=cfg.shard_max_samples,
        max_bytes=int(cfg.shard_max_mb * 1e6),
        spool_dir=spool,
        endpoint_url=_ep(cfg),
    )
    rows: list[dict] = []
    first_seen: dict[str, dict] = {}  # sha256 -> outcome of its first occurrence in this chunk
    counts: Counter = Counter()
    pending: Counter = Counter()
    last_report = time.perf_counter()
    try:
        for i, (src, got) in enumerate(prefetch(sources, cfg)):
            row = _row(sample_key(k, i), k, i, src)
            if isinstance(got, FetchError):
                row.update(status="rejected", reason=got.reason)
                log.debug("rejected: %s", got)  # the message carries the redacted source
            else:
                _handle(row, got, cfg, writer, first_seen)
            rows.append(row)
            tag = row["status"] if row["status"] != "rejected" else f"rejected:{row['reason']}"
            counts[tag] += 1
            pending[tag] += 1
            now = time.perf_counter()
            if progress is not None and now - last_report > 0.2:
                progress(sum(pending.values()), pending)
                pending, last_report = Counter(), now
        shards = writer.close()
    except BaseException as e:
        writer.abort(e)  # a full disk comes out of here as DiskFullError naming the shard
        raise
    if progress is not None and pending:
        progress(sum(pending.values()), pending)
    if storage.is_s3_url(cfg.out):
        with contextlib.suppress(OSError):
            os.rmdir(spool)  # the spool folder, empty once every shard is uploaded (else in use)
    storage.write_bytes(
        _work(cfg, "parts", f"{k:06d}.parquet"),
        table_to_bytes(pa.Table.from_pylist(rows, schema=SCHEMA)),
        endpoint_url=_ep(cfg),
    )
    result = {
        "chunk": k,
        "seen": len(sources),
        "counts": dict(sorted(counts.items())),
        "shards": shards,
        "seconds": round(time.perf_counter() - t0, 3),
        "cpu_seconds": round(time.process_time() - c0, 3),  # this process, fetch threads included
    }
    if sum(counts.values()) != len(sources):
        raise AssertionError(f"chunk {k}: accounted {sum(counts.values())} of {len(sources)} inputs")
    storage.write_bytes(done_url, json.dumps(result).encode(), endpoint_url=_ep(cfg))  # last: marks it complete
    return result


def _row(key: str, k: int, i: int, src: Source) -> dict:
    return {"key": key, "chunk": k, "index": i, "source": src.ref, "label": src.label}


def _handle(row: dict, data: bytes, cfg: IngestConfig, writer: ShardWriter, first_seen: dict) -> None:
    sha = hashlib.sha256(data).hexdigest()
    row.update(sha256=sha, orig_bytes=len(data))
    prior = first_seen.get(sha) if cfg.dedup else None
    if prior is not None:
        # Same bytes, same outcome: a repeat of a reject is rejected alike; of a written image, a duplicate.
        row.update({k: prior[k] for k in ("orig_width", "orig_height", "orig_format")})
        if prior["status"] == "written":
            row.update(status="duplicate", duplicate_of=prior["key"])
        else:
            row.update(status="rejected", reason=prior["reason"])
        return
    res = process_image(data, cfg)
    row.update(orig_width=res.orig_width, orig_height=res.orig_height, orig_format=res.orig_format)
    if res.reason is not None:
        row.update(status="rejected", reason=res.reason)
        log.debug("rejected %s: %s %s", storage.redact_url(row["source"]), res.reason, res.detail)
    else:
        meta = {"key": row["key"], "source": row["source"], "width": res.width, "height": res.height,
                "sha256": sha, "bytes": len(res.jpeg)}
        if row["label"] is not None:
            meta["label"] = row["label"]
        shard, offset = writer.add(row["key"], res.jpeg, meta)
        row.update(status="written", shard=shard, offset=offset, size=len(res.jpeg), width=res.width,
                   height=res.height, phash=res.phash, kept_original=res.kept_original)
    first_seen[sha] = row


# ---------------------------------------------------------------- merge


def merge(cfg: IngestConfig, run_stats: dict | None = None) -> dict:
    """Dedup across chunks, write manifest.parquet, shards.parquet and summary.json; returns the summary.

    ``merge_prepare``, ``merge_chunk`` for every chunk (on ``cfg.workers`` threads) and
    ``merge_finish`` in one process; a Slurm submission runs them as separate jobs
    (launchers.submit.submit_ingest), the chunks as an array (sharding.merge).
    """
    cfg = normalize(cfg)
    t0 = time.perf_counter()
    p = merge_prepare(cfg)
    if cfg.workers > 1 and p.n_chunks > 1:
        with ThreadPoolExecutor(cfg.workers) as pool:
            list(pool.map(lambda k: merge_chunk(cfg, k), p.chunks))
    else:
        for k in p.chunks:
            merge_chunk(cfg, k)
    return merge_finish(cfg, run_stats, merge_seconds=time.perf_counter() - t0)


def _merge_ready(cfg: IngestConfig) -> Plan:
    p = load_plan(cfg)
    if p is None:
        raise RuntimeError(f"{cfg.out}: no plan; run plan(cfg) and the chunks first (or `seerlike ingest`)")
    missing = sorted(set(p.chunks) - done_chunks(cfg))
    if missing:
        raise RuntimeError(
            f"{cfg.out}: {len(missing)} of {p.n_chunks} chunks are not done (e.g. {missing[:5]}); "
            "run ingest_chunk for them, or rerun `seerlike ingest`, before merging"
        )
    return p


def merge_prepare(cfg: IngestConfig) -> Plan:
    """Merge step 1: cross-chunk dedup into ``_ingest/dups/`` and ``_ingest/dedup.json``."""
    cfg = normalize(cfg)
    p = _merge_ready(cfg)
    t0 = time.perf_counter()
    # Every chunk is done, so no writer is alive: whatever temp files remain belong to a
    # killed chunk attempt or merge. The merge only rereads parts and rewrites deterministic
    # outputs, so rerunning it after a stop at any point gives the same result.
    for folder in (cfg.out, storage.join(cfg.out, SHARDS_DIR),
                   *(_work(cfg, d) for d in ("", "chunks", "parts", "done", "dups", "merged"))):
        _remove_temps(folder, ".*.tmp")
    scratch = os.path.join(_spool_dir(cfg), "merge")
    for old in Path(_spool_dir(cfg)).glob("merge*"):  # of a killed merge (merge-{k}: of a chunk's)
        shutil.rmtree(old, ignore_errors=True)
    try:
        with storage.reporting_disk_full(scratch):
            os.makedirs(scratch, exist_ok=True)
            dup_ids, win_ids = _cross_chunk(cfg, p, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(_spool_dir(cfg))  # gone when empty
    # Every group's file is written, an empty one too, so none is left from an earlier dedup.
    span = DUP_GROUP * p.chunk_size
    bounds = np.searchsorted(dup_ids, np.arange(0, -(-p.n_chunks // DUP_GROUP) + 1) * span)
    for g in range(len(bounds) - 1):
        lo, hi = bounds[g], bounds[g + 1]
        table = pa.table({"dup": dup_ids[lo:hi], "win": win_ids[lo:hi]}, schema=DUP_SCHEMA)
        storage.write_bytes(_work(cfg, "dups", f"{g:06d}.parquet"), table_to_bytes(table), endpoint_url=_ep(cfg))
    digest = hashlib.sha256(dup_ids.tobytes() + win_ids.tobytes()).hexdigest()[:16]
    info = {"duplicates": int(len(dup_ids)), "digest": digest, "seconds": round(time.perf_counter() - t0, 3)}
    storage.write_bytes(_work(cfg, "dedup.json"), json.dumps(info).encode(), endpoint_url=_ep(cfg))
    return p


def _read_json(cfg: IngestConfig, *parts: str) -> dict | None:
    url = _work(cfg, *parts)
    if not storage.exists(url, endpoint_url=_ep(cfg)):
        return None
    return json.loads(storage.read_bytes(url, endpoint_url=_ep(cfg)))


def _chunk_stamp(cfg: IngestConfig, k: int, dedup_info: dict, done: bytes | None = None) -> dict:
    """What a chunk's merge result derives from: the dedup result and the chunk's done marker."""
    if done is None:
        done = storage.read_bytes(_work(cfg, "done", f"{k:06d}.json"), endpoint_url=_ep(cfg))
    return {"dedup": dedup_info["digest"], "done": hashlib.sha256(done).hexdigest()[:16]}


def merge_chunk(cfg: IngestConfig, chunk_index: int) -> dict:
    """Merge step 2 for chunk ``k``: mark its later copies, rewrite their shards, record the chunk.

    A no-op returning its marker when the chunk was merged against the same dedup result.
    """
    cfg = normalize(cfg)
    k = chunk_index
    p = load_plan(cfg)
    dedup_info = _read_json(cfg, "dedup.json")
    if p is None or dedup_info is None:
        raise RuntimeError(f"{cfg.out}: no dedup result; run merge_prepare(cfg) before merge_chunk")
    stamp = _chunk_stamp(cfg, k, dedup_info)
    marker = _read_json(cfg, "merged", f"{k:06d}.json")
    if marker is not None and marker.get("stamp") == stamp:
        return marker
    t0 = time.perf_counter()
    dt = read_table(_work(cfg, "dups", f"{k // DUP_GROUP:06d}.parquet"), endpoint_url=_ep(cfg))
    dups, wins = dt["dup"].to_numpy(), dt["win"].to_numpy()
    lo, hi = np.searchsorted(dups, [k * p.chunk_size, (k + 1) * p.chunk_size])
    t = read_table(_work(cfg, "parts", f"{k:06d}.parquet"), endpoint_url=_ep(cfg))
    if hi > lo:
        scratch = os.path.join(_spool_dir(cfg), f"merge-{k:06d}")
        try:
            with storage.reporting_disk_full(scratch):
                os.makedirs(scratch, exist_ok=True)
                t = _apply_duplicates(cfg, t, k, p, dups[lo:hi], wins[lo:hi], scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(_spool_dir(cfg))
        storage.write_bytes(_work(cfg, "merged", f"{k:06d}.parquet"), table_to_bytes(t), endpoint_url=_ep(cfg))
    marker = {"chunk": k, "stamp": stamp, "rewritten": bool(hi > lo), "duplicates_across_chunks": int(hi - lo),
              **chunk_summary(t, k * p.chunk_size), "seconds": round(time.perf_counter() - t0, 3)}
    storage.write_bytes(_work(cfg, "merged", f"{k:06d}.json"), json.dumps(marker).encode(), endpoint_url=_ep(cfg))
    return marker


def merge_chunks(cfg: IngestConfig, task: int, tasks: int) -> int:
    """``merge_chunk`` for the chunks ``k`` with ``k % tasks == task`` (one task of a merge array)."""
    p = load_plan(normalize(cfg))
    if p is None:
        raise RuntimeError(f"{cfg.out}: no plan; nothing to merge")
    mine = [k for k in p.chunks if k % tasks == task]
    for k in mine:
        merge_chunk(cfg, k)
    return len(mine)


def merge_finish(cfg: IngestConfig, run_stats: dict | None = None, *, merge_seconds: float | None = None) -> dict:
    """Merge step 3: manifest.parquet, shards.parquet and summary.json from the merged chunks."""
    cfg = normalize(cfg)
    p = _merge_ready(cfg)
    t0 = time.perf_counter()
    dedup_info = _read_json(cfg, "dedup.json")
    if dedup_info is None:
        raise RuntimeError(f"{cfg.out}: no dedup result; run merge_prepare(cfg) and merge_chunk for every chunk")
    def read_markers(k: int) -> tuple[bytes, dict | None]:
        return (storage.read_bytes(_work(cfg, "done", f"{k:06d}.json"), endpoint_url=_ep(cfg)),
                _read_json(cfg, "merged", f"{k:06d}.json"))

    # two small objects per chunk (100,000 chunks at a billion inputs): read many at once
    with ThreadPoolExecutor(16) as pool:
        pairs = list(pool.map(read_markers, p.chunks))
    markers, done_markers = [], []
    for k, (done, m) in zip(p.chunks, pairs):
        if m is None or m.get("stamp") != _chunk_stamp(cfg, k, dedup_info, done):
            raise RuntimeError(f"{cfg.out}: chunk {k} is not merged against the current dedup result; "
                               "run merge_chunk for it (or rerun the merge)")
        markers.append(m)
        done_markers.append(json.loads(done))
    scratch = os.path.join(_spool_dir(cfg), "merge")
    try:
        with storage.reporting_disk_full(scratch):
            os.makedirs(scratch, exist_ok=True)
            with staged(storage.join(cfg.out, MANIFEST), scratch, endpoint_url=_ep(cfg)) as local_manifest:
                out = ManifestAssembler(local_manifest)
                for m in markers:
                    src = "merged" if m["rewritten"] else "parts"
                    out.add(read_table(_work(cfg, src, f"{m['chunk']:06d}.parquet"), endpoint_url=_ep(cfg)))
                out.close()
            storage.write_bytes(storage.join(cfg.out, SHARDS), table_to_bytes(shard_index_table(markers)),
                                endpoint_url=_ep(cfg))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(_spool_dir(cfg))
    summary = _summary(cfg, p, markers)
    chunk_seconds = sum(d["seconds"] for d in done_markers)
    chunk_cpu = sum(d.get("cpu_seconds", 0.0) for d in done_markers)
    summary["chunk_seconds"] = round(chunk_seconds, 3)
    summary["chunk_cpu_seconds"] = round(chunk_cpu, 3)
    summary["images_per_s_per_worker"] = round(p.n_inputs / chunk_seconds, 1) if chunk_seconds else None
    summary["images_per_cpu_s"] = round(p.n_inputs / chunk_cpu, 1) if chunk_cpu else None
    if merge_seconds is None:  # the steps ran as separate jobs: the sum of their own times
        merge_seconds = dedup_info["seconds"] + sum(m["seconds"] for m in markers)
    summary["merge_seconds"] = round(merge_seconds + time.perf_counter() - t0, 3)
    if run_stats:
        summary.update(run_stats)
    summary["config"] = cfg.output_fields()
    check_accounting(summary)
    storage.write_bytes(storage.join(cfg.out, SUMMARY), (json.dumps(summary, indent=1) + "\n").encode(), endpoint_url=_ep(cfg))
    return summary


def check_accounting(summary: dict) -> None:
    """written + duplicate + rejected (by reason) == seen, or raise."""
    total = summary["written"] + summary["duplicate"] + sum(summary["rejected_by_reason"].values())
    if total != summary["seen"] or summary["rejected"] != sum(summary["rejected_by_reason"].values()):
        raise AssertionError(
            f"accounting broken: written {summary['written']} + duplicate {summary['duplicate']} + "
            f"rejected {summary['rejected_by_reason']} = {total} != seen {summary['seen']}"
        )


def _cross_chunk(cfg: IngestConfig, p: Plan, tmp: str) -> tuple[np.ndarray, np.ndarray]:
    if not cfg.dedup or p.n_chunks < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)

    def written():
        for k in p.chunks:
            t = read_table(_work(cfg, "parts", f"{k:06d}.parquet"), ["index", "sha256", "status"], endpoint_url=_ep(cfg))
            t = t.filter(pc.equal(t["status"], "written"))
            gids = t["index"].to_numpy().astype(np.int64) + k * p.chunk_size
            yield gids, t["sha256"]

    return dedup.cross_chunk_duplicates(written(), partitions=cfg.dedup_partitions, tmp_dir=tmp)


def _summary(cfg: IngestConfig, p: Plan, markers: list[dict]) -> dict:
    counts: Counter = Counter()
    reasons: Counter = Counter({r: 0 for r in REASONS})
    for m in markers:
        counts.update(m["counts"])
        reasons.update(m["reasons"])
    written = counts["written"]
    kept = sum(m["kept_original"] for m in markers)
    bytes_out = sum(m["bytes_written"] for m in markers)
    return {
        "dataset": cfg.out,
        "seen": p.n_inputs,
        "written": written,
        "duplicate": counts["duplicate"],
        "rejected": counts["rejected"],
        "rejected_by_reason": dict(reasons),
        "duplicates_across_chunks": sum(m["duplicates_across_chunks"] for m in markers),
        "kept_original": kept,
        "reencoded": written - kept,
        "shards": sum(len(m["shards"]) for m in markers),
        "chunks": p.n_chunks,
        "bytes_in": sum(m["bytes_in"] for m in markers),
        "bytes_written": bytes_out,
        "mean_bytes_per_image": round(bytes_out / written, 1) if written else None,
    }


def _apply_duplicates(cfg, t: pa.Table, k: int, p: Plan, dups: np.ndarray, wins: np.ndarray, tmp: str) -> pa.Table:
    """Mark later copies as duplicates and rewrite the shards that held them (new offsets).

    Which samples a shard keeps comes from the chunk's manifest part, never from the shard's
    current state, so a rerun after a stop midway (some shards rewritten, an emptied one
    already deleted) does exactly the same thing.
    """
    d = t.to_pydict()
    members: dict[str, set[str]] = {}
    for key, shard, status in zip(d["key"], d["shard"], d["status"]):
        if status == "written":
            members.setdefault(shard, set()).add(key)
    idx = (dups - k * p.chunk_size).tolist()
    drop: dict[str, set[str]] = {}
    for i, w in zip(idx, wins.tolist()):
        drop.setdefault(d["shard"][i], set()).add(d["key"][i])
        d["status"][i] = "duplicate"
        d["duplicate_of"][i] = sample_key(w // p.chunk_size, w % p.chunk_size)
        for col in ("shard", "offset", "size", "width", "height", "phash", "kept_original"):
            d[col][i] = None
    offsets: dict[str, int] = {}
    for shard, keys in sorted(drop.items()):
        url, kept = storage.join(cfg.out, shard), members[shard] - keys
        if not kept:
            storage.remove(url, endpoint_url=_ep(cfg))  # idempotent: a rerun finds it gone
            continue
        if not storage.exists(url, endpoint_url=_ep(cfg)):
            raise RuntimeError(
                f"{url} is missing but chunk {k}'s manifest part lists samples in it; redo the chunk: "
                f"delete {_work(cfg, 'done', f'{k:06d}.json')} and rerun the ingest"
            )
        got = rewrite_shard(url, keys, tmp, endpoint_url=_ep(cfg))
        if set(got) != kept:
            raise RuntimeError(f"{url} does not hold the samples chunk {k}'s manifest part lists; redo the chunk")
        offsets.update(got)
    for i, (key, shard) in enumerate(zip(d["key"], d["shard"])):
        if shard in drop:
            d["offset"][i] = offsets[key]
    return pa.table(d, schema=SCHEMA)


# ---------------------------------------------------------------- driver

_queue = None


def _init_worker(q) -> None:
    global _queue
    _queue = q


def _run_chunk(cfg: IngestConfig, k: int) -> dict:
    return ingest_chunk(cfg, k, progress=lambda n, c: _queue.put((n, dict(c))))


class _Bar:
    """tqdm over inputs, with written / duplicate / reject counts in the postfix."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm import tqdm

        self.counts: Counter = Counter()
        self.bar = tqdm(total=total, initial=initial, unit="img", disable=not enabled, smoothing=0.1, dynamic_ncols=True)

    def update(self, n: int, c: dict) -> None:
        self.counts.update(c)
        rej = {k.split(":", 1)[1]: v for k, v in self.counts.items() if k.startswith("rejected:")}
        top = ",".join(f"{r}={v}" for r, v in sorted(rej.items(), key=lambda kv: -kv[1])[:3])
        self.bar.set_postfix_str(
            f"written={self.counts['written']} dup={self.counts['duplicate']} rej={sum(rej.values())}"
            + (f" ({top})" if top else ""),
            refresh=False,
        )
        self.bar.update(n)

    def close(self, done: int | None = None) -> None:
        if done is not None and done > self.bar.n:  # progress messages still in flight at the end
            self.bar.update(done - self.bar.n)
        self.bar.close()


def ingest(cfg: IngestConfig) -> dict:
    """Plan, run every pending chunk on ``cfg.workers`` processes, merge; returns the summary."""
    cfg = normalize(cfg)
    t0 = time.perf_counter()
    p = plan(cfg)
    plan_seconds = time.perf_counter() - t0
    done = done_chunks(cfg)
    todo = [k for k in p.chunks if k not in done]
    if done:
        log.info("resuming: %d of %d chunks already done", len(done & set(p.chunks)), p.n_chunks)
    initial = sum(p.chunk_len(k) for k in done if k < p.n_chunks)
    images_this_run = sum(p.chunk_len(k) for k in todo)
    bar = _Bar(p.n_inputs, initial, cfg.progress)
    t1 = time.perf_counter()
    finished = False
    try:
        if cfg.workers == 1 or len(todo) <= 1:
            for k in todo:
                ingest_chunk(cfg, k, progress=bar.update)
        else:
            _run_pool(cfg, todo, bar)
        finished = True
    except BaseException:
        # a failed chunk stopped the pool, killing the others midway: drop their temp files
        # (the workers are gone; a rerun redoes every chunk without a done marker)
        for k in todo:
            _remove_chunk_temps(cfg, k)
        raise
    finally:
        bar.close(p.n_inputs if finished else None)
    seconds = time.perf_counter() - t1
    run_stats = {
        "plan_seconds": round(plan_seconds, 3),
        "run_images": images_this_run,
        "run_chunks": len(todo),
        "run_seconds": round(seconds, 3),
        "run_images_per_s": round(images_this_run / seconds, 1) if todo and seconds > 0 else None,
        "workers": cfg.workers,
    }
    summary = merge(cfg, run_stats)
    summary["total_seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def _run_pool(cfg: IngestConfig, todo: list[int], bar: _Bar) -> None:
    # Not plain fork: boto3 clients and fetch threads of this process are not fork-safe. A
    # forkserver (fresh process, modules preloaded once) starts each worker in milliseconds.
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["sharding.ingest"])
    else:
        ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with ctx.Pool(min(cfg.workers, len(todo)), initializer=_init_worker, initargs=(q,)) as pool:
        results = [pool.apply_async(_run_chunk, (cfg, k)) for k in todo]
        while True:
            try:
                n, c = q.get(timeout=0.2)
                bar.update(n, c)
                continue
            except queue.Empty:
                pass
            for r in results:
                if r.ready() and not r.successful():
                    r.get()  # re-raises the worker's exception; completed chunks stay done
            if all(r.ready() for r in results):
                break
        while True:
            try:
                n, c = q.get_nowait()
            except queue.Empty:
                break
            bar.update(n, c)
