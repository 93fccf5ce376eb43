"""The data rule against fixed resolutions: pretraining at a CPU budget, kNN gain over random init.

Per variant: ingest the images at the variant's working resolution (as the quickstart does),
`seerlike train --recipe tiny_METHOD --nproc 2` for ``--minutes`` of each rank's CPU time
(``loop.budget_clock=cpu``: the steps do not depend on the machine's load), then kNN top-1
(k 20, cosine, T 0.07, pooled features, whole images) of the trained backbone and of the same
architecture at random init, at the variant's resolution and at every ``--also-eval`` size.

Variants (``--variants``, comma-separated):
  today   the recipe as registered (24 px views), images as the ingest keeps them (shorter side <= 512),
          kNN at 32 px: what `seerlike quickstart --no-fit-data` does
  rule    what ``seerlike.recipes.fit_data`` chooses for these images and this budget
  vVrR    views of V px (every group scaled with the first) from images ingested at R px, kNN at R: the
          rule's neighbours

    python benchmarks/bench_fit_data.py --images ../shared/data/imagenette-dev/unlabeled \\
        --eval-train ../shared/data/imagenette-dev/train.csv --eval-val ../shared/data/imagenette-dev/val.csv \\
        --variants today,rule,v32r64 --minutes 7.5 --also-eval 64 --json rows.json

docs/fit_data.md has the figures and docs/benchmarks.md ("Fitting the recipe to the data") the runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seerlike import recipes  # noqa: E402
from seerlike.cli import main as seerlike_main  # noqa: E402
from seerlike.quickstart import ARCH, IMAGE_SIZE, MAX_STEPS, WARMUP, knn_args  # noqa: E402
from seerlike.recipes import fit_data  # noqa: E402


def variant_settings(name: str, stats: fit_data.DataStats, recipe: str, budget_s: float) -> dict:
    """(ingest overrides, training overrides, kNN size, reasons) of one variant."""
    cfg = recipes.get(recipe)
    if name == "today":
        return {"ingest": [], "train": [], "size": IMAGE_SIZE, "views": [v.size for v in cfg.data.augment.views],
                "reasons": ["the recipe as registered, kNN at 32 px"]}
    if name == "rule":
        fit = fit_data.choose(stats, cfg, budget_s=budget_s)
    elif m := re.fullmatch(r"v(\d+)r(\d+)", name):
        view, r = int(m[1]), int(m[2])
        fit = fit_data.choose(stats, cfg, budget_s=budget_s)
        views = [round(v.size * view / cfg.data.augment.views[0].size) for v in cfg.data.augment.views]
        fit = dataclasses.replace(fit, view_sizes=tuple(views), resolution=r, reasons=(f"forced: views {view}, {r} px",))
    else:
        raise SystemExit(f"unknown variant {name!r}: today, rule or vVIEWrRESOLUTION (e.g. v24r48)")
    return {"ingest": [f"resize_short_side={fit.resolution}"], "train": fit_data.overrides(fit, cfg),
            "size": fit.resolution, "reasons": list(fit.reasons), "views": list(fit.view_sizes)}


def knn(model: str, args: argparse.Namespace, size: int, out: Path) -> float:
    if not (out / "eval_knn.json").is_file():
        if seerlike_main(["eval", *knn_args(model, args.eval_train, args.eval_val, str(out), size)]) != 0:
            raise SystemExit(f"kNN of {model} at {size} px failed")
    return json.loads((out / "eval_knn.json").read_text())["metrics"]["top1"]


def run_variant(name: str, args: argparse.Namespace, stats: fit_data.DataStats) -> dict:
    budget_s = args.minutes * 60
    s = variant_settings(name, stats, f"tiny_{args.method}", budget_s)
    root = Path(args.run_root)
    data = root / f"ingest_{s['size'] if s['ingest'] else 'native'}"
    if not (data / "manifest.parquet").is_file():
        if seerlike_main(["ingest", args.images, "--out", str(data), "--no-progress", "shard_max_samples=200",
                          *s["ingest"]]) != 0:
            raise SystemExit(f"ingest for {name} failed")
    where = f"r{s['size']}" if s["ingest"] else "native"  # runs are named by their settings: variants share them
    run = root / f"{args.method}_v{s['views'][0]}_{where}_seed{args.seed}_{args.minutes:g}min"
    t0 = time.monotonic()
    if not (run / "DONE").is_file():
        argv = ["train", "--recipe", f"tiny_{args.method}", "--data", str(data), "--run-dir", str(run), "--nproc", "2",
                "--max-steps", str(MAX_STEPS), f"loop.time_budget_s={budget_s:.0f}", "loop.budget_clock=cpu",
                f"optim.warmup_steps={WARMUP['pretrain']}", f"loop.seed={args.seed}", "checkpoint.every_steps=250",
                "checkpoint.keep_last=1", "loop.tensorboard=false", "loop.progress=false", "loop.log_every=20",
                *s["train"]]
        if seerlike_main(argv) != 0:
            raise SystemExit(f"training {name} failed; see {run}")
        (run / "DONE").write_text("")
    wall = time.monotonic() - t0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    out = {"variant": name, "method": args.method, "seed": args.seed, "minutes": args.minutes, "size": s["size"],
           "views": s["views"], "reasons": s["reasons"], "run": str(run),
           "steps": max(r["step"] for r in rows), "wall_s": round(wall, 1),
           "step_s": next((r["calibrated_step_s"] for r in rows if "calibrated_step_s" in r), None),
           "first_loss": losses[0], "final_loss": losses[-1], "knn": {}}
    for size in sorted({s["size"], *args.also_eval}):
        rnd = knn(f"random:{ARCH}", args, size, root / f"knn_random_{size}")
        got = knn(str(run), args, size, run / f"knn_{size}")
        out["knn"][str(size)] = {"random": rnd, "trained": got, "gain": round(got - rnd, 2)}
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'variant':8} {'res':>4} {'views':>6} {'steps':>6} {'CPU s/step':>10} {'loss':>13}  kNN (size: random -> trained, gain)"]
    for r in rows:
        knns = "; ".join(f"{k}px {v['random']:.1f} -> {v['trained']:.1f} ({v['gain']:+.1f})" for k, v in r["knn"].items())
        lines.append(f"{r['variant']:8} {r['size']:>4} {'+'.join(map(str, r['views'])):>6} {r['steps']:>6} "
                     f"{r['step_s'] or 0:10.3f} {r['first_loss']:5.2f} -> {r['final_loss']:4.2f}  {knns}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="unlabeled pretraining images (folder or list)")
    p.add_argument("--eval-train", required=True, help="kNN memory bank (path,label CSV or class folders)")
    p.add_argument("--eval-val", required=True, help="kNN queries")
    p.add_argument("--variants", default="today,rule")
    p.add_argument("--method", default="swav")
    p.add_argument("--minutes", type=float, default=7.5, help="CPU minutes of each of the 2 ranks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--also-eval", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                   help="comma-separated kNN sizes every model is also scored at")
    p.add_argument("--run-root", default="runs/bench_fit_data")
    p.add_argument("--json", help="write the rows here (after every variant)")
    args = p.parse_args()
    stats = fit_data.data_stats(args.images)
    print(stats.describe(), flush=True)
    rows = []
    for name in args.variants.split(","):
        rows.append(run_variant(name.strip(), args, stats))
        print(table(rows[-1:]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{args.method}, seed {args.seed}, {args.minutes:g} CPU-minutes per rank x 2 ranks\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
