"""Learning quality: does pretraining beat random init within 15 CPU-minutes?

On ../shared/data/cifar10-dev: SwAV and BYOL pretraining of resnet10_cifar on `train` (no
labels) for ``--minutes`` of wall time on 2 ranks x 1 thread (7.5 min x 2 cores = 15
CPU-minutes by default), then ClusterFit on k-means pseudo-labels and distillation into the
half-width student, each scored by kNN top-1 on `val` with the features of `train` as the
memory bank (k 20, cosine, T 0.07) against the same architecture at random init.

Every (method, seed) is one `seerlike quickstart` pipeline whose training stages get the
given wall seconds and calibrate their step counts on their first steps
(``loop.time_budget_s``), so the benchmark measures exactly what users run.
Both fit the resolution, views and batch to the images and the budget as the quickstart does
(docs/fit_data.md; the tiny recipes' own settings on cifar10-dev), unless ``--no-fit-data``.
``--pretrain-only`` skips ClusterFit and distillation (`seerlike train` with the method's
``tiny_`` recipe, then kNN): the per-method table of docs/benchmarks.md. Targets: pretraining >= +10 points over random
init; ClusterFit >= the pretrained model it starts from; the distilled student >= its own
random init, and compared with its teacher.

    python benchmarks/bench_learning.py                       # both methods, seed 0, 7.5 min each
    python benchmarks/bench_learning.py --seeds 0,1,2 --methods swav
    python benchmarks/bench_learning.py --minutes 1 --followup-minutes 0.5   # a quick calibration
    python benchmarks/bench_learning.py --heldout 10000     # also kNN on 10,000 held-out images
    python benchmarks/bench_learning.py --pretrain-only --from-json s0.json s1.json s2.json   # medians over seeds
    python benchmarks/bench_learning.py --pretrain-only --methods jigsaw --variant grid2 \
        --set method.grid=2 --set method.num_permutations=24      # a lever at the full budget: rows "jigsaw:grid2"

`val` has 1,000 images, so one kNN figure on it has a standard error of about 1.5 points,
as large as the differences a recipe change makes. ``--heldout N`` also scores every model
on N images of the full 50,000-image CIFAR-10 train archive that are in neither cifar10-dev
`train` nor `val` (unpacked once under the run root; same memory bank), about 0.5 points
of standard error at 10,000.

A (method, seed) takes about ``minutes`` + 2 x ``followup-minutes`` + 1.5 minutes of wall time
(+ 1 minute with ``--heldout``; 11-12.7 minutes at the defaults in docs/benchmarks.md,
"24 px views, DDP without data workers, k 200").
Every stage's seconds count each rank's CPU time by default (``--clock cpu``), so a busy machine
stretches the wall time, not the steps, up to the rise of CPU seconds per step under load;
``--clock wall`` measures what the wall-clock quickstart does, on an otherwise idle 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import platform
import random
import statistics
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seerlike import recipes  # noqa: E402
from seerlike.checkpoints import random_spec  # noqa: E402
from seerlike.cli import main as seerlike_main  # noqa: E402
from seerlike.config import apply_overrides, dumps, load  # noqa: E402
from seerlike.engine.config import TrainConfig  # noqa: E402
from seerlike.methods import METHODS  # noqa: E402
from seerlike.quickstart import (ARCH, FIT_JSON, IMAGE_SIZE, INPUT_BASELINE, K, MAX_STEPS, SHARED_DATA,  # noqa: E402
                                 STUDENT, knn_args)

CIFAR = SHARED_DATA / "cifar10-dev"
#: results.json entry -> the model `seerlike eval knn` scores for the held-out figure ("random": random_baseline)
HELDOUT_MODELS = {"pretrained": "pretrain", "clusterfit": "clusterfit", "distilled": "export",
                  "random_student": f"random:{STUDENT}"}


def random_baseline(method: str) -> str:
    """Random init of the quickstart's trunk, fed what ``method`` feeds it (colorization: the lightness alone)."""
    return random_spec(ARCH, METHODS[method].input_channels)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def heldout_csv(root: Path, n: int) -> Path:
    """A `path,label` CSV of ``n`` images of the 50k archive that are in neither cifar10-dev train nor val.

    Membership is by content (md5), not by file name; the sample is seeded, so every run of
    the benchmark scores the same images.
    """
    out = root / f"heldout_{n}.csv"
    if out.is_file():
        return out
    archive = CIFAR / "cifar10_train_full_50k.tar.gz"
    if not archive.is_file():
        raise SystemExit(f"--heldout needs {archive} (the shared data's full CIFAR-10 train archive)")
    full = root / "train_full"
    if not full.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
    used = {_md5(CIFAR / r["path"]) for split in ("train", "val") for r in csv.DictReader(open(CIFAR / f"{split}.csv"))}
    rows = [(p, p.parent.name) for p in sorted(full.glob("*/*.jpg")) if _md5(p) not in used]
    if len(rows) < n:
        raise SystemExit(f"--heldout {n}: only {len(rows)} archive images are outside train and val")
    rows = sorted(random.Random(0).sample(rows, n))
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows((str(p), label) for p, label in rows)
    return out


