"""Follow-up stages: k-means training sample vs quality, extraction rate vs the decode floor.

    python benchmarks/bench_followup.py [--repeats 3] [--n 200000] [--k 500] [--dim 128]

Rates are per core (work per CPU second of this process, one thread everywhere), so they
hold on a shared machine; wall-clock figures are printed beside them.

1. k-means: faiss trained on k x 32, k x 64, k x 256 rows (the default) and on all N rows
   of a planted mixture (k true centres, unit-normalised like the real features); per
   setting the training CPU time and the quality of the assignment of ALL rows: mean squared
   distance to the nearest centroid, and the agreement with the planted centres (purity).
2. Extraction on cifar10-dev val (1000 real 32 px JPEGs) with resnet10_cifar: the floor is
   decode + centre crop alone plus the forward alone on the ready tensor (batch 256); against
   it the whole `extract` (listing, decode threads, batching, forward, chunk files, index), in
   fp32 and bf16.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from seerlike.eval import cluster
from seerlike.eval.extract import ExtractConfig, decode_view, extract, list_units

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-dev"


def timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def planted(n: int, k: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)).astype(np.float32)
    truth = rng.integers(0, k, n)
    x = centres[truth] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    return cluster._prep(x, True), truth


def purity(assign: np.ndarray, truth: np.ndarray, k: int) -> float:
    table = np.zeros((k, k), np.int64)
    np.add.at(table, (assign, truth), 1)
    return table.max(axis=1).sum() / len(truth)


def bench_kmeans(n: int, k: int, dim: int, repeats: int) -> None:
    x, truth = planted(n, k, dim)
    rows = {}
    for rep in range(repeats):
        for label, m in (("k x 32", k * 32), ("k x 64", k * 64), ("k x 256 (default)", k * 256), ("all", n)):
            m = min(m, n)
            sample = x[np.random.default_rng(rep).choice(n, m, replace=False)]
            cfg = cluster.KMeansConfig(k=k, niter=20, seed=rep, max_points_per_centroid=max(256, m // k + 1), threads=1)
            (cent, _), cpu, wall = timed(lambda: cluster.train_centroids(sample, cfg))
            assign, dist = cluster.assign(cluster.assignment_index(cent, gpu=False), x)
            rows.setdefault(label, []).append((m, cpu, wall, float(dist.mean()), purity(assign, truth, k)))
    print(f"\nk-means: N={n}, dim={dim}, k={k}, 20 iterations, medians of {repeats}")
    print(f"| training rows | rows | train CPU s | train wall s | mean sq. distance (all N) | purity | CPU vs all |")
    print("|---|---|---|---|---|---|---|")
    all_cpu = statistics.median(r[1] for r in rows["all"])
    for label, rs in rows.items():
        med = [statistics.median(r[i] for r in rs) for i in range(5)]
        print(f"| {label} | {int(med[0])} | {med[1]:.2f} | {med[2]:.2f} | {med[3]:.4f} | {med[4]:.3f} | {med[1] / all_cpu:.2f} |")


def bench_extract(repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "val.csv"
        rows = list(csv.DictReader(open(DATA / "val.csv")))
        with open(data, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            for r in rows:
                w.writerow([str(DATA / r["path"]), r["label"]])
        samples = [s for u in list_units(str(data)) for s in u.read()]
        n = len(samples)
        res = {}
        from seerlike.eval.extract import feature_fn, to_batch
        from seerlike.checkpoints import load_backbone

        loaded = load_backbone("random:resnet10_cifar")
        for rep in range(repeats):
            views, cpu, wall = timed(lambda: [decode_view(s, 32, 32) for s in samples])
            res.setdefault("decode + centre crop only", []).append((cpu, wall))
            x = to_batch(views)
            for prec in ("fp32", "bf16"):
                fn = feature_fn(loaded, "res5", prec)
                with torch.no_grad():
                    _, cpu, wall = timed(lambda: [fn(b) for b in x.split(256)])
                res.setdefault(f"forward only, {prec}", []).append((cpu, wall))
            for prec in ("fp32", "bf16"):
                cfg = ExtractConfig(layer="res5", image_size=32, resize=32, batch_size=256, workers=1, precision=prec)
                out = Path(tmp) / f"f-{prec}-{rep}"
                _, cpu, wall = timed(lambda: extract("random:resnet10_cifar", str(data), out, cfg, progress=False))
                res.setdefault(f"extract res5, {prec}", []).append((cpu, wall))
        print(f"\nextraction: {n} cifar10-dev val JPEGs (32 px), resnet10_cifar, batch 256, medians of {repeats}")
        print("| pipeline | img/s per core | img/s wall | vs floor = decode + forward (per core) |")
        print("|---|---|---|---|")
        cpu = {label: statistics.median(c for c, _ in rs) for label, rs in res.items()}
        for label, rs in res.items():
            prec = "bf16" if "bf16" in label else "fp32"
            ratio = ""
            if label.startswith("extract"):
                ratio = f"{(cpu['decode + centre crop only'] + cpu[f'forward only, {prec}']) / cpu[label]:.2f}"
            print(f"| {label} | {n / cpu[label]:.0f} | {n / statistics.median(w for _, w in rs):.0f} | {ratio} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--k", type=int, default=500)
    p.add_argument("--dim", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(1)
    bench_kmeans(args.n, args.k, args.dim, args.repeats)
    bench_extract(args.repeats)


if __name__ == "__main__":
    main()
