"""Noisy Student's pseudo-labels: threshold and class balancing, determinism, resume after a kill, reading back."""

from __future__ import annotations

import csv
import multiprocessing as mp
import os
import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from seerlike import models
from seerlike.semisup.labeling import LabelSettings, PseudoLabels, default_path, label_unlabeled, select

ARCH = "resnet10_cifar"

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- selection on a synthetic set


def _synthetic(counts: dict[int, list[float]], k: int = 4) -> tuple[list[str], np.ndarray]:
    """Rows whose top class and confidence are given; the rest of the mass spread over the other classes."""
    keys, probs = [], []
    for c, confs in counts.items():
        for i, p in enumerate(confs):
            row = np.full(k, (1 - p) / (k - 1), dtype=np.float32)
            row[c] = p
            keys.append(f"c{c}/{i:03d}")
            probs.append(row)
    order = np.random.default_rng(0).permutation(len(keys))  # selection must not depend on the input order
    return [keys[i] for i in order], np.stack(probs)[order]


def test_threshold_drops_unconfident_images_and_keeps_the_rest_once():
    keys, probs = _synthetic({0: [0.9, 0.5, 0.29, 0.31], 1: [0.8, 0.2], 2: [0.3]})
    t = select(keys, probs, LabelSettings(threshold=0.3, soft=False))
    assert t["key"].to_pylist() == sorted(["c0/000", "c0/001", "c0/003", "c1/000", "c2/000"])
    assert t["label"].to_pylist() == [0, 0, 0, 1, 2]
    assert t["copies"].to_pylist() == [1] * 5 and t["weight"].to_pylist() == [1.0] * 5
    np.testing.assert_allclose(t["confidence"].to_numpy(), [0.9, 0.5, 0.31, 0.8, 0.3], rtol=1e-6)
    assert "probs" not in t.column_names


def test_balancing_keeps_the_most_confident_and_duplicates_to_n_per_class():
    rng = np.random.default_rng(1)
    big = list(rng.uniform(0.4, 1.0, 50))  # class 0: 50 images -> its 10 most confident
    small = [0.6, 0.7, 0.8]  # class 1: 3 images -> 10 counted: 3 + 3 + 4 copies (one image drawn for the extra)
    keys, probs = _synthetic({0: big, 1: small, 2: [0.95] * 10, 3: [0.1]})  # class 3 falls under the threshold
    settings = LabelSettings(threshold=0.3, per_class=10, soft=True, seed=7)
    t = select(keys, probs, settings)
    label, copies = t["label"].to_numpy(), t["copies"].to_numpy()
    counted = np.bincount(label, weights=copies, minlength=4)
    assert counted.tolist() == [10, 10, 10, 0]
    conf0 = np.sort(t["confidence"].to_numpy()[label == 0])
    np.testing.assert_allclose(conf0, np.sort(big)[-10:], rtol=1e-6)  # the top 10, none of the others
    assert sorted(copies[label == 1].tolist()) == [3, 3, 4]
    assert copies[label == 2].tolist() == [1] * 10  # exactly N: untouched
    # weights: copies scaled to mean 1 over the kept rows
    np.testing.assert_allclose(t["weight"].to_numpy(), copies * len(copies) / copies.sum(), rtol=1e-6)
    assert float(t["weight"].to_numpy().mean()) == pytest.approx(1.0)
    # soft labels keep the teacher's distribution, row by row
    by_key = dict(zip(keys, probs))
    for key, row in zip(t["key"].to_pylist(), t["probs"].to_pylist()):
        np.testing.assert_allclose(row, by_key[key], rtol=1e-6)
    # the drawn duplicate depends on the seed only, not on the input order
    again = select(keys[::-1], probs[::-1], settings)
    assert again.equals(t)
    draws = {tuple(select(keys, probs, LabelSettings(threshold=0.3, per_class=10, seed=s))["copies"].to_pylist())
             for s in range(12)}
    assert len(draws) == 3  # each of class 1's images gets the extra copy for some seed


def test_ties_in_confidence_are_broken_by_key():
    keys, probs = _synthetic({0: [0.5] * 6})
    t = select(keys, probs, LabelSettings(threshold=0.0, per_class=4))
    assert t["key"].to_pylist() == ["c0/000", "c0/001", "c0/002", "c0/003"]


def test_pseudo_labels_read_back_as_weighted_targets(tmp_path):
    keys, probs = _synthetic({0: [0.9, 0.8], 1: [0.7]}, k=3)
    for soft in (True, False):
        t = select(keys, probs, LabelSettings(threshold=0.3, per_class=2, soft=soft, seed=0))
        path = tmp_path / f"soft{soft}.parquet"
        pq.write_table(t, path)
        pl = PseudoLabels(path, 3)
        rows = torch.tensor([pl.row_of[k] for k in ("c1/000", "c0/000")])
        got = pl.targets(rows)
        w = t["weight"].to_numpy()[rows.numpy()]
        if soft:
            want = np.stack([probs[keys.index("c1/000")], probs[keys.index("c0/000")]]) * w[:, None]
        else:
            want = np.array([[0, 1, 0], [1, 0, 0]]) * w[:, None]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
        assert w[0] == pytest.approx(2 * 3 / 4)  # class 1: one image counted twice, of 3 kept and 4 counted


