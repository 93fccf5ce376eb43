"""One corpus-wide step on a synthetic corpus, run in its own process by ``run.py``.

``python -m benchmarks.scale.steps STEP CORPUS_DIR RESULT.json`` imports what the step
needs, records the process's RSS before the step starts, runs it through the project's
public entry points and writes its own figures (timings, counts) as JSON; the parent
adds the peak RSS (``wait4``) and the wall time. Nothing here is a reimplementation of
a step: every step calls the code a user's command would.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------- ingest


def step_plan(root: Path) -> dict:
    """Ingest plan: stream the listing into chunk lists."""
    from sharding import ingest
    from sharding.config import IngestConfig

    out = root / "plan-out"
    shutil.rmtree(out, ignore_errors=True)
    cfg = IngestConfig(inputs=(str(root / "listing.parquet"),), out=str(out), progress=False)
    yield_point()
    t0 = time.perf_counter()
    p = ingest.plan(cfg)
    secs = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"chunks": p.n_chunks, "inputs": p.n_inputs, "seconds": secs}


class ShardStub:
    """Stands in for the merge's shard rewrites: no tar exists in a metadata-level corpus.

    A rewrite of a shard is counted (with the bytes it would move) and answered with fresh
    offsets for the samples the chunk's part says it keeps, as the real rewrite does.
    """

    def __init__(self):
        from seerlike import storage
        from sharding import ingest

        self.storage, self.ingest = storage, ingest
        self.members: dict[str, list[str]] = {}
        self.sizes: dict[str, int] = {}
        self.rewritten = self.removed = self.bytes = 0
        real_exists, real_remove, real_apply = storage.exists, storage.remove, ingest._apply_duplicates

        def exists(url, **kw):
            return True if "/shards/" in str(url) else real_exists(url, **kw)

        def remove(url, **kw):
            if "/shards/" in str(url):
                self.removed += 1
                return None
            return real_remove(url, **kw)

        def apply(cfg, t, *a, **kw):
            d = t.select(["key", "shard", "status", "size"]).to_pydict()
            self.members.clear()
            self.sizes.clear()
            for key, shard, st, size in zip(d["key"], d["shard"], d["status"], d["size"]):
                if st == "written":
                    url = storage.join(cfg.out, shard)
                    self.members.setdefault(url, []).append(key)
                    self.sizes[url] = self.sizes.get(url, 0) + size
            return real_apply(cfg, t, *a, **kw)

        def rewrite(url, drop, tmp, endpoint_url=None):
            self.rewritten += 1
            self.bytes += self.sizes[url]
            return {k: 512 * i for i, k in enumerate(k for k in self.members[url] if k not in drop)}

        storage.exists, storage.remove = exists, remove
        ingest._apply_duplicates = apply
        ingest.rewrite_shard = rewrite


def _clean_merge_outputs(ds: Path) -> None:
    for name in ("manifest.parquet", "summary.json", "shards.parquet"):
        p = ds / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def step_dedup(root: Path) -> dict:
    """Cross-chunk exact dedup alone (hash-partitioned spill, per-partition sort)."""
    from benchmarks.scale.corpus import ingest_config
    from sharding import ingest

    cfg = ingest.normalize(ingest_config(root / "ingest"))
    p = ingest.load_plan(cfg)
    tmp = root / "dedup-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    yield_point()
    t0 = time.perf_counter()
    dups, wins = ingest._cross_chunk(cfg, p, str(tmp))
    secs = time.perf_counter() - t0
    shutil.rmtree(tmp, ignore_errors=True)
    return {"seconds": secs, "duplicates_across_chunks": int(len(dups))}


def step_merge(root: Path) -> dict:
    """The whole merge: dedup, duplicate marking (shard rewrites stubbed), manifest, summary."""
    from benchmarks.scale.corpus import ingest_config
    from sharding import ingest

    stub = ShardStub()
    ds = root / "ingest"
    _clean_merge_outputs(ds)
    cfg = ingest_config(ds)
    yield_point()
    t0 = time.perf_counter()
    summary = ingest.merge(cfg)
    secs = time.perf_counter() - t0
    phases = {}
    work = ds / "_ingest"
    if (work / "dedup.json").exists():  # the split merge: wall seconds of dedup and of the per-chunk steps
        phases["dedup_seconds"] = json.loads((work / "dedup.json").read_text())["seconds"]
        phases["chunk_steps_seconds"] = sum(json.loads(m.read_text())["seconds"] for m in (work / "merged").glob("*.json"))
    return {"seconds": secs, **phases, "written": summary["written"], "duplicate": summary["duplicate"],
            "duplicates_across_chunks": summary["duplicates_across_chunks"], "shards": summary["shards"],
            "shards_rewritten": stub.rewritten, "shards_removed": stub.removed, "rewrite_bytes": stub.bytes}


def step_stats(root: Path) -> dict:
    """`seerlike ingest-stats` (without --verify): counts and size quantiles from the manifest."""
    from sharding.stats import manifest_stats

    yield_point()
    t0 = time.perf_counter()
    s = manifest_stats(str(root / "ingest"))
    return {"seconds": time.perf_counter() - t0, "rows": s["rows"], "shards": s["shards"]}


def step_verify(root: Path) -> dict:
    """`ingest-stats --verify`'s manifest side: no tar exists, so every shard reports missing."""
    from sharding.stats import verify

    yield_point()
    t0 = time.perf_counter()
    problems = verify(str(root / "ingest"))
    return {"seconds": time.perf_counter() - t0, "problems": len(problems)}


