"""`seerlike quickstart` end to end on 400 real CIFAR images, then a rerun that skips every stage.

Tiny step counts: this checks the wiring (ingest -> 2-rank pretraining -> extract -> k-means
-> ClusterFit -> distillation -> export -> kNN of every model and both random inits -> report),
the progress output and the pipeline markers; benchmarks/bench_learning.py checks that the
default budget learns.
"""

from __future__ import annotations

import csv
import json
import random
import time

import pytest

from seerlike.cli import main
from seerlike.engine.precision import PrecisionConfig
from seerlike.quickstart import ARCH, MAX_STEPS, STUDENT, budget_for

pytestmark = pytest.mark.integration

STEPS = ["--pretrain-steps", "8", "--clusterfit-steps", "6", "--distill-steps", "6", "--k", "10"]


def _rows(cifar_dir, split):
    rows = list(csv.DictReader(open(cifar_dir / f"{split}.csv")))
    random.Random(0).shuffle(rows)
    return rows


def _csv(cifar_dir, rows, path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([str(cifar_dir / r["path"]), r["label"]] for r in rows)
    return str(path)


def _images(cifar_dir, rows, out):
    """Unlabeled images in class-free sub-folders (symlinks to the real files)."""
    for i, r in enumerate(rows):
        d = out / f"part{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:05d}.jpg").symlink_to(cifar_dir / r["path"])
    return str(out)


def test_quickstart_end_to_end_and_rerun_skips(tmp_path, cifar_dir, capsys):
    train = _rows(cifar_dir, "train")
    images = _images(cifar_dir, train[:400], tmp_path / "images")
    eval_train = _csv(cifar_dir, train[400:900], tmp_path / "eval_train.csv")
    eval_val = _csv(cifar_dir, _rows(cifar_dir, "val")[:200], tmp_path / "eval_val.csv")
    run = tmp_path / "run"
    argv = ["quickstart", "--images", images, "--eval-train", eval_train, "--eval-val", eval_val,
            "--run-dir", str(run), *STEPS]

    t0 = time.monotonic()
    assert main(argv) == 0
    first_s = time.monotonic() - t0
    out = capsys.readouterr().out
    # progress: every stage announced with the elapsed time, the stages' own log lines shown
    for stage in ("ingest", "pretrain", "cluster", "clusterfit", "distill", "export", "report"):
        assert f"{stage}: running" in out, out[-3000:]
    assert "pretrain | " in out and "training swav/resnet10_cifar" in out
    assert "written   400" in out  # the ingest summary, from the ingest job's log

    results = json.loads((run / "results.json").read_text())
    models = results["models"]
    assert set(models) == {"random_init", "swav", "clusterfit", "distilled", "random_init_student"}
    assert {n: m["arch"] for n, m in models.items()} == {
        "random_init": ARCH, "swav": ARCH, "clusterfit": ARCH, "distilled": STUDENT, "random_init_student": STUDENT}
    for name, m in models.items():
        assert 0.0 <= m["knn_top1"] <= m["knn_top5"] <= 100.0, (name, m)
        assert m["num_train"] == 500 and m["num_val"] == 200
        # ten classes, a learned or random net: clearly better than never right, below perfect
        assert 5.0 < m["knn_top1"] < 90.0, (name, m)
    assert models["swav"]["steps"] == 8 and models["clusterfit"]["steps"] == 6 and models["distilled"]["steps"] == 6
    for name in ("swav", "clusterfit", "distilled"):
        assert 0.0 < models[name]["seconds"] < first_s, (name, models[name]["seconds"])
    assert models["random_init"]["seconds"] == 0.0
    assert models["random_init"]["gain_over_random"] == 0.0
    assert models["swav"]["gain_over_random"] == pytest.approx(
        models["swav"]["knn_top1"] - models["random_init"]["knn_top1"], abs=0.01)
    # the trained models were evaluated from their own outputs, the student from its export
    assert models["distilled"]["model"].startswith(str(run / "export"))
    assert models["clusterfit"]["model"].startswith(str(run / "clusterfit"))
    assert results["kmeans"]["num_features"] == 400 and results["kmeans"]["num_clusters"] == 10
    assert (run / "ingest" / "manifest.parquet").is_file() and len(list((run / "ingest" / "shards").glob("*.tar"))) == 2
    assert set(results["stage_seconds"]) >= {"ingest", "pretrain", "extract", "cluster", "clusterfit", "distill",
                                              "export", "eval_distilled"}

    report = (run / "report.md").read_text()
    for name in models:
        assert f"| {name} | {models[name]['arch']} | {models[name]['knn_top1']:.1f} |" in report
    for png in ("loss_curves.png", "clusters_largest.png", "confusion_swav.png", "confusion_distilled.png"):
        assert (run / "plots" / png).stat().st_size > 2000, png
    assert (run / "export" / "backbone.safetensors").is_file()
    # each training stage ran the kNN monitor on the eval split: before its first and after its last step
    for stage in ("pretrain", "clusterfit", "distill"):
        knn = results["training"][stage]["knn"]
        assert len(knn) >= 2 and 0 <= knn[0][0] < knn[-1][0] and all(5.0 < top1 < 90.0 for _, top1 in knn), (stage, knn)
        assert results["training"][stage]["steps"] == models[{"pretrain": "swav", "distill": "distilled"}.get(
            stage, stage)]["steps"]
    assert (run / "plots" / "knn_monitor.png").stat().st_size > 2000
    assert "![kNN top-1 while training](plots/knn_monitor.png)" in report
    dtype = PrecisionConfig(dtype="auto").resolved("cpu").dtype  # what the tiny recipes train in on this CPU
    assert f"| pretraining | {dtype} | - |" in report
    assert "random_init" in out and f"{models['swav']['knn_top1']:9.1f}" in out  # the printed table

    # the same command again: every stage's marker matches, nothing reruns, same results
    before = (run / "results.json").read_text()
    t0 = time.monotonic()
    assert main(argv) == 0
    assert time.monotonic() - t0 < 10.0
    out = capsys.readouterr().out
    assert "already complete, skipped: ingest, eval_random, pretrain" in out and "running" not in out
    assert (run / "results.json").read_text() == before


