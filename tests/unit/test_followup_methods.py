"""ClusterFit and distillation modules, and the pseudo-label join of the data pipeline."""

from __future__ import annotations

import csv

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from seerlike import models
from seerlike.methods.clusterfit import ClusterFit
from seerlike.methods.distill import Distill, Teacher, agreement

ARCH = "resnet10_cifar"

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(n=8, seed=0, size=16):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_clusterfit_loss_is_cross_entropy_and_checks_labels():
    torch.manual_seed(0)
    m = ClusterFit(ClusterFit.Config(num_classes=5), models.build(ARCH)).eval()
    x, y = _x(), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    with pytest.raises(ValueError, match="num_classes to the k"):  # k=8 labels, num_classes=5
        m([x], torch.full((8,), 7))
    with pytest.raises(ValueError, match="data.labels"):
        m([x])
    loss, stats = m([x, x], y)
    logits = m.logits(x)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, y))
    expected_acc = 100.0 * (logits.argmax(1) == y).float().mean()
    torch.testing.assert_close(stats["acc"], expected_acc)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        ClusterFit.Config(num_classes=1)


def _swav_teacher_run(tmp_path):
    from seerlike.data.augment import AugmentConfig, ViewConfig
    from seerlike.data.pipeline import DataConfig
    from seerlike.engine.config import ModelConfig, TrainConfig
    from seerlike.methods.swav import SwAV
    from tests.unit.test_export import write_checkpoint

    torch.manual_seed(0)
    cfg = TrainConfig(model=ModelConfig(name=ARCH), method=SwAV.Config(head_dims=(64, 16), num_prototypes=12, num_crops=2),
                      data=DataConfig(augment=AugmentConfig(views=[ViewConfig(count=2)])))
    swav = SwAV(cfg.method, models.build(ARCH)).eval()
    write_checkpoint(tmp_path / "swav", swav, cfg, step=3)
    return swav


def test_swav_style_distillation_predicts_the_teachers_sinkhorn_codes(tmp_path):
    swav = _swav_teacher_run(tmp_path)
    cfg = Distill.Config(teacher=str(tmp_path / "swav"), targets="prototypes", feature_weight=0.5)
    torch.manual_seed(1)
    student = Distill(cfg, models.build(ARCH))
    # the teacher is an input, not state: no teacher tensors in the checkpointable state
    assert not any(k.startswith(("_teacher", "teacher")) for k in student.state_dict())
    assert {"prototypes.weight", "feature_map.weight"} <= set(student.state_dict())
    x = _x(16)
    with torch.no_grad():
        feats, scores = student.teacher(x)
        _, want = swav.embed([x])
        torch.testing.assert_close(scores, want)  # the teacher really is the saved SwAV
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    student.train()
    first = None
    for step in range(10):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 convolution backward is slow on CPU
            loss, stats = student([x, x])
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        student.on_step_end(step, 10)
    assert float(loss) < first - 0.1 and "agreement" in stats
    assert torch.allclose(student.prototypes.weight.norm(dim=1), torch.ones(12), atol=1e-5)


def test_logit_distillation_reaches_agreement_on_a_fixed_batch(tmp_path):
    from seerlike.checkpoints import Loaded

    torch.manual_seed(0)
    trunk = models.build(ARCH).eval()
    head = torch.nn.Linear(trunk.out_dim, 6)
    with torch.no_grad():
        head.weight.mul_(20)  # confident, varied teacher predictions
    t = Teacher.__new__(Teacher)
    t.loaded, t.targets, t.swav = Loaded(trunk, ARCH, "test", head), "logits", None
    t.net = torch.nn.ModuleDict({"trunk": trunk, "head": head}).eval().requires_grad_(False)
    torch.manual_seed(2)
    student = Distill(Distill.Config(teacher="unused", targets="logits", temperature=1.0), models.build(ARCH), teacher=t)
    x = _x(16, seed=3)
    student.eval()
    before = agreement(student, t, x)
    student.train()
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    for _ in range(25):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 convolution backward is slow on CPU
            loss, _ = student([x])
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()
    after = agreement(student, t, x)
    assert after >= 90.0 and after > before + 30, (before, after)
    with pytest.raises(ValueError, match="feature_weight > 0"):
        Distill.Config(targets="none")


def test_pipeline_joins_pseudo_labels_by_key(tmp_path, cifar_dir):
    from seerlike.data.pipeline import DataConfig, build_train_data
    from seerlike.data.augment import AugmentConfig, ViewConfig

    files = sorted((cifar_dir / "val" / "dog").glob("*.jpg"))[:12]
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path"])
        for p in files:
            w.writerow([str(p)])
    keys = [str(p.with_suffix("")) for p in files]  # the pipeline's key: the listed path without suffix
    labels = {k: i % 3 for i, k in enumerate(keys)}
    (tmp_path / "labels").mkdir()
    # two parts, one key missing: that sample is skipped, never given a made-up label
    items = list(labels.items())
    pq.write_table(pa.table({"key": [k for k, _ in items[:6]], "cluster": pa.array([c for _, c in items[:6]], pa.int32())}),
                   tmp_path / "labels" / "features-a.parquet")
    pq.write_table(pa.table({"key": [k for k, _ in items[6:11]], "cluster": pa.array([c for _, c in items[6:11]], pa.int32())}),
                   tmp_path / "labels" / "features-b.parquet")
    cfg = DataConfig(source=str(tmp_path / "d.csv"), labels=str(tmp_path), batch_size=4, num_workers=0,
                     augment=AugmentConfig(views=[ViewConfig(size=16)]))
    batch = next(iter(build_train_data(cfg)))
    assert batch.labels is not None and len(batch.keys) == 4
    assert batch.labels.tolist() == [labels[k] for k in batch.keys]


def test_a_colorization_teacher_sees_the_lightness_of_the_views(tmp_path):
    """A colorization checkpoint's trunk takes (L - 50) / 100; the distill views are normalised RGB."""
    from seerlike import config as configlib
    from seerlike import recipes
    from seerlike.data.augment import IMAGENET_MEAN, IMAGENET_STD
    from seerlike.methods.colorization import Colorization
    from seerlike.methods.pretext_ops import srgb_to_lab
    from tests.unit.test_export import write_checkpoint

    arch = "resnet10_cifar_w16"
    cfg = configlib.apply_overrides(recipes.get("tiny_colorization"), [f"model.name={arch}"])
    torch.manual_seed(0)
    colorization = Colorization(cfg.method, models.build(arch)).eval()
    write_checkpoint(tmp_path / "colorization", colorization, cfg)
    distill = Distill(Distill.Config(teacher=str(tmp_path / "colorization"), targets="none", feature_weight=1.0),
                      models.build(arch))
    assert distill.teacher.in_channels == 1 and distill.backbone.in_channels == 3
    rgb = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    views = (rgb - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        want = colorization.backbone((srgb_to_lab(rgb)[:, :1] - 50) / 100)
    feats, _ = distill.teacher(views)
    torch.testing.assert_close(feats, want, atol=1e-5, rtol=1e-5)
    loss, _ = distill([views, views.flip(-1)])
    loss.backward()
    assert torch.isfinite(loss) and distill.backbone.conv1.weight.grad.abs().sum() > 0
    # the views' normalisation the teacher undoes is the data's: a mismatch is refused up front
    with pytest.raises(ValueError, match=r"method.mean=\(0.5, 0.5, 0.5\) must equal data.augment.mean"):
        configlib.apply_overrides(recipes.get("distill_tiny"), ["method.mean=[0.5,0.5,0.5]"])
