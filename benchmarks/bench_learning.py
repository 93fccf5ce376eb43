"""Learning quality: does pretraining beat random init within 15 CPU-minutes?

On ../shared/data/cifar10-dev: SwAV and BYOL pretraining of resnet10_cifar on `train` (no
labels) for ``--minutes`` of wall time on 2 ranks x 1 thread (7.5 min x 2 cores = 15
CPU-minutes by default), then ClusterFit on k-means pseudo-labels and distillation into the
half-width student, each scored by kNN top-1 on `val` with the features of `train` as the
memory bank (k 20, cosine, T 0.07) against the same architecture at random init.

Every (method, seed) is one `seerlike quickstart` pipeline with explicit step counts, so the
benchmark measures exactly what users run. Targets: pretraining >= +10 points over random
init; ClusterFit >= the pretrained model it starts from; the distilled student >= its own
random init, and compared with its teacher.

    python benchmarks/bench_learning.py                       # both methods, seed 0, 7.5 min each
    python benchmarks/bench_learning.py --seeds 0,1,2 --methods swav
    python benchmarks/bench_learning.py --minutes 1 --followup-minutes 0.5   # a quick calibration

A (method, seed) takes about ``minutes`` + 2 x ``followup-minutes`` + 2.5 minutes of wall time.
Run it on an otherwise idle 2-core machine: the step counts come from the per-step times
measured there (seerlike.quickstart.SECONDS_PER_STEP), so a busy machine trains as many
steps, only slower.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seerlike.cli import main as seerlike_main  # noqa: E402
from seerlike.quickstart import SECONDS_PER_STEP  # noqa: E402


def run_one(method: str, seed: int, args: argparse.Namespace) -> dict:
    run_dir = Path(args.run_root) / f"{method}_seed{seed}_{args.minutes:g}min"
    steps = {
        "pretrain": max(10, int(args.minutes * 60 / SECONDS_PER_STEP[method])),
        "clusterfit": max(10, int(args.followup_minutes * 60 / SECONDS_PER_STEP["clusterfit"])),
        "distill": max(10, int(args.followup_minutes * 60 / SECONDS_PER_STEP["distill"])),
    }
    argv = ["quickstart", "--method", method, "--run-dir", str(run_dir), "--seed", str(seed), "--quiet",
            "--pretrain-steps", str(steps["pretrain"]), "--clusterfit-steps", str(steps["clusterfit"]),
            "--distill-steps", str(steps["distill"]), "--k", str(args.k)]
    for flag in ("images", "eval_train", "eval_val"):
        if getattr(args, flag):
            argv += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    t0 = time.monotonic()
    if seerlike_main(argv) != 0:
        raise SystemExit(f"quickstart failed for {method} seed {seed}; see {run_dir}/jobs")
    wall = time.monotonic() - t0
    results = json.loads((run_dir / "results.json").read_text())
    m = results["models"]
    return {"method": method, "seed": seed, "steps": steps, "wall_s": round(wall, 1),
            "pretrain_s": m[method]["seconds"], "clusterfit_s": m["clusterfit"]["seconds"],
            "distill_s": m["distilled"]["seconds"], "random": m["random_init"]["knn_top1"],
            "pretrained": m[method]["knn_top1"], "clusterfit": m["clusterfit"]["knn_top1"],
            "distilled": m["distilled"]["knn_top1"], "random_student": m["random_init_student"]["knn_top1"],
            "run_dir": str(run_dir)}


def table(rows: list[dict]) -> str:
    head = (f"{'method':6} {'seed':>4} {'steps':>6} {'pre s':>6} {'random':>7} {'pretr':>6} {'gain':>6} "
            f"{'cfit':>6} {'d cfit':>6} {'distil':>6} {'d tea':>6} {'rnd st':>6} {'d st':>6}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['method']:6} {r['seed']:>4} {r['steps']['pretrain']:>6} {r['pretrain_s']:6.0f} "
                     f"{r['random']:7.1f} {r['pretrained']:6.1f} {r['pretrained'] - r['random']:+6.1f} "
                     f"{r['clusterfit']:6.1f} {r['clusterfit'] - r['pretrained']:+6.1f} {r['distilled']:6.1f} "
                     f"{r['distilled'] - r['clusterfit']:+6.1f} {r['random_student']:6.1f} "
                     f"{r['distilled'] - r['random_student']:+6.1f}")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    """Median over seeds of each gain, against its target."""
    out = []
    for method in sorted({r["method"] for r in rows}):
        rs = [r for r in rows if r["method"] == method]
        med = {k: statistics.median(v(r) for r in rs) for k, v in {
            "gain": lambda r: r["pretrained"] - r["random"],
            "cfit_vs_pre": lambda r: r["clusterfit"] - r["pretrained"],
            "dist_vs_teacher": lambda r: r["distilled"] - r["clusterfit"],
            "dist_vs_random": lambda r: r["distilled"] - r["random_student"]}.items()}
        out.append(f"{method} (median of {len(rs)} seed(s)): gain over random init {med['gain']:+.1f} "
                   f"[{'PASS' if med['gain'] >= 10 else 'FAIL'} >= +10]; ClusterFit vs {method} "
                   f"{med['cfit_vs_pre']:+.1f} [{'PASS' if med['cfit_vs_pre'] >= 0 else 'FAIL'} >= 0]; "
                   f"distilled vs teacher {med['dist_vs_teacher']:+.1f} "
                   f"[{'PASS' if med['dist_vs_teacher'] >= 0 else 'FAIL'} >= 0], vs its random init "
                   f"{med['dist_vs_random']:+.1f}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="swav,byol")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--minutes", type=float, default=7.5, help="pretraining wall minutes on 2 cores (x2 = CPU-minutes)")
    p.add_argument("--followup-minutes", type=float, default=1.5, help="wall minutes each for ClusterFit and distillation")
    p.add_argument("--k", type=int, default=100, help="k-means clusters")
    p.add_argument("--run-root", default="runs/bench_learning", help="one quickstart run folder per method and seed")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--images", help="pretraining images (default: cifar10-dev train, as the quickstart)")
    p.add_argument("--eval-train", help="kNN memory bank (default: cifar10-dev train.csv)")
    p.add_argument("--eval-val", help="kNN queries (default: cifar10-dev val.csv)")
    args = p.parse_args()
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in args.methods.split(","):
            rows.append(run_one(method.strip(), seed, args))
            print(table(rows[-1:]), flush=True)
    print(f"\nkNN top-1 (%) on cifar10-dev val, k 20, cosine, T 0.07; pretraining {args.minutes:g} min x 2 ranks "
          f"(1 thread each), ClusterFit and distillation {args.followup_minutes:g} min each\n")
    print(table(rows))
    print()
    print("\n".join(verdict(rows)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
