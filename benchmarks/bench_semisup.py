"""Semi-supervised stages on cifar10-dev: do Noisy Student and FixMatch beat fine-tuning on the labels alone?

For each label count (250 and 1,000: 25 / 100 per class drawn from cifar10-dev ``train`` with
the seed) and seed, from one pretrained backbone (``--backbone``: the quickstart's SwAV run,
``runs/quickstart/pretrain``; without it a ``tiny_swav`` run of ``--pretrain-seconds`` CPU seconds
is made first), every arm trains within ``--arm-seconds`` CPU seconds (``loop.time_budget_s`` with
``loop.budget_clock=cpu``: the step count comes from the first timed steps) and is scored on
cifar10-dev ``val`` (1,000 images) with its own classifier:

- ``linear``: linear probe on the frozen backbone (`seerlike eval linear`, its own epochs);
- ``finetune``: `seerlike finetune` from the backbone;
- ``noisy_student``: `seerlike selftrain --method noisy_student`, the ``finetune`` arm as the first
  teacher, ``--iterations`` students from the backbone, each ``--arm-seconds`` / iterations;
- ``fixmatch``: `seerlike selftrain --method fixmatch` from the backbone;
- ``finetune_random``, ``fixmatch_random``: the same from random init (what pretraining adds);
- ``--variant NAME=ARM:KEY=VALUE[,KEY=VALUE...]``: an extra arm NAME trained as ARM with those
  overrides after the arm's own (a sweep side by side with the arms, e.g.
  ``--variant fixmatch_t08=fixmatch:method.threshold=0.8``; a ``noisy_student`` variant keeps the
  ``finetune`` arm as its teacher; ``@FINETUNE@`` in a value stands for the ``finetune`` arm's run,
  e.g. ``fixmatch_ft=fixmatch:method.init=@FINETUNE@,method.init_head=true``: FixMatch started from
  the fine-tuned model, as Noisy Student's student learns from it).

Unlabeled data: the 50,000-image CIFAR-10 train archive (unpacked once under the run root) minus
the images of cifar10-dev ``val`` and the labeled ones (membership by md5; ``--unlabeled-limit N``
takes a seeded subset). Each arm runs as its own process; the table reports its CPU seconds as
measured (training, labelling, start-up; not the evaluation), so a budget overrun shows. Every
child runs on ``--threads`` torch threads (default 1, ``OMP_NUM_THREADS``): on a shared 2-core
machine a second thread cost 3-11x the CPU seconds of a step (docs/benchmarks.md, "Step cost of
the arms"), so a CPU budget would buy that many fewer steps.

    python benchmarks/bench_semisup.py --backbone runs/quickstart/pretrain          # 250 and 1,000 labels, seed 0
    python benchmarks/bench_semisup.py --backbone B --seeds 0,1,2 --arm-seconds 900  # 15 CPU-minutes an arm
    python benchmarks/bench_semisup.py --backbone B --labels 250 --arms fixmatch \
        --variant fixmatch_lr003=fixmatch:optim.lr=0.03 --variant fixmatch_t08=fixmatch:method.threshold=0.8
    python benchmarks/bench_semisup.py --labels 250 --arm-seconds 20 --unlabeled-limit 2000 --pretrain-seconds 20
                                                                                     # a check that everything runs

At the defaults (15 CPU-minutes an arm, 2 label counts, 1 seed) one pass takes about 2 x (7 arms
x 15 + labelling) CPU-minutes: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CIFAR = ROOT.parent / "shared" / "data" / "cifar10-dev"
ARCH = "resnet10_cifar"
ARMS = ("linear", "finetune", "noisy_student", "fixmatch", "finetune_random", "fixmatch_random")
MAX_STEPS = 1_000_000  # an upper bound: the CPU budget sets each run's step count


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def labeled_csv(root: Path, per_class: int, seed: int) -> Path:
    """``per_class`` images of each class drawn from cifar10-dev train with ``seed`` (absolute paths)."""
    out = root / f"labeled_{per_class * 10}_seed{seed}.csv"
    if out.is_file():
        return out
    rows = list(csv.DictReader(open(CIFAR / "train.csv")))
    by_class: dict[str, list[dict]] = {}
    for r in rows:
        by_class.setdefault(r["label"], []).append(r)
    rng = random.Random(seed)
    picked = [r for c in sorted(by_class) for r in rng.sample(by_class[c], per_class)]
    root.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([[str(CIFAR / r["path"]), r["label"]] for r in picked])
    return out


def unlabeled_csv(root: Path, labeled: Path, limit: int, seed: int) -> Path:
    """The archive's images that are neither in cifar10-dev val nor labeled (by md5), optionally a seeded subset."""
    out = root / f"unlabeled_{labeled.stem}_{limit or 'all'}.csv"
    if out.is_file():
        return out
    full = root / "train_full"
    if not full.is_dir():
        with tarfile.open(CIFAR / "cifar10_train_full_50k.tar.gz") as tar:
            tar.extractall(root, filter="data")
    used = {_md5(CIFAR / r["path"]) for r in csv.DictReader(open(CIFAR / "val.csv"))}
    used |= {_md5(Path(r["path"])) for r in csv.DictReader(open(labeled))}
    paths = [p for p in sorted(full.glob("*/*.jpg")) if _md5(p) not in used]
    if limit:
        paths = sorted(random.Random(seed).sample(paths, min(limit, len(paths))))
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path"])
        w.writerows([[str(p)] for p in paths])
    return out


