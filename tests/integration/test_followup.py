"""The follow-up stages chained on real CIFAR images, each command on the previous one's output.

extract (a random trunk) -> cluster -> ClusterFit retrain (`seerlike train`) -> export ->
eval (on the export) -> distill (teacher: the ClusterFit run) -> extract (the student's run)
-> plots. Asserts that ClusterFit lowers its loss below ln K and that the distilled student
agrees with its teacher far above what always answering the teacher's commonest class gets.
"""

from __future__ import annotations

import csv
import json
import math
import random

import numpy as np
import pytest
import torch

from seerlike.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

K = 8
COMMON = ["optim.warmup_steps=1", "data.num_workers=0", "data.batch_size=32", "loop.progress=false",
          "loop.tensorboard=false", "loop.log_every=1"]


def _subset(cifar_dir, split, n, path):
    rows = list(csv.DictReader(open(cifar_dir / f"{split}.csv")))
    random.Random(0).shuffle(rows)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for r in rows[:n]:
            w.writerow([str(cifar_dir / r["path"]), r["label"]])
    return str(path)


def _losses(run_dir, key="loss"):
    return [json.loads(line)[key] for line in open(run_dir / "metrics.jsonl")]


def _logits(spec, data):
    from seerlike.eval.extract import eval_batch, list_units
    from seerlike.checkpoints import load_backbone

    loaded = load_backbone(spec)
    imgs = [s.data for u in list_units(data) for s in u.read()]
    with torch.no_grad():
        x = eval_batch(imgs, 32, 32)
        return loaded.head(loaded.model(x))


def test_followup_chain(tmp_path, cifar_dir):
    train = _subset(cifar_dir, "train", 256, tmp_path / "train.csv")
    val = _subset(cifar_dir, "val", 100, tmp_path / "val.csv")
    size = ["--image-size", "32", "--resize", "32"]

    assert main(["extract", "--checkpoint", "random:resnet10_cifar", "--data", train, "--layer", "res5", *size,
                 "--out", str(tmp_path / "feats"), "--chunk-size", "100"]) == 0
    assert main(["cluster", str(tmp_path / "feats"), "--k", str(K), "--out", str(tmp_path / "clusters"),
                 "--contact-sheets", "3", "--images", train]) == 0
    stats = json.loads((tmp_path / "clusters" / "cluster_stats.json").read_text())
    assert stats["num_features"] == 256 and sum(stats["sizes"]) == 256
    assert sorted(p.name for p in (tmp_path / "clusters" / "contact_sheets").glob("*.png")) == \
        ["largest.png", "random.png", "smallest.png"]

    # ClusterFit: the head starts at ~zero logits, so its loss starts at ln K and must go below it
    cf = tmp_path / "clusterfit"
    assert main(["train", "--recipe", "clusterfit_tiny", "--data", train, "--run-dir", str(cf), *COMMON,
                 f"data.labels={tmp_path / 'clusters'}", f"method.num_classes={K}",
                 "optim.lr=0.8", "loop.max_steps=24", "checkpoint.every_steps=24"]) == 0
    losses = _losses(cf)
    assert abs(losses[0] - math.log(K)) < 0.1
    assert np.mean(losses[-6:]) < math.log(K) - 0.25, losses

    assert main(["export", "--checkpoint", str(cf), "--format", "all", "--with-head", "--image-size", "32",
                 "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "training_curves.png").stat().st_size > 1000
    assert main(["eval", "knn", "--model", str(tmp_path / "export"), "--train", train, "--val", val, *size,
                 "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "eval_knn.json").read_text())
    assert result["num_val"] == 100 and 10.0 < result["metrics"]["top1"] <= 100.0
    assert (tmp_path / "eval" / "confusion_knn.png").stat().st_size > 1000

    # distillation from the ClusterFit run into a fresh student
    st = tmp_path / "student"
    assert main(["distill", "--teacher", str(cf), "--student", "resnet10_cifar", "--data", train, "--run-dir", str(st),
                 *COMMON, "optim.lr=0.8", "loop.max_steps=60", "checkpoint.every_steps=60"]) == 0
    teacher, student = _logits(cf, train), _logits(st, train)
    t_top = teacher.argmax(1)
    agree = (student.argmax(1) == t_top).float().mean().item()
    commonest = torch.bincount(t_top, minlength=K).max().item() / len(t_top)
    assert agree > commonest + 0.15 and agree > 0.5, (agree, commonest)

    assert main(["extract", "--checkpoint", str(st), "--data", val, "--layer", "pool", *size,
                 "--out", str(tmp_path / "student_feats")]) == 0
    from seerlike.plots import training_curves

    png = training_curves(cf, tmp_path / "curves.png")
    assert png.stat().st_size > 1000