def step_verify_part(root: Path) -> dict:
    """One job of an 8-job `ingest-stats --verify --part I/8` array (part 3): its manifest side."""
    from sharding.stats import verify

    yield_point()
    t0 = time.perf_counter()
    problems = verify(str(root / "ingest"), part=(3, 8))
    return {"seconds": time.perf_counter() - t0, "problems": len(problems)}


# ---------------------------------------------------------------- reading for training


def step_shard_urls(root: Path) -> dict:
    """`sharding.manifest.shard_urls`: the written shards of a dataset."""
    from sharding.manifest import shard_urls

    yield_point()
    t0 = time.perf_counter()
    urls = shard_urls(str(root / "ingest"))
    return {"seconds": time.perf_counter() - t0, "shards": len(urls)}


def step_list_shards(root: Path) -> dict:
    """What every training rank does at start: shard URLs and their sample counts."""
    from seerlike.data.sources import resolve

    yield_point()
    t0 = time.perf_counter()
    src = resolve(str(root / "ingest"))
    return {"seconds": time.perf_counter() - t0, "shards": len(src.urls), "samples": len(src)}


def _synthetic_shards(n: int):
    from seerlike.data.sources import ShardSource

    s = -(-n // 940)
    counts = (900 + (np.arange(s) * 2654435761 % 80)).tolist()
    return ShardSource([f"s3://bucket/ds/shards/{i // 10:06d}-{i % 10:04d}.tar" for i in range(s)], counts)


def step_epoch_plan(root: Path, n: int) -> dict:
    """The epoch's shard permutation and split over 8 ranks x 8 workers, on every rank at start."""
    from seerlike.data import shards

    src = _synthetic_shards(n)
    yield_point()
    t0 = time.perf_counter()
    plan = shards.plan_epoch(src, epoch=3, seed=0, world_size=8, num_workers=8, batch_size=32)
    return {"seconds": time.perf_counter() - t0, "steps": plan.steps, "shards": len(src.urls)}


def step_resume_positions(root: Path, n: int) -> dict:
    """The exact-resume position one worker reports with each of its batches, over its epoch (8 x 8 slots)."""
    from seerlike.data import pipeline, shards

    src = _synthetic_shards(n)
    plan = shards.plan_epoch(src, epoch=3, seed=0, world_size=8, num_workers=8, batch_size=32)
    wp = plan.workers[5][3]
    yield_point()
    t0 = time.perf_counter()
    state_bytes = 0
    for b in range(1, wp.quota + 1):
        pos = pipeline._read_position(src, wp, b * 32, 1000)
        state_bytes = max(state_bytes, len(json.dumps(pos)))
    return {"seconds": time.perf_counter() - t0, "worker_shards": len(wp.shards), "worker_batches": wp.quota,
            "position_json_bytes": state_bytes}


def _keys_of_some_shards(root: Path, n_shards: int) -> list[str]:
    import pyarrow.parquet as pq

    parts = sorted((root / "cluster" / "labels").glob("*.parquet"))
    picks = np.random.default_rng(0).choice(len(parts), size=min(n_shards, len(parts)), replace=False)
    return [k for i in sorted(picks) for k in pq.read_table(parts[i], columns=["key"])["key"].to_pylist()]


def step_pseudo_labels(root: Path) -> dict:
    """ClusterFit training's join: data.labels loaded by a rank, then a worker's lookups."""
    from seerlike.pseudo_labels import label_map

    keys = _keys_of_some_shards(root, 20)
    yield_point()
    t0 = time.perf_counter()
    labels = label_map(root / "cluster")
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    found = sum(labels.get(k) is not None for k in keys)
    look_s = time.perf_counter() - t0
    return {"seconds": load_s + look_s, "load_seconds": load_s, "lookup_seconds": look_s,
            "lookups": len(keys), "found": found}


def step_contact_sheets(root: Path) -> dict:
    """`seerlike cluster --contact-sheets 12`: pick 12 clusters and 12 members each from the labels.

    The image lookup runs over a one-image folder (no image of the corpus exists), so what
    is measured is the pick over the labels.
    """
    from PIL import Image

    from seerlike.eval.members import cluster_members

    images = root / "contact-images"
    images.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(images / "a.png")
    yield_point()
    t0 = time.perf_counter()
    groups = cluster_members(root / "cluster", str(images), clusters=12, per_cluster=12)
    return {"seconds": time.perf_counter() - t0, "clusters": sum(len(rows) for rows in groups.values())}


def step_feature_index(root: Path) -> dict:
    """`seerlike extract`'s finalize: index.parquet over every chunk."""
    from seerlike.eval import features as fstore

    out = root / "features"
    meta = json.loads((out / fstore.META).read_text())
    meta.pop("chunks", None)
    meta.pop("num_samples", None)
    yield_point()
    t0 = time.perf_counter()
    meta = fstore.finalize(out, meta)
    return {"seconds": time.perf_counter() - t0, "rows": meta["num_samples"], "chunks": len(meta["chunks"])}


def step_kmeans_sample(root: Path) -> dict:
    """The k-means training sample: 262,144 random rows (k=1024 x 256) drawn from every chunk."""
    from seerlike.eval.cluster import draw_sample
    from seerlike.eval.features import FeatureStore

    store = FeatureStore(root / "features")
    yield_point()
    t0 = time.perf_counter()
    x = draw_sample(store, 262_144, 0)
    return {"seconds": time.perf_counter() - t0, "rows": int(x.shape[0]), "units": len(store.units)}


def step_kmeans(root: Path) -> dict:
    """`seerlike cluster` on one rank: train k=256 on 16,384 rows, assign every row, write stats."""
    from seerlike.eval.cluster import KMeansConfig, run_kmeans

    out = root / "cluster-run"
    shutil.rmtree(out, ignore_errors=True)
    cfg = KMeansConfig(k=256, niter=4, max_points_per_centroid=64, gpu=False, threads=1)
    yield_point()
    t0 = time.perf_counter()
    stats = run_kmeans(root / "features", out, cfg, progress=False)
    secs = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": secs, "train_seconds": stats["train_s"], "assigned": stats["num_assigned"]}


# ---------------------------------------------------------------- launchers


def step_jobs_status(root: Path, n: int) -> dict:
    """`seerlike jobs status` over an ingest's records: one array task per chunk plus the merge.

    ``sacct`` is a shell script on PATH answering COMPLETED (no Slurm here): the figure is
    the number of sacct calls and the time with a ~2 ms sacct; a real one costs 50-500 ms.
    """
    import argparse
    import contextlib
    import io

    from launchers import jobs

    n_tasks = -(-n // 10_000)
    logs = root / "jobs"
    shutil.rmtree(logs, ignore_errors=True)
    (logs / "index").mkdir(parents=True)
    for t in range(n_tasks):
        rec = {"job_id": f"4242_{t}", "cluster": "slurm", "stage": "ingest", "argv": [], "run_dir": "",
               "log_folder": str(logs / "4242_{t}"), "log_dir": str(logs), "tasks": 1, "submitted_at": t}
        (logs / "index" / f"4242_{t}.json").write_text(json.dumps(rec))
    calls = root / "sacct-calls"
    bindir = root / "bin"
    bindir.mkdir(exist_ok=True)
    sacct = bindir / "sacct"
    # like sacct -X: an array task id gives its line, an array id the lines of all its tasks
    sacct.write_text('#!/bin/sh\necho x >> "%s"\n'
                     'for a in "$@"; do case "$prev" in -j) ids="$a";; esac; prev="$a"; done\n'
                     'echo "$ids" | tr , "\\n" | while read j; do case "$j" in\n'
                     '  *_*) echo "$j|COMPLETED";;\n'
                     '  *) seq 0 %d | sed "s/^/${j}_/; s/$/|COMPLETED/";;\n'
                     'esac; done\n' % (calls, n_tasks - 1))
    sacct.chmod(0o755)
    os.environ["PATH"] = f"{bindir}:{os.environ['PATH']}"
    calls.write_text("")
    yield_point()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        jobs.run(argparse.Namespace(action="status", job=None, log_dir=str(logs)))
    secs = time.perf_counter() - t0
    n_calls = len(calls.read_text().splitlines())
    shutil.rmtree(logs, ignore_errors=True)
    return {"seconds": secs, "records": n_tasks, "sacct_calls": n_calls,
            "completed": out.getvalue().count("COMPLETED")}


STEPS = {name[5:]: fn for name, fn in globals().items() if name.startswith("step_")}
SIZED = {"epoch_plan", "resume_positions", "jobs_status"}
_start_rss = [0]


_start_cpu = [0.0]


def _cpu() -> float:
    """CPU seconds of this process and its finished children (sacct stubs): load-independent time."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def yield_point() -> None:
    """Marks where the step's own work starts: the RSS and CPU time here are its baseline."""
    _start_rss[0] = rss_bytes()
    _start_cpu[0] = _cpu()


def main(argv: list[str]) -> int:
    step, root, result = argv[0], Path(argv[1]), Path(argv[2])
    n = int(json.loads((root / "size.json").read_text())["n"])
    fn = STEPS[step]
    got = fn(root, n) if step in SIZED else fn(root)
    got["cpu_seconds"] = _cpu() - _start_cpu[0]
    got["start_rss"] = _start_rss[0]
    got["end_rss"] = rss_bytes()
    result.write_text(json.dumps(got))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
