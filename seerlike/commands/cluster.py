"""`seerlike cluster FEATURES --k K --out DIR`: faiss k-means -> pseudo-labels (seerlike.eval.cluster)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from seerlike.config import ConfigError
from seerlike.eval.cluster import KMeansConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("features", help="features directory written by `seerlike extract`")
    p.add_argument("--k", type=int, default=KMeansConfig.k, help="number of clusters (ClusterFit: 16000)")
    p.add_argument("--out", required=True, help="output directory (centroids, labels/, cluster_stats.json)")
    p.add_argument("--niter", type=int, default=KMeansConfig.niter, help="k-means iterations")
    p.add_argument("--sample", type=int, default=None, help="rows to train the centroids on (default k x 256, at most 16 GB of features: KMeansConfig.max_sample_gb)")
    p.add_argument("--no-normalize", action="store_true", help="cluster raw features instead of L2-normalised ones")
    p.add_argument("--seed", type=int, default=0, help="k-means initialisation and sample seed")
    p.add_argument("--threads", type=int, default=None, help="faiss CPU threads")
    p.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto", help="faiss GPU indexes")
    p.add_argument("--contact-sheets", type=int, default=0, metavar="N",
                   help="also draw contact sheets of N clusters (largest, smallest, random) from --images")
    p.add_argument("--images", default=None, help="the data the features came from (for contact sheets)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")


def build_config(args: argparse.Namespace) -> KMeansConfig:
    try:
        return KMeansConfig(k=args.k, niter=args.niter, sample=args.sample, normalize=not args.no_normalize,
                            seed=args.seed, threads=args.threads, gpu={"auto": None, "yes": True, "no": False}[args.gpu])
    except ValueError as e:
        raise ConfigError(str(e)) from None


def preflight(args: argparse.Namespace) -> None:
    """The settings and the inputs, checked before anything is written or a job is queued."""
    from seerlike.preflight import check_data
    from seerlike.eval.features import FeatureStore

    build_config(args)
    try:
        FeatureStore(args.features)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if args.contact_sheets:
        if not args.images:
            raise ConfigError("--contact-sheets needs --images (the data the features were extracted from)")
        check_data(args.images, "--images")


def run(args: argparse.Namespace) -> int:
    from seerlike.engine.dist import init_distributed, teardown
    from seerlike.eval.cluster import run_kmeans
    from seerlike.eval.members import cluster_members

    cfg = build_config(args)
    preflight(args)
    progress = not args.no_progress
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        info = init_distributed()
        stats = run_kmeans(args.features, args.out, cfg, info.rank, info.world_size, barrier=dist.barrier,
                           progress=progress)
        teardown()
        if info.rank != 0:
            return 0
    else:
        stats = run_kmeans(args.features, args.out, cfg, progress=progress)
    if args.contact_sheets:
        from seerlike.plots import contact_sheets

        groups = cluster_members(args.out, args.images, clusters=args.contact_sheets)
        contact_sheets(groups, Path(args.out) / "contact_sheets")
    print(json.dumps({k: stats[k] for k in ("num_features", "num_clusters", "empty_clusters", "size_min",
                                             "size_median", "size_max", "effective_clusters", "objective")}, indent=2))
    return 0
