"""faiss k-means on extracted features -> pseudo-labels (`seerlike cluster FEATURES --k K --out DIR`).

ClusterFit as reproduced in VISSL: L2-normalised res5 features, 16,000 clusters,
50 iterations. Centroids are trained on a random sample of the features (by default
``k x 256`` rows, faiss's own cap per centroid), then every feature is assigned to its
nearest centroid in a chunked pass (ranks split the chunks when run distributed).

Output directory:
- ``centroids.npy`` float32 ``(k, dim)``;
- ``labels/features-{unit}.parquet``, one part per feature chunk, columns ``key`` (str),
  ``cluster`` (int32), ``distance`` (float32, squared L2 to the centroid, on normalised
  features when ``normalize``); read them all with :func:`seerlike.pseudo_labels.read_labels`;
- ``labels_index.parquet``: rows and smallest / largest key of every part, so training finds a
  key's part without loading the others (:func:`seerlike.pseudo_labels.label_map`);
- ``cluster_stats.json``: sizes (min/median/max, empty clusters, largest and smallest),
  the k-means objective and timings, and the full size list.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seerlike import config
from seerlike.config import ConfigError
from seerlike.eval.features import FeatureStore
from seerlike.progress import Progress
from seerlike.pseudo_labels import label_map, read_labels, write_index  # noqa: F401 - label_map, read_labels: ClusterFit's data reads them here
from seerlike.storage import atomic_write, write_bytes

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
    max_sample_gb: float = 16.0
    """Cap on the default training sample in memory (rows x dim x 4 bytes); 0 = none. An explicit sample wins."""
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
        if self.max_sample_gb < 0:
            raise ValueError(f"max_sample_gb must be >= 0, got {self.max_sample_gb}")

    def sample_rows(self, dim: int) -> int:
        """Rows of the training sample: ``sample``, else k x max_points_per_centroid within max_sample_gb.

        ClusterFit's 16,000 clusters x 256 rows of 2,048-d ResNet-50 features are 33.5 GB; the
        cap keeps the one allocation of `seerlike cluster` that does not shrink with the data on
        a 32 GB node (docs/scale.md, "Steps that see the whole corpus").
        """
        if self.sample is not None:
            return self.sample
        n = self.k * self.max_points_per_centroid
        if self.max_sample_gb:
            cap = int(self.max_sample_gb * 1e9 // (4 * max(dim, 1)))
            if cap < n:
                if cap < self.k:
                    raise ConfigError(f"max_sample_gb={self.max_sample_gb} holds {cap} rows of {dim} dims, fewer than "
                                      f"k={self.k}: raise max_sample_gb or lower k")
                log.info("k-means sample capped at %d rows (max_sample_gb=%s) instead of k x %d = %d",
                         cap, self.max_sample_gb, self.max_points_per_centroid, n)
                n = cap
        return n


def _faiss():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise
    import faiss

    return faiss


def _prep(x: np.ndarray, normalize: bool) -> np.ndarray:
    """float32 rows, L2-normalised in place when asked (callers pass arrays they own: no second copy)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if normalize:
        for start in range(0, len(x), 16384):  # row blocks: the norms never need a sample-sized temporary
            block = x[start:start + 16384]
            block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
    return x


def draw_sample(store: FeatureStore, n: int, seed: int) -> np.ndarray:
    """``n`` distinct random rows of the whole store, read chunk by chunk (memory-mapped)."""
    sizes = np.array(store.chunk_sizes())
    total = int(sizes.sum())
    rows = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    # rows is sorted: one searchsorted splits it by chunk (a mask per chunk would cost rows x chunks)
    bounds = np.searchsorted(rows, starts)
    parts = []
    for i, unit in enumerate(store.units):
        sel = rows[bounds[i]:bounds[i + 1]] - starts[i]
        if sel.size:
            parts.append(np.asarray(store.features(unit)[sel]))
    return np.concatenate(parts)