def heldout_scores(run_dir: Path, method: str, memory_bank: str, heldout: Path) -> dict[str, float]:
    """kNN top-1 on the held-out images for every model of a quickstart run (the quickstart's kNN settings)."""
    fit = json.loads((run_dir / FIT_JSON).read_text()) if (run_dir / FIT_JSON).is_file() else {}
    size = fit.get("resolution", IMAGE_SIZE)  # the run's working resolution
    scores = {}
    for name, model in {"random": random_baseline(method), **HELDOUT_MODELS}.items():
        out = run_dir / "heldout" / name
        if not (out / "eval_knn.json").is_file():
            spec = model if model.startswith("random:") else str(run_dir / model)
            if seerlike_main(["eval", *knn_args(spec, memory_bank, str(heldout), str(out), size)]) != 0:
                raise SystemExit(f"held-out kNN of {spec} failed")
        scores[name] = json.loads((out / "eval_knn.json").read_text())["metrics"]["top1"]
    return scores


def run_one(method: str, seed: int, args: argparse.Namespace) -> dict:
    run_dir = Path(args.run_root) / f"{method}_seed{seed}_{args.minutes:g}min"
    argv = ["quickstart", "--method", method, "--run-dir", str(run_dir), "--seed", str(seed), "--quiet",
            "--pretrain-seconds", str(args.minutes * 60), "--followup-seconds", str(args.followup_minutes * 60),
            "--k", str(args.k), "--clock", args.clock]
    for flag in ("images", "eval_train", "eval_val"):
        if getattr(args, flag):
            argv += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    if not args.fit_data:
        argv.append("--no-fit-data")
    t0 = time.monotonic()
    if seerlike_main(argv) != 0:
        raise SystemExit(f"quickstart failed for {method} seed {seed}; see {run_dir}/jobs")
    wall = time.monotonic() - t0
    results = json.loads((run_dir / "results.json").read_text())
    m = results["models"]
    steps = {"pretrain": m[method]["steps"], "clusterfit": m["clusterfit"]["steps"], "distill": m["distilled"]["steps"]}
    own = m.get(INPUT_BASELINE[0], m["random_init"])  # the pretrained trunk's own baseline (random_baseline)
    val = {"random": own["knn_top1"], "pretrained": m[method]["knn_top1"],
           "clusterfit": m["clusterfit"]["knn_top1"], "distilled": m["distilled"]["knn_top1"],
           "random_student": m["random_init_student"]["knn_top1"]}
    row = {"method": method, "seed": seed, "steps": steps, "machine": machine(), "wall_s": round(wall, 1),
           "pretrain_s": m[method]["seconds"], "clusterfit_s": m["clusterfit"]["seconds"],
           "distill_s": m["distilled"]["seconds"], "val": val, "run_dir": str(run_dir)}
    if args.heldout_csv:
        row["heldout"] = heldout_scores(run_dir, method, args.eval_train or str(CIFAR / "train.csv"), args.heldout_csv)
    return row


