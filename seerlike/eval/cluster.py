"""`seerlike cluster FEATURES --k K --out DIR`: faiss k-means -> pseudo-labels.

ClusterFit as reproduced in VISSL: L2-normalised res5 features, 16,000 clusters,
50 iterations. Centroids are trained on a random sample of the features (by default
``k x 256`` rows, faiss's own cap per centroid), then every feature is assigned to its
nearest centroid in a chunked pass (ranks split the chunks when run distributed).

Output directory:
- ``centroids.npy`` float32 ``(k, dim)``;
- ``labels/features-{unit}.parquet``, one part per feature chunk, columns ``key`` (str),
  ``cluster`` (int32), ``distance`` (float32, squared L2 to the centroid, on normalised
  features when ``normalize``); read them all with :func:`read_labels`;
- ``cluster_stats.json``: sizes (min/median/max, empty clusters, largest and smallest),
  the k-means objective and timings, and the full size list.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seerlike import config
from seerlike.config import ConfigError
from seerlike.eval.features import FeatureStore
from seerlike.storage import atomic_write

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class KMeansConfig:
    k: int = 16000
    """Number of clusters (ClusterFit: 16,000)."""
    niter: int = 50
    """k-means iterations (ClusterFit: 50)."""
    sample: int | None = None
    """Feature rows the centroids are trained on; None = min(all, k x max_points_per_centroid)."""
    max_points_per_centroid: int = 256
    """faiss's cap on training rows per centroid (it subsamples above it)."""
    normalize: bool = True
    """L2-normalise features before clustering and assignment (ClusterFit/VISSL do)."""
    nredo: int = 1
    """k-means restarts; the best objective wins."""
    seed: int = 0
    """Seeds the training sample and faiss's initialisation."""
    gpu: bool | None = None
    """Use faiss GPU indexes; None = whenever faiss sees a GPU."""
    threads: int | None = None
    """OpenMP threads for faiss on CPU; None = faiss's default."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.niter < 1:
            raise ValueError(f"niter must be >= 1, got {self.niter}")
        if self.sample is not None and self.sample < self.k:
            raise ValueError(f"sample ({self.sample}) must hold at least k ({self.k}) rows")


def _faiss():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise
    import faiss

    return faiss


def _prep(x: np.ndarray, normalize: bool) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def draw_sample(store: FeatureStore, n: int, seed: int) -> np.ndarray:
    """``n`` distinct random rows of the whole store, read chunk by chunk (memory-mapped)."""
    sizes = np.array(store.chunk_sizes())
    total = int(sizes.sum())
    rows = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    parts = []
    for i, unit in enumerate(store.units):
        sel = rows[(rows >= starts[i]) & (rows < starts[i + 1])] - starts[i]
        if sel.size:
            parts.append(np.asarray(store.features(unit)[sel]))
    return np.concatenate(parts)


def train_centroids(x: np.ndarray, cfg: KMeansConfig) -> tuple[np.ndarray, float]:
    """faiss k-means on the rows of ``x``; returns ``(centroids, final objective)``."""
    faiss = _faiss()
    if x.shape[0] < cfg.k:
        raise ConfigError(f"cannot make {cfg.k} clusters from {x.shape[0]} features; lower --k")
    if cfg.threads:
        faiss.omp_set_num_threads(cfg.threads)
    gpu = cfg.gpu if cfg.gpu is not None else faiss.get_num_gpus() > 0
    km = faiss.Kmeans(x.shape[1], cfg.k, niter=cfg.niter, nredo=cfg.nredo, seed=cfg.seed, gpu=gpu,
                      max_points_per_centroid=cfg.max_points_per_centroid, verbose=False)
    km.train(x)
    objective = float(km.obj[-1]) if len(km.obj) else float("nan")
    return np.ascontiguousarray(km.centroids, dtype=np.float32), objective


def assignment_index(centroids: np.ndarray, gpu: bool | None = None):
    faiss = _faiss()
    index = faiss.IndexFlatL2(centroids.shape[1])
    if (gpu if gpu is not None else faiss.get_num_gpus() > 0):
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(centroids)
    return index


def assign(index, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid and its squared L2 distance for every row."""
    dist, idx = index.search(x, 1)
    return idx[:, 0].astype(np.int32), dist[:, 0].astype(np.float32)


def cluster_stats(sizes: np.ndarray, top: int = 10) -> dict:
    order = np.argsort(-sizes, kind="stable")
    nonempty = sizes[sizes > 0]
    p = nonempty / max(nonempty.sum(), 1)
    return {
        "num_clusters": int(sizes.size),
        "num_assigned": int(sizes.sum()),
        "empty_clusters": int((sizes == 0).sum()),
        "size_min": int(sizes.min()) if sizes.size else 0,
        "size_median": float(np.median(sizes)) if sizes.size else 0.0,
        "size_mean": float(sizes.mean()) if sizes.size else 0.0,
        "size_max": int(sizes.max()) if sizes.size else 0,
        # exp(entropy): the number of equally sized clusters with the same spread
        "effective_clusters": float(np.exp(-(p * np.log(p)).sum())) if p.size else 0.0,
        "largest": [[int(c), int(sizes[c])] for c in order[:top]],
        "smallest": [[int(c), int(sizes[c])] for c in order[::-1][:top]],
    }