def _rows(path: Path) -> int:
    return sum(1 for _ in open(path)) - 1


THREADS = 1
"""torch threads of every child (``--threads``)."""


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(THREADS))


def _run(argv: list[str], log: Path) -> float:
    """``python -m seerlike ARGV`` as a child process; returns its CPU seconds (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "a") as f:
        rc = subprocess.run([sys.executable, "-m", "seerlike", *argv], stdout=f, stderr=subprocess.STDOUT,
                            cwd=ROOT, env=_env()).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise SystemExit(f"seerlike {' '.join(argv[:3])} ... failed ({rc}); see {log}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _budget(seconds: float, seed: int) -> list[str]:
    """Options and overrides of a CPU-budgeted run (the option first: argparse takes no option after the overrides)."""
    return [f"--max-steps={MAX_STEPS}", f"loop.time_budget_s={seconds:.0f}", "loop.budget_clock=cpu",
            f"loop.seed={seed}", f"loop.num_threads={THREADS}", "loop.progress=false", "loop.tensorboard=false",
            "checkpoint.every_steps=500", "checkpoint.keep_last=1", "loop.log_every=20"]


def _accuracy(model: Path, log: Path) -> float:
    code = ("import json, sys; from seerlike.semisup.evaluate import classifier_accuracy; "
            f"print(json.dumps(classifier_accuracy({str(model)!r}, {str(CIFAR / 'val.csv')!r}, image_size=32)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_env())
    if out.returncode != 0:
        log.open("a").write(out.stderr)
        raise SystemExit(f"evaluating {model} failed; see {log}")
    return json.loads(out.stdout.strip().splitlines()[-1])["top1"]


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """``NAME=ARM:KEY=VALUE[,KEY=VALUE...]`` -> (NAME, ARM, overrides)."""
    name, sep, rest = text.partition("=")
    arm, sep2, overrides = rest.partition(":")
    if not (sep and sep2 and name) or name in ARMS or "/" in name or arm not in ARMS or arm == "linear":
        raise SystemExit(f"--variant {text!r}: write NAME=ARM:KEY=VALUE[,KEY=VALUE...] with a new NAME and ARM one of "
                         f"{ARMS[1:]}, e.g. fixmatch_t08=fixmatch:method.threshold=0.8")
    return name, arm, [o for o in overrides.split(",") if o]


def run_arm(name: str, arm: str, overrides: tuple[str, ...], work: Path, backbone: str, labeled: Path,
            unlabeled: Path, args, seed: int) -> dict:
    """Train (or reuse) arm ``name``, trained as ``arm`` with ``overrides`` after its own, in ``work/name``
    and score it on val; returns its row. A cached row made with other overrides is refused, not reused."""
    out = work / name
    log = work / f"{name}.log"
    done = out / "result.json"
    if done.is_file():
        row = json.loads(done.read_text())
        if row.get("overrides", []) != list(overrides):
            raise SystemExit(f"{out} holds arm {name!r} trained with overrides {row.get('overrides', [])}, not "
                             f"{list(overrides)}: give the variant a new NAME or remove {out}")
        return row
    init = f"random:{ARCH}" if arm.endswith("_random") else backbone
    finetuned = work / "finetune"  # Noisy Student's teacher, and what @FINETUNE@ in an override names
    t0 = time.monotonic()
    if arm == "linear":
        cpu = _run(["eval", "linear", "--model", backbone, "--train", str(labeled), "--val", str(CIFAR / "val.csv"),
                    "--image-size", "32", "--resize", "32", "--seed", str(seed), "--out", str(out)], log)
        top1 = json.loads((out / "eval_linear.json").read_text())["metrics"]["top1"]
        row = {"arm": arm, "top1": top1, "cpu_s": round(cpu), "steps": None, "overrides": []}
    else:
        if arm.startswith("finetune"):
            argv = ["finetune", "--data", str(labeled), "--init", init, "--run-dir", str(out),
                    *_budget(args.arm_seconds, seed)]
        elif arm.startswith("fixmatch"):
            argv = ["selftrain", "--method", "fixmatch", "--labeled", str(labeled), "--unlabeled", str(unlabeled),
                    "--init", init, "--run-dir", str(out), *_budget(args.arm_seconds, seed)]
        else:
            per_class = args.per_class or _rows(unlabeled) // 10
            argv = ["selftrain", "--method", "noisy_student", "--labeled", str(labeled), "--unlabeled", str(unlabeled),
                    "--teacher", str(finetuned), "--init", init, "--run-dir", str(out),
                    "--iterations", str(args.iterations), *_budget(args.arm_seconds / args.iterations, seed),
                    f"method.per_class={per_class}"]
        cpu = _run([*argv, *(o.replace("@FINETUNE@", str(finetuned)) for o in overrides)], log)
        final = out / f"iter{args.iterations}" if arm == "noisy_student" else out
        top1 = _accuracy(final, log)
        steps = yaml.safe_load((final / "config.yaml").read_text())["loop"]["max_steps"]  # as calibrated
        row = {"arm": name, "top1": top1, "cpu_s": round(cpu), "steps": steps, "overrides": list(overrides)}
    row["wall_s"] = round(time.monotonic() - t0)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(row) + "\n")
    return row


def pretrained_backbone(root: Path, args) -> str:
    if args.backbone:
        return str(Path(args.backbone).resolve())
    run = root / "pretrain"
    log = root / "pretrain.log"
    if not (run / "DONE").is_file():
        _run(["train", "--recipe", "tiny_swav", "--data", str(CIFAR / "train"), "--run-dir", str(run),
              *_budget(args.pretrain_seconds, 0)], log)
        (run / "DONE").write_text("")
    return str(run)


def table(rows: list[dict], labels: list[int], arm_seconds: float, variants: tuple[str, ...] = ()) -> str:
    lines = [f"| arm | {' | '.join(f'{n} labels: top-1 (CPU s)' for n in labels)} |",
             "|---|" + "---|" * len(labels)]
    for arm in (*ARMS, *variants):
        cells = []
        for n in labels:
            mine = [r for r in rows if r["arm"] == arm and r["labels"] == n]
            if not mine:
                cells.append("-")
                continue
            acc = [r["top1"] for r in mine]
            spread = f" +- {statistics.stdev(acc):.1f}" if len(acc) > 1 else ""
            cells.append(f"{statistics.mean(acc):.1f}{spread} ({statistics.mean(r['cpu_s'] for r in mine):.0f})")
        lines.append(f"| {arm} | {' | '.join(cells)} |")
    seeds = sorted({r["seed"] for r in rows})
    lines.append(f"\nBudget {arm_seconds:.0f} CPU-s an arm; seeds {seeds}; mean +- std over seeds.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-root", default="runs/bench_semisup")
    p.add_argument("--backbone", help="pretrained backbone (default: a tiny_swav run of --pretrain-seconds)")
    p.add_argument("--pretrain-seconds", type=float, default=900.0, help="CPU seconds of the fallback pretraining")
    p.add_argument("--labels", default="250,1000", help="label counts (10 classes: multiples of 10)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--arm-seconds", type=float, default=900.0, help="CPU seconds of training per arm (15 CPU-min)")
    p.add_argument("--iterations", type=int, default=1, help="Noisy Student iterations")
    p.add_argument("--per-class", type=int, default=0, help="Noisy Student balancing (default: unlabeled images / 10)")
    p.add_argument("--unlabeled-limit", type=int, default=0, help="use a seeded subset of the unlabeled images")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every arm's process")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ARM:KEY=VALUE[,...]",
                   help="an extra arm trained as ARM with these overrides (repeatable)")
    args = p.parse_args()
    global THREADS
    THREADS = args.threads
    root = Path(args.run_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    labels = [int(x) for x in args.labels.split(",")]
    arms = [a for a in args.arms.split(",") if a]
    unknown = set(arms) - set(ARMS)
    if unknown or ("noisy_student" in arms and "finetune" not in arms):
        raise SystemExit(f"--arms: unknown {sorted(unknown)} (choose from {ARMS}); noisy_student needs finetune "
                         "(its teacher)")
    variants = {name: (arm, tuple(ov)) for name, arm, ov in map(parse_variant, args.variant)}
    if any(arm == "noisy_student" or any("@FINETUNE@" in o for o in ov) for arm, ov in variants.values()) \
            and "finetune" not in arms:
        raise SystemExit("--variant ...=noisy_student:... or one naming @FINETUNE@: add the finetune arm to --arms "
                         "(the teacher or the model it starts from)")
    backbone = pretrained_backbone(root, args)
    rows = []
    for n in labels:
        for seed in (int(s) for s in args.seeds.split(",")):
            labeled = labeled_csv(root, n // 10, seed)
            unlabeled = unlabeled_csv(root, labeled, args.unlabeled_limit, seed)
            work = root / f"labels{n}_seed{seed}_{args.arm_seconds:g}s"
            work.mkdir(parents=True, exist_ok=True)
            todo = [(a, a, ()) for a in ARMS if a in arms] + [(v, a, ov) for v, (a, ov) in variants.items()]
            for name, arm, overrides in todo:
                row = run_arm(name, arm, overrides, work, backbone, labeled, unlabeled, args, seed)
                rows.append({**row, "labels": n, "seed": seed})
                print(f"{n} labels seed {seed} {name:16s} top-1 {row['top1']:5.1f}  CPU {row['cpu_s']:5d} s  "
                      f"wall {row['wall_s']:5d} s  steps {row['steps']}", flush=True)
    (root / "results.json").write_text(json.dumps({"backbone": backbone, "args": vars(args), "rows": rows}, indent=1))
    print(table(rows, labels, args.arm_seconds, tuple(variants)))


if __name__ == "__main__":
    main()