def train_centroids(x: np.ndarray, cfg: KMeansConfig,
                    on_iteration: Callable[[int], None] | None = None) -> tuple[np.ndarray, float]:
    """faiss k-means on the rows of ``x``; returns ``(centroids, final objective)``.

    With one restart the iterations run one faiss call each, every call starting from the
    last one's centroids, so ``on_iteration(1)`` can report progress; faiss draws the same
    training sample and splits empty clusters the same way in every call, so the centroids
    are exactly those of one call with all the iterations (a unit test checks this).
    """
    faiss = _faiss()
    if x.shape[0] < cfg.k:
        raise ConfigError(f"cannot make {cfg.k} clusters from {x.shape[0]} features; lower --k")
    if cfg.threads:
        faiss.omp_set_num_threads(cfg.threads)
    gpu = cfg.gpu if cfg.gpu is not None else faiss.get_num_gpus() > 0

    def kmeans(niter: int):
        return faiss.Kmeans(x.shape[1], cfg.k, niter=niter, nredo=cfg.nredo, seed=cfg.seed, gpu=gpu,
                            max_points_per_centroid=cfg.max_points_per_centroid, verbose=False)

    if on_iteration is None or cfg.nredo > 1:
        km = kmeans(cfg.niter)
        km.train(x)
        if on_iteration is not None:
            on_iteration(cfg.niter)
        objective = float(km.obj[-1]) if len(km.obj) else float("nan")
        return np.ascontiguousarray(km.centroids, dtype=np.float32), objective
    centroids, objective = None, float("nan")
    for _ in range(cfg.niter):
        km = kmeans(1)
        km.train(x, init_centroids=centroids)
        centroids = km.centroids.copy()
        objective = float(km.obj[-1]) if len(km.obj) else objective
        on_iteration(1)
    return np.ascontiguousarray(centroids, dtype=np.float32), objective


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


def run_kmeans(features: str | os.PathLike, out: str | os.PathLike, cfg: KMeansConfig,
               rank: int = 0, world_size: int = 1, barrier=None, progress: bool = True) -> dict:
    """Train centroids (rank 0), assign every chunk (ranks split them), write stats (rank 0).

    ``barrier`` is called between the phases when several ranks share the work.
    """
    store = FeatureStore(features)
    out = Path(os.path.abspath(out))
    (out / "labels").mkdir(parents=True, exist_ok=True)
    barrier = barrier or (lambda: None)
    cent_path = out / "centroids.npy"
    timings = {}
    if rank == 0:
        n = cfg.sample_rows(store.dim)
        t0 = time.perf_counter()
        sample = _prep(draw_sample(store, n, cfg.seed), cfg.normalize)
        log.info("k-means: %d clusters, %d iterations on %d of %d features (dim %d)",
                 cfg.k, cfg.niter, sample.shape[0], len(store), store.dim)
        with Progress(cfg.niter, f"k-means {cfg.k} clusters", unit="iter", enabled=progress) as bar:
            centroids, objective = train_centroids(sample, cfg, on_iteration=bar.update)
        timings["train_s"] = time.perf_counter() - t0
        with atomic_write(cent_path) as tmp, open(tmp, "wb") as f:
            np.save(f, centroids)
        write_bytes(out / ".train.json", json.dumps({"objective": objective, "sample": int(sample.shape[0]),
                                                     **timings}).encode())
    barrier()
    index = assignment_index(np.load(cent_path), cfg.gpu)
    t0 = time.perf_counter()
    mine = [(i, chunk) for i, chunk in enumerate(store.units) if i % world_size == rank]
    sizes_of = store.chunk_sizes()
    with Progress(sum(sizes_of[i] for i, _ in mine), "k-means assignment", unit="feat",
                  enabled=progress and rank == 0) as bar:
        for i, chunk in mine:
            idx_table = pq.read_table(store.path / f"features-{chunk}.parquet", columns=["key"])
            cluster, distance = assign(index, _prep(store.features(chunk, mmap=False), cfg.normalize))
            table = pa.table({"key": idx_table["key"], "cluster": pa.array(cluster), "distance": pa.array(distance)})
            with atomic_write(out / "labels" / f"features-{chunk}.parquet") as tmp:
                pq.write_table(table, tmp)
            bar.update(len(cluster))
    log.info("rank %d assigned its chunks in %.1fs", rank, time.perf_counter() - t0)
    barrier()
    if rank != 0:
        return {}
    sizes, total_distance, num = write_index(out, cfg.k)  # one label part in memory at a time
    train_info = json.loads((out / ".train.json").read_text())
    stats = {
        "features": os.path.abspath(store.path), "layer": store.meta.get("layer"), "config": config.to_dict(cfg),
        "num_features": len(store), "dim": store.dim, **train_info,
        "mean_distance": total_distance / num if num else 0.0,
        **cluster_stats(sizes), "sizes": sizes.tolist(),
    }
    (out / ".train.json").unlink()
    with atomic_write(out / "cluster_stats.json") as tmp:
        tmp.write_text(json.dumps(stats, indent=2) + "\n")
    return stats
