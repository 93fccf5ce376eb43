"""The semi-supervised stages end to end on real CIFAR images: CLI and API, iterations, exact resume, pipelines."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import seerlike
from seerlike.cli import main as seerlike_main
from seerlike.config import ConfigError
from seerlike.engine import checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

# small and quick: 16 px crops of the 32 px images, a few images per step
SMALL = ["loop.progress=false", "loop.tensorboard=false", "loop.log_every=1", "checkpoint.every_steps=2",
         "data.batch_size=4", "precision.dtype=fp32"]


def _csv(cifar_dir: Path, out: Path, rows: list[dict], labels: bool = True) -> Path:
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"] if labels else ["path"])
        w.writerows([[str(cifar_dir / r["path"])] + ([r["label"]] if labels else []) for r in rows])
    return out


@pytest.fixture(scope="module")
def data(cifar_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("semisup_data")
    rows = list(csv.DictReader(open(cifar_dir / "train.csv")))
    by_class: dict[str, list] = {}
    for r in rows:
        by_class.setdefault(r["label"], []).append(r)
    labeled = [r for c in sorted(by_class) for r in by_class[c][:2]]  # 2 per class
    unlabeled = rows[1000::97][:30]
    return {"labeled": _csv(cifar_dir, tmp / "labeled.csv", labeled),
            "unlabeled": _csv(cifar_dir, tmp / "unlabeled.csv", unlabeled, labels=False), "tmp": tmp}


@pytest.fixture(scope="module")
def teacher(data):
    """A fine-tuned classifier, made through the command line."""
    run = data["tmp"] / "finetune"
    views = "data.augment.views=[{size: 16, scale: [1.0, 1.0], ratio: [1.0, 1.0], jitter_p: 0.0, grayscale_p: 0.0, " \
            "randaugment: {translate: 0.125}}]"
    rc = seerlike_main(["finetune", "--data", str(data["labeled"]), "--init", "random:resnet10_cifar", "--run-dir",
                        str(run), "--max-steps", "3", "--backbone-lr", "0.5", *SMALL, views])
    assert rc == 0
    return run


def test_finetune_records_classes_and_learning_rates_and_its_run_is_a_classifier(teacher):
    from seerlike.checkpoints import load_backbone

    saved = (teacher / "config.yaml").read_text()
    assert "- airplane" in saved and "num_classes: 10" in saved and "backbone: 0.5" in saved
    loaded = load_backbone(teacher)
    assert loaded.step == 3 and loaded.head is not None and loaded.head.out_features == 10


def test_noisy_student_iterates_with_each_student_teaching_the_next(data, teacher):
    run = data["tmp"] / "noisy"
    # the second student is smaller than the first (allowed explicitly: a smaller backbone is cheaper here)
    result = seerlike.selftrain("noisy_student", data["labeled"], data["unlabeled"], run, teacher=teacher,
                                init=teacher, progress=False,
                                overrides=[*SMALL, "loop.max_steps=2", "method.iterations=2", "method.threshold=0.0",
                                           "method.label_image_size=16", "method.label_resize=16", "method.per_class=20", "method.unlabeled_ratio=2",
                                           "method.students=[resnet10_cifar, resnet10_cifar_w16]",
                                           "method.allow_smaller_student=true"])
    assert result.method == "noisy_student" and result.step == 2
    assert result.iterations == [run / "iter1", run / "iter2"] and result.run_dir == run / "iter2"
    first, second = (json.loads(p.with_suffix(".json").read_text()) for p in result.pseudo_labels)
    assert first["teacher"] == str(checkpoint.latest(teacher)) and first["predicted"] == 30
    assert second["teacher"] == str(checkpoint.latest(run / "iter1"))  # the first student teaches the second
    assert first["counted"] == 20 * sum(1 for c in first["per_class"] if c)  # balanced: 20 per class present
    cfg2 = (run / "iter2" / "config.yaml").read_text()
    assert "name: resnet10_cifar_w16" in cfg2 and "init: ''" in cfg2  # another backbone: no pretrained init
    assert "pseudo_labels: " + str(result.pseudo_labels[1]) in cfg2
    rows = [json.loads(line) for line in (run / "iter1" / "metrics.jsonl").read_text().splitlines()]
    assert {"agreement", "loss_u", "loss_l"} <= set(rows[-1])
    # a rerun finds everything done: no labelling, no training
    again = seerlike.selftrain("noisy_student", data["labeled"], data["unlabeled"], run, teacher=teacher,
                               init=teacher, progress=False,
                               overrides=[*SMALL, "loop.max_steps=2", "method.iterations=2", "method.threshold=0.0",
                                          "method.label_image_size=16", "method.label_resize=16", "method.per_class=20", "method.unlabeled_ratio=2",
                                          "method.students=[resnet10_cifar, resnet10_cifar_w16]",
                                          "method.allow_smaller_student=true"])
    assert again.checkpoint == result.checkpoint and again.pseudo_labels == result.pseudo_labels


FIXMATCH = [*SMALL, "method.unlabeled_ratio=2", "method.threshold=0.5", "optim.final_lr=0.12",
            "method.strong.size=16", "data.augment.views=[{size: 16, scale: [1.0, 1.0], ratio: [1.0, 1.0], "
            "jitter_p: 0.0, grayscale_p: 0.0, randaugment: {translate: 0.125}}]"]


def test_fixmatch_resumes_exactly_like_an_uninterrupted_run(data, teacher):
    """Constant LR (final_lr = lr): stopping at step 2 and continuing to 4 must equal 4 steps in one go."""
    straight = seerlike.selftrain("fixmatch", data["labeled"], data["unlabeled"], data["tmp"] / "fm_straight",
                                  init=teacher, overrides=[*FIXMATCH, "loop.max_steps=4"], progress=False)
    half = seerlike.selftrain("fixmatch", data["labeled"], data["unlabeled"], data["tmp"] / "fm_resumed",
                              init=teacher, overrides=[*FIXMATCH, "loop.max_steps=2"], progress=False)
    assert half.step == 2
    resumed = seerlike.selftrain("fixmatch", data["labeled"], data["unlabeled"], data["tmp"] / "fm_resumed",
                                 init=teacher, overrides=[*FIXMATCH, "loop.max_steps=4"], progress=False)
    assert straight.step == resumed.step == 4
    a = checkpoint.load_tensors(straight.checkpoint, "model.")
    b = checkpoint.load_tensors(resumed.checkpoint, "model.")
    assert set(a) == set(b) and any(k.startswith("ema.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    data_state = json.loads((resumed.checkpoint / "rank_00000.json").read_text())["data"]
    assert set(data_state) == {"labeled", "unlabeled"}  # both streams' positions are in the checkpoint
    assert data_state["unlabeled"]["batch_size"] == 2 * data_state["labeled"]["batch_size"]
    rows = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"mask", "loss_u", "loss_x"} <= set(rows[-1])


def test_bad_inputs_fail_before_anything_runs(data, teacher, tmp_path):
    with pytest.raises(ConfigError, match="class folders .* or a path,label CSV"):
        seerlike.finetune(data["unlabeled"], tmp_path / "x", init=teacher)  # no labels
    with pytest.raises(ConfigError, match="needs a teacher"):
        seerlike.selftrain("noisy_student", data["labeled"], data["unlabeled"], tmp_path / "y")
    with pytest.raises(ConfigError, match=r"student resnet10_cifar_w16 \(.* smaller than its teacher resnet10_cifar"):
        seerlike.selftrain("noisy_student", data["labeled"], data["unlabeled"], tmp_path / "v", teacher=teacher,
                           overrides=["method.students=[resnet10_cifar_w16]"])
    with pytest.raises(ConfigError, match="is not a fixmatch recipe"):
        seerlike.selftrain("fixmatch", data["labeled"], data["unlabeled"], tmp_path / "z", recipe="finetune_tiny")
    assert not any((tmp_path / d).exists() for d in "xyv")
    # a teacher trained on other classes
    other = tmp_path / "other.csv"
    rows = list(csv.DictReader(open(data["labeled"])))
    with open(other, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([[r["path"], "x" + r["label"]] for r in rows])
    with pytest.raises(ConfigError, match="wrong classes"):
        seerlike.selftrain("noisy_student", other, data["unlabeled"], tmp_path / "w", teacher=teacher)


def test_the_stages_submit_and_chain_in_a_pipeline(data, tmp_path):
    from launchers.pipeline import PIPELINES, resolve
    from launchers.submit import STAGES, validate_stage

    assert {"finetune", "selftrain"} <= set(STAGES)
    p = PIPELINES["semisup_tiny"](str(data["labeled"]), str(tmp_path / "pipe"))
    p.vars["labeled"] = str(data["labeled"])
    stages = resolve(p)
    assert [s.name for s, _, _ in stages] == ["pretrain", "finetune", "noisy_student", "fixmatch"]
    for stage, argv, _ in stages:  # every stage's command line parses and builds its config
        validate_stage(stage.command, argv)
    noisy, argv, _ = stages[2]
    assert noisy.command == "selftrain" and argv[argv.index("--teacher") + 1] == str(tmp_path / "pipe" / "finetune")