def machine() -> dict:
    """What ran the row: CPU model, torch's CPU capability, whether bf16 is native (docs/engine.md, "bf16 on CPUs")."""
    from seerlike.engine.precision import native_bf16

    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), name)
    return {"cpu": name, "capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16("cpu")}


def recipe_fingerprint(method: str, overrides: list[str]) -> str:
    """md5 of ``tiny_METHOD`` with ``overrides``, resolved: a cached run of another recipe is not reused."""
    cfg = apply_overrides(recipes.get(f"tiny_{method}"), overrides)
    return hashlib.md5(dumps(cfg, "json").encode()).hexdigest()


def run_pretrain_only(method: str, seed: int, args: argparse.Namespace) -> dict:
    """`seerlike train --recipe tiny_METHOD` for ``--minutes`` on 2 ranks, then kNN of it and of random init."""
    label = f"{method}:{args.variant}" if args.variant else method
    run_dir = Path(args.run_root) / f"{label.replace(':', '_')}_seed{seed}_{args.minutes:g}min_pretrain"
    train_argv = ["train", "--recipe", f"tiny_{method}", "--data", args.images or str(CIFAR / "train"),
                  "--run-dir", str(run_dir / "pretrain"), "--nproc", "2", "--max-steps", str(MAX_STEPS),
                  f"loop.time_budget_s={args.minutes * 60:.0f}", f"loop.budget_clock={args.clock}",
                  "optim.warmup_steps=50", f"loop.seed={seed}",
                  "checkpoint.every_steps=250", "checkpoint.keep_last=1", "loop.tensorboard=false",
                  "loop.progress=false", "loop.log_every=20", *args.set, *(["--fit-data"] if args.fit_data else [])]
    t0 = time.monotonic()
    done = run_dir / "pretrain" / "DONE"  # what it was trained with: the overrides and the recipe they applied to
    trained = {"overrides": args.set, "recipe": recipe_fingerprint(method, args.set)}
    if done.exists():
        was = json.loads(done.read_text() or "{}")
        if was != trained:
            raise SystemExit(f"{run_dir} was trained with {was}, not {trained} (another variant, or the recipe "
                             "changed since): give the variant another name, or remove the folder")
    else:
        if seerlike_main(train_argv) != 0:
            raise SystemExit(f"pretraining {label} seed {seed} failed; see {run_dir}")
        done.write_text(json.dumps(trained))
    wall = time.monotonic() - t0
    rows = [json.loads(line) for line in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    bank, val = args.eval_train or str(CIFAR / "train.csv"), args.eval_val or str(CIFAR / "val.csv")
    # kNN on whole images at the run's resolution: fit_data's (in its config.yaml) or the CIFAR 32 px
    size = (load(run_dir / "pretrain" / "config.yaml", TrainConfig).eval.image_size if args.fit_data else IMAGE_SIZE)
    splits = {"val": val, **({"heldout": str(args.heldout_csv)} if args.heldout_csv else {})}
    baseline = random_baseline(method)
    out = {"method": label, "seed": seed, "random": baseline, **({"overrides": args.set} if args.set else {}),
           "wall_s": round(wall, 1), "run_dir": str(run_dir),
           "images": args.images or str(CIFAR / "train"),
           "steps": {"pretrain": max(r["step"] for r in rows)}, "machine": machine(),
           "dtype": load(run_dir / "pretrain" / "config.yaml", TrainConfig).precision.dtype,
           "step_s": next((r["calibrated_step_s"] for r in rows if "calibrated_step_s" in r), None),
           "peak_rss_mb": max((r.get("peak_mem_mb", 0.0) for r in rows), default=0.0),
           "first_loss": next(r["loss"] for r in rows if "loss" in r),
           "final_loss": [r["loss"] for r in rows if "loss" in r][-1]}
    for split, queries in splits.items():
        scores = {}
        # random init is one model per input (RGB, lightness) for every method and seed: scored once per run root
        shared = hashlib.md5(f"{baseline.removeprefix('random:')}|{bank}|{queries}|{size}".encode()).hexdigest()[:8]
        for name, spec in (("random", baseline), ("pretrained", str(run_dir / "pretrain"))):
            dest = (Path(args.run_root) / f"random_{ARCH}_{shared}" / f"knn_{split}" if name == "random"
                    else run_dir / f"knn_{split}_{name}")
            if not (dest / "eval_knn.json").is_file():
                if seerlike_main(["eval", *knn_args(spec, bank, queries, str(dest), size)]) != 0:
                    raise SystemExit(f"kNN of {spec} on {split} failed")
            scores[name] = json.loads((dest / "eval_knn.json").read_text())["metrics"]["top1"]
        out[split] = scores
    return out


def pretrain_table(rows: list[dict]) -> str:
    """One line per (method, seed): steps, step cost, memory, kNN of random init and pretrained, gains."""
    lines = [f"{'method':20} {'seed':>4} {'steps':>6} {'s/step':>6} {'rss MB':>7} {'val rnd':>7} {'val':>6} "
             f"{'gain':>6} {'held rnd':>8} {'held':>6} {'gain':>6}"]
    for r in rows:
        v, h = r["val"], r.get("heldout")
        held = (f"{h['random']:8.1f} {h['pretrained']:6.1f} {h['pretrained'] - h['random']:+6.1f}" if h
                else f"{'-':>8} {'-':>6} {'-':>6}")
        lines.append(f"{r['method']:20} {r['seed']:>4} {r['steps']['pretrain']:>6} {r['step_s'] or 0:6.3f} "
                     f"{r['peak_rss_mb']:7.0f} {v['random']:7.1f} {v['pretrained']:6.1f} "
                     f"{v['pretrained'] - v['random']:+6.1f} {held}")
    return "\n".join(lines)


def row_group(r: dict) -> str:
    """The label rows pool under: the method, plus the machine and dtype and the images where the row records them
    (rows of another CPU or data set never share a median with the table's)."""
    tags = [f"{r['machine']['capability']}, {r.get('dtype', '?')}"] if "machine" in r else []
    if r.get("images") and Path(r["images"]).parent.name != CIFAR.name:
        tags.append(Path(r["images"]).parent.name)
    return r["method"] + (f" [{'; '.join(tags)}]" if tags else "")


def pretrain_medians(rows: list[dict]) -> str:
    """Markdown: per method, medians over its seeds (steps, CPU s / step, memory, kNN, gains) and each
    seed's held-out gain, ranked by the median held-out gain (by val where no held-out was scored)."""
    def gain(r, split):
        return r[split]["pretrained"] - r[split]["random"] if split in r else float("nan")

    def med(rs, f):
        return statistics.median(f(r) for r in rs)

    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(row_group(r), []).append(r)
    order = sorted(by_method, key=lambda m: -med(by_method[m], lambda r: gain(r, "heldout" if "heldout" in r else "val")))
    lines = ["| method | seeds | steps | CPU s / step (per rank) | peak RSS MB | val: random | val | gain "
             "| held-out: random | held-out | gain | held-out gain per seed |", "|" + "---|" * 12]
    for m in order:
        rs = sorted(by_method[m], key=lambda r: r["seed"])
        held = [r for r in rs if "heldout" in r]
        hcols = (f"{med(held, lambda r: r['heldout']['random']):.1f} | {med(held, lambda r: r['heldout']['pretrained']):.1f} "
                 f"| {med(held, lambda r: gain(r, 'heldout')):+.1f} | "
                 + ", ".join(f"{gain(r, 'heldout'):+.1f} (seed {r['seed']})" for r in held)) if held else "- | - | - | -"
        lines.append(f"| {m} | {','.join(str(r['seed']) for r in rs)} | {med(rs, lambda r: r['steps']['pretrain']):,.0f} "
                     f"| {med(rs, lambda r: r['step_s'] or 0):.3f} | {med(rs, lambda r: r['peak_rss_mb']):.0f} "
                     f"| {med(rs, lambda r: r['val']['random']):.1f} | {med(rs, lambda r: r['val']['pretrained']):.1f} "
                     f"| {med(rs, lambda r: gain(r, 'val')):+.1f} | {hcols} |")
    return "\n".join(lines)


def table(rows: list[dict], split: str = "val") -> str:
    """One line per (method, seed): the kNN top-1 of every model on ``split`` and the gains."""
    head = (f"{'method':6} {'seed':>4} {'steps':>6} {'pre s':>6} {'random':>7} {'pretr':>6} {'gain':>6} "
            f"{'cfit':>6} {'d cfit':>6} {'distil':>6} {'d tea':>6} {'rnd st':>6} {'d st':>6}")
    lines = [head]
    for r in rows:
        s = r[split]
        lines.append(f"{r['method']:6} {r['seed']:>4} {r['steps']['pretrain']:>6} {r['pretrain_s']:6.0f} "
                     f"{s['random']:7.1f} {s['pretrained']:6.1f} {s['pretrained'] - s['random']:+6.1f} "
                     f"{s['clusterfit']:6.1f} {s['clusterfit'] - s['pretrained']:+6.1f} {s['distilled']:6.1f} "
                     f"{s['distilled'] - s['clusterfit']:+6.1f} {s['random_student']:6.1f} "
                     f"{s['distilled'] - s['random_student']:+6.1f}")
    return "\n".join(lines)


def verdict(rows: list[dict], split: str = "val") -> list[str]:
    """Median over seeds of each gain on ``split``, against its target."""
    out = []
    for method in sorted({r["method"] for r in rows}):
        rs = [r[split] for r in rows if r["method"] == method]
        med = {k: statistics.median(v(s) for s in rs) for k, v in {
            "gain": lambda s: s["pretrained"] - s["random"],
            "cfit_vs_pre": lambda s: s["clusterfit"] - s["pretrained"],
            "dist_vs_teacher": lambda s: s["distilled"] - s["clusterfit"],
            "dist_vs_random": lambda s: s["distilled"] - s["random_student"]}.items()}
        out.append(f"{method} on {split} (median of {len(rs)} seed(s)): gain over random init {med['gain']:+.1f} "
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
    p.add_argument("--followup-minutes", type=float, default=2.5,
                   help="wall minutes each for ClusterFit and distillation (2.5: as the 15-minute quickstart)")
    p.add_argument("--k", type=int, default=K, help=f"k-means clusters (default {K}, as the quickstart)")
    p.add_argument("--run-root", default="runs/bench_learning", help="one quickstart run folder per method and seed")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--images", help="pretraining images (default: cifar10-dev train, as the quickstart)")
    p.add_argument("--eval-train", help="kNN memory bank (default: cifar10-dev train.csv)")
    p.add_argument("--eval-val", help="kNN queries (default: cifar10-dev val.csv)")
    p.add_argument("--heldout", type=int, default=0, metavar="N",
                   help="also score every model on N archive images outside cifar10-dev train and val (0: off)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                   help="what --minutes and --followup-minutes count (cpu: each rank's CPU time, which a busy machine "
                   "does not stretch; wall: the quickstart's default)")
    p.add_argument("--no-fit-data", dest="fit_data", action="store_false",
                   help="the tiny recipes' CIFAR settings whatever the images (as `seerlike quickstart --no-fit-data`); "
                   "default: fitted to the images and the budget (docs/fit_data.md), the same on cifar10-dev")
    p.add_argument("--pretrain-only", action="store_true",
                   help="pretraining and kNN only (no ClusterFit / distillation): the per-method table")
    p.add_argument("--from-json", nargs="+", metavar="JSON",
                   help="--pretrain-only: train nothing, print the medians over seeds of these --json files' rows "
                   "(a method, machine, data set and seed in several files: the last one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="--pretrain-only: an override of every method's tiny recipe (repeatable; needs --variant)")
    p.add_argument("--variant", default="",
                   help="--pretrain-only: name of the --set overrides; rows are tabled as METHOD:VARIANT")
    args = p.parse_args()
    if (args.set or args.variant) and not (args.pretrain_only and args.set and args.variant):
        p.error("--set and --variant go together, with --pretrain-only (a lever of the per-method table)")
    if args.from_json:
        merged = {(row_group(r), r["seed"]): r for f in args.from_json for r in json.loads(Path(f).read_text())}
        print(pretrain_medians(list(merged.values())))
        return 0
    args.heldout_csv = heldout_csv(Path(args.run_root) / "heldout", args.heldout) if args.heldout else None
    if args.pretrain_only:
        rows = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            for method in args.methods.split(","):
                try:
                    rows.append(run_pretrain_only(method.strip(), seed, args))
                except SystemExit as e:  # one method failing does not cost the others' figures
                    print(f"{method} seed {seed}: {e}", flush=True)
                    continue
                print(pretrain_table(rows[-1:]), flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"\nkNN top-1 (%), k 20, cosine, T 0.07; pretraining {args.minutes:g} min x 2 ranks (1 thread each), "
              "calibrated step counts\n")
        print(pretrain_table(rows))
        print()
        print(pretrain_medians(rows))
        return 0
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in args.methods.split(","):
            rows.append(run_one(method.strip(), seed, args))
            print(table(rows[-1:]), flush=True)
            if args.json:  # after every row: an interrupted sweep keeps what it measured
                Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nkNN top-1 (%) on cifar10-dev val, k 20, cosine, T 0.07; pretraining {args.minutes:g} min x 2 ranks "
          f"(1 thread each), ClusterFit and distillation {args.followup_minutes:g} min each\n")
    print(table(rows))
    print()
    print("\n".join(verdict(rows)))
    if args.heldout_csv:
        print(f"\nThe same models on {args.heldout} held-out images ({args.heldout_csv})\n")
        print(table(rows, "heldout"))
        print()
        print("\n".join(verdict(rows, "heldout")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