def test_budget_fills_the_minutes_and_overrides_win():
    full = budget_for(15)
    half = budget_for(7.5)
    assert full.pretrain_s > 2 * half.pretrain_s > 0  # the fixed overhead comes off first
    # the default's pretraining stage is the learning benchmark's: 7.5 minutes of 2 cores = 15 CPU-minutes,
    # its steps and its kNN monitor together
    assert full.planned_s("pretrain") == pytest.approx(450, rel=0.01)
    assert full.planned_s("clusterfit") == full.planned_s("distill") == pytest.approx(150, rel=0.01)
    assert full.pretrain_s == pytest.approx(450 / 1.05, rel=0.01)
    # each stage calibrates its own length on the data and model: a time budget, an upper bound on steps
    args = full.train_args("pretrain", 0)
    assert args[:2] == ["--max-steps", str(MAX_STEPS)] and "loop.time_budget_s=429" in args
    assert "optim.warmup_steps=50" in args  # the full budget keeps the stage's whole warmup
    fixed = budget_for(15, pretrain_steps=7, distill_steps=3)
    assert fixed.train_args("pretrain", 0)[:2] == ["--max-steps", "7"]
    assert not any(a.startswith("loop.time_budget_s") for a in fixed.train_args("distill", 0))
    assert any(a.startswith("loop.time_budget_s") for a in fixed.train_args("clusterfit", 0))


def test_bad_inputs_fail_before_anything_runs(tmp_path, capsys):
    assert main(["quickstart", "--images", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r")]) == 2
    assert "--images" in capsys.readouterr().err
    assert main(["quickstart", "--store", "/local/path", "--run-dir", str(tmp_path / "r")]) == 2
    assert "s3://" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_an_installed_package_asks_for_images_instead_of_its_missing_defaults(tmp_path, capsys, monkeypatch):
    from seerlike import quickstart

    monkeypatch.setattr(quickstart, "SHARED_DATA", tmp_path / "site-packages" / "shared" / "data")
    monkeypatch.setattr(quickstart, "SOURCE_CHECKOUT", False)
    assert main(["quickstart", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "runs from an installed package" in err and "pass --images" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()