def read_labels(path: str | os.PathLike) -> pa.Table:
    """The pseudo-labels (``key, cluster, distance``) of a cluster output dir, labels dir or parquet file."""
    path = Path(path)
    if (path / "labels").is_dir():
        path = path / "labels"
    if not path.exists():
        raise FileNotFoundError(f"no pseudo-labels at {path}; produce them with `seerlike cluster`")
    if path.is_dir():
        parts = sorted(path.glob("*.parquet"))
        if not parts:
            raise FileNotFoundError(f"no parquet parts in {path}")
        return pa.concat_tables([pq.read_table(p) for p in parts])
    return pq.read_table(path)


def label_map(path: str | os.PathLike) -> dict[str, int]:
    """``{key: cluster}`` of the pseudo-labels at ``path`` (what ClusterFit training joins on)."""
    t = read_labels(path)
    return dict(zip(t["key"].to_pylist(), t["cluster"].to_pylist()))


def run_kmeans(features: str | os.PathLike, out: str | os.PathLike, cfg: KMeansConfig,
               rank: int = 0, world_size: int = 1, barrier=None) -> dict:
    """Train centroids (rank 0), assign every chunk (ranks split them), write stats (rank 0).

    ``barrier`` is called between the phases when several ranks share the work.
    """
    store = FeatureStore(features)
    out = Path(out)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    barrier = barrier or (lambda: None)
    cent_path = out / "centroids.npy"
    timings = {}
    if rank == 0:
        n = cfg.sample if cfg.sample is not None else cfg.k * cfg.max_points_per_centroid
        t0 = time.perf_counter()
        sample = _prep(draw_sample(store, n, cfg.seed), cfg.normalize)
        log.info("k-means: %d clusters, %d iterations on %d of %d features (dim %d)",
                 cfg.k, cfg.niter, sample.shape[0], len(store), store.dim)
        centroids, objective = train_centroids(sample, cfg)
        timings["train_s"] = time.perf_counter() - t0
        with atomic_write(cent_path) as tmp, open(tmp, "wb") as f:
            np.save(f, centroids)
        (out / ".train.json").write_text(json.dumps({"objective": objective, "sample": int(sample.shape[0]), **timings}))
    barrier()
    index = assignment_index(np.load(cent_path), cfg.gpu)
    t0 = time.perf_counter()
    for i, chunk in enumerate(store.units):
        if i % world_size != rank:
            continue
        idx_table = pq.read_table(store.path / f"features-{chunk}.parquet", columns=["key"])
        cluster, distance = assign(index, _prep(store.features(chunk, mmap=False), cfg.normalize))
        table = pa.table({"key": idx_table["key"], "cluster": pa.array(cluster), "distance": pa.array(distance)})
        with atomic_write(out / "labels" / f"features-{chunk}.parquet") as tmp:
            pq.write_table(table, tmp)
    log.info("rank %d assigned its chunks in %.1fs", rank, time.perf_counter() - t0)
    barrier()
    if rank != 0:
        return {}
    labels = read_labels(out)
    sizes = np.bincount(labels["cluster"].to_numpy(), minlength=cfg.k)
    train_info = json.loads((out / ".train.json").read_text())
    stats = {
        "features": str(store.path), "layer": store.meta.get("layer"), "config": config.to_dict(cfg),
        "num_features": len(store), "dim": store.dim, **train_info,
        "mean_distance": float(labels["distance"].to_numpy().mean()) if labels.num_rows else 0.0,
        **cluster_stats(sizes), "sizes": sizes.tolist(),
    }
    (out / ".train.json").unlink()
    with atomic_write(out / "cluster_stats.json") as tmp:
        tmp.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


# ---------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("features", help="features directory written by `seerlike extract`")
    p.add_argument("--k", type=int, default=KMeansConfig.k, help="number of clusters (ClusterFit: 16000)")
    p.add_argument("--out", required=True, help="output directory (centroids, labels/, cluster_stats.json)")
    p.add_argument("--niter", type=int, default=KMeansConfig.niter, help="k-means iterations")
    p.add_argument("--sample", type=int, default=None, help="rows to train the centroids on (default k x 256)")
    p.add_argument("--no-normalize", action="store_true", help="cluster raw features instead of L2-normalised ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="faiss CPU threads")
    p.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto", help="faiss GPU indexes")
    p.add_argument("--contact-sheets", type=int, default=0, metavar="N",
                   help="also draw contact sheets of N clusters (largest, smallest, random) from --images")
    p.add_argument("--images", default=None, help="the data the features came from (for contact sheets)")


def run(args: argparse.Namespace) -> int:
    from seerlike.engine.dist import init_distributed, teardown

    try:
        cfg = KMeansConfig(k=args.k, niter=args.niter, sample=args.sample, normalize=not args.no_normalize,
                           seed=args.seed, threads=args.threads, gpu={"auto": None, "yes": True, "no": False}[args.gpu])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        FeatureStore(args.features)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        import torch.distributed as dist

        info = init_distributed()
        stats = run_kmeans(args.features, args.out, cfg, info.rank, info.world_size, barrier=dist.barrier)
        teardown()
        if info.rank != 0:
            return 0
    else:
        stats = run_kmeans(args.features, args.out, cfg)
    if args.contact_sheets:
        if not args.images:
            raise ConfigError("--contact-sheets needs --images (the data the features were extracted from)")
        from seerlike.plots import cluster_contact_sheets

        cluster_contact_sheets(args.out, args.images, Path(args.out) / "contact_sheets", clusters=args.contact_sheets)
    print(json.dumps({k: stats[k] for k in ("num_features", "num_clusters", "empty_clusters", "size_min",
                                             "size_median", "size_max", "effective_clusters", "objective")}, indent=2))
    return 0