# ---------------------------------------------------------------- labelling with a real teacher


def _teacher(tmp_path: Path) -> Path:
    from seerlike.data.augment import AugmentConfig, ViewConfig
    from seerlike.data.pipeline import DataConfig
    from seerlike.engine.config import ModelConfig, TrainConfig
    from seerlike.methods.classifier import Finetune
    from tests.unit.test_export import write_checkpoint

    torch.manual_seed(0)
    cfg = TrainConfig(model=ModelConfig(name=ARCH), method=Finetune.Config(num_classes=10),
                      data=DataConfig(augment=AugmentConfig(views=[ViewConfig(size=16)])))
    m = Finetune(cfg.method, models.build(ARCH))
    with torch.no_grad():
        m.head.weight.normal_(std=2.0)  # confident on some images: a threshold has something to do
    write_checkpoint(tmp_path / "teacher", m, cfg, step=4)
    return tmp_path / "teacher"


def _unlabeled(cifar_dir: Path, tmp_path: Path, n: int = 40) -> Path:
    rows = list(csv.DictReader(open(cifar_dir / "train.csv")))[::97][:n]
    path = tmp_path / "unlabeled.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path"])
        w.writerows([[str(cifar_dir / r["path"])] for r in rows])
    return path


SETTINGS = LabelSettings(threshold=0.2, per_class=5, soft=True, seed=3, image_size=16, resize=16, batch_size=8,
                         chunk_size=10)


def _label_and_kill(teacher: str, unlabeled: str, out: str) -> None:
    def kill(name: str) -> None:  # a real SIGKILL right after the second unit is written
        if name == "part-000001":
            os.kill(os.getpid(), signal.SIGKILL)

    torch.set_num_threads(1)
    label_unlabeled(teacher, unlabeled, out, SETTINGS, progress=False, after_unit=kill)


def test_labelling_is_deterministic_and_resumes_after_a_kill(cifar_dir, tmp_path):
    teacher, unlabeled = str(_teacher(tmp_path)), str(_unlabeled(cifar_dir, tmp_path))
    whole = tmp_path / "whole" / "labels.parquet"
    summary = label_unlabeled(teacher, unlabeled, whole, SETTINGS, progress=False)
    assert summary["predicted"] == 40 and 0 < summary["kept"] < 40  # the threshold removed some
    assert sum(summary["per_class"]) == summary["counted"]

    out = tmp_path / "killed" / "labels.parquet"
    proc = mp.get_context("fork").Process(target=_label_and_kill, args=(teacher, unlabeled, str(out)))
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL
    parts = sorted(p.name for p in (out.parent / "labels.parts").glob("*.parquet"))
    assert parts == ["part-000000.parquet", "part-000001.parquet"] and not out.exists()

    redone = []
    label_unlabeled(teacher, unlabeled, out, SETTINGS, progress=False, after_unit=redone.append)
    assert redone == ["part-000002", "part-000003"]  # the finished units were not predicted again
    assert pq.read_table(out).equals(pq.read_table(whole))
    assert out.read_bytes() == whole.read_bytes()
    # a third run keeps the file as it is
    label_unlabeled(teacher, unlabeled, out, SETTINGS, progress=False, after_unit=redone.append)
    assert len(redone) == 2


def test_parts_of_another_teacher_are_refused(cifar_dir, tmp_path):
    from seerlike.config import ConfigError

    teacher, unlabeled = str(_teacher(tmp_path)), str(_unlabeled(cifar_dir, tmp_path, n=12))
    out = tmp_path / "labels.parquet"
    with pytest.raises(RuntimeError, match="stop"):
        def stop(name):
            raise RuntimeError("stop")
        label_unlabeled(teacher, unlabeled, out, SETTINGS, progress=False, after_unit=stop)
    other = LabelSettings(**{**SETTINGS.__dict__, "image_size": 24, "resize": 24})
    with pytest.raises(ConfigError, match="another teacher or other settings"):
        label_unlabeled(teacher, unlabeled, out, other, progress=False)


def test_pseudo_labels_go_beside_an_ingested_datasets_manifest(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "manifest.parquet").write_bytes(b"")
    assert default_path(str(ds), tmp_path / "run", "t") == ds / "pseudo_labels" / "t.parquet"
    in_run = tmp_path / "run" / "pseudo_labels" / "t.parquet"
    assert default_path(str(tmp_path / "folder"), tmp_path / "run", "t") == in_run
    assert default_path("s3://b/ds", tmp_path / "run", "t") == in_run
