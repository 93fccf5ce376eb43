"""CPU seconds per optimizer step of each semi-supervised arm, split into data and model.

Builds each arm as `seerlike finetune` / `seerlike selftrain` would (the ``*_tiny`` recipes,
one process, in this process), then times ``--steps`` steps after ``--warmup`` ones with
``time.process_time`` (every thread of the process): ``data`` is the batch (decoding, crops,
RandAugment, the colour ops), ``model`` the engine's ``train_step`` (forward, backward,
optimizer, the moving average). The Noisy Student student reads pseudo-labels made up for the
occasion (random soft labels for every unlabeled image; the cost does not depend on them).

    python benchmarks/bench_semisup_step.py --backbone /work/bench/qs/pretrain
    python benchmarks/bench_semisup_step.py --arms fixmatch --profile 20     # + the 20 costliest calls

Labeled: 250 images of cifar10-dev ``train`` (25 per class); unlabeled: the whole of ``train``
(5,000 images, without labels). The linear probe has no training step of its own (features are
extracted once, then a linear classifier trains on them); `bench_semisup.py` reports its total.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import dataclasses
import io
import os
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-dev"
ARMS = ("finetune", "noisy_student", "fixmatch")


def _write_csvs(tmp: Path, per_class: int = 25) -> tuple[Path, Path]:
    rows = list(csv.DictReader(open(CIFAR / "train.csv")))
    by_class: dict[str, list[dict]] = {}
    for r in rows:
        by_class.setdefault(r["label"], []).append(r)
    rng = random.Random(0)
    labeled, unlabeled = tmp / "labeled.csv", tmp / "unlabeled.csv"
    with open(labeled, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([[str(CIFAR / r["path"]), r["label"]] for c in sorted(by_class)
                     for r in rng.sample(by_class[c], per_class)])
    with open(unlabeled, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path"])
        w.writerows([[str(CIFAR / r["path"])] for r in rows])
    return labeled, unlabeled


def _fake_pseudo_labels(cfg, tmp: Path) -> str:
    from seerlike.data.sources import resolve
    from seerlike.semisup.labeling import select
    from seerlike.semisup.stages import label_settings

    import pyarrow.parquet as pq

    keys = resolve(cfg.method.unlabeled).keys
    probs = np.random.default_rng(0).dirichlet(np.full(cfg.method.num_classes, 0.1), size=len(keys))
    out = tmp / "pseudo.parquet"
    pq.write_table(select(list(keys), probs, label_settings(cfg)), out)
    return str(out)


def arm_config(arm: str, labeled: Path, unlabeled: Path, backbone: str, tmp: Path, overrides: list[str]):
    from seerlike import config as configlib
    from seerlike.semisup.stages import finetune_config, selftrain_config

    if arm == "finetune":
        return finetune_config(data=str(labeled), init=backbone, overrides=overrides)
    teacher = {"teacher": backbone} if arm == "noisy_student" else {}
    cfg = selftrain_config(arm, labeled=str(labeled), unlabeled=str(unlabeled), init=backbone, overrides=overrides,
                           **teacher)
    if arm == "noisy_student":
        cfg = configlib.apply_override(cfg, "method.pseudo_labels", _fake_pseudo_labels(cfg, tmp))
    return cfg


def measure(cfg, steps: int, warmup: int, profile: int) -> dict:
    """CPU seconds per step (data, model) of ``cfg`` over ``steps`` steps after ``warmup``."""
    from seerlike.data.pipeline import build_train_data
    from seerlike.engine.loop import build_method
    from seerlike.engine.optim import build_optimizer
    from seerlike.engine.parallelize import parallelize
    from seerlike.engine.step import train_step
    from seerlike.semisup.data import build_mixed_data

    device = torch.device("cpu")
    cfg = dataclasses.replace(cfg, precision=cfg.precision.resolved(device))  # the recipes' auto, as the engine does
    if cfg.method.name == "finetune":
        data = build_train_data(cfg.data, seed=cfg.loop.seed, device=device)
    else:
        data = build_mixed_data(cfg, device=device)
    torch.manual_seed(0)
    method = build_method(cfg)
    if cfg.model.channels_last:
        method.to(memory_format=torch.channels_last)
    model = parallelize(method, cfg.parallel, compute_dtype=cfg.precision.torch_dtype, device=device)
    method.train()
    optimizer = build_optimizer(cfg.optim, method)
    batches = iter(data)
    data_s = model_s = 0.0
    images = 0
    prof = cProfile.Profile(time.process_time) if profile else None  # CPU time: the machine is shared
    for i in range(warmup + steps):
        if i == warmup and prof is not None:
            prof.enable()
        t0 = time.process_time()
        batch = next(batches)
        t1 = time.process_time()
        train_step(model, method, optimizer, None, [batch], step=i, max_steps=warmup + steps,
                   precision=cfg.precision, device=device, channels_last=cfg.model.channels_last)
        t2 = time.process_time()
        if i >= warmup:
            data_s += t1 - t0
            model_s += t2 - t1
            images += sum(v.shape[0] for v in batch.views)
    out = {"data_s": data_s / steps, "model_s": model_s / steps, "images": images // steps}
    if prof is not None:
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(profile)
        out["profile"] = s.getvalue()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="random:resnet10_cifar", help="pretrained model (--init of every arm)")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: each recipe's loop.num_threads)")
    p.add_argument("--profile", type=int, default=0, help="print this many of the costliest functions (cProfile)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of every arm's config")
    args = p.parse_args()
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        labeled, unlabeled = _write_csvs(Path(tmp))
        print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print("| arm | threads | images / step | data CPU s | model CPU s | total CPU s / step |\n|---|---|---|---|---|---|")
        for arm in args.arms.split(","):
            cfg = arm_config(arm, labeled, unlabeled, args.backbone, Path(tmp), args.overrides)
            torch.set_num_threads(args.threads or cfg.loop.num_threads or default_threads)
            r = measure(cfg, args.steps, args.warmup, args.profile)
            print(f"| {arm} | {torch.get_num_threads()} | {r['images']} | {r['data_s']:.3f} | {r['model_s']:.3f} | "
                  f"{r['data_s'] + r['model_s']:.3f} |", flush=True)
            if "profile" in r:
                print(r["profile"])


if __name__ == "__main__":
    main()
