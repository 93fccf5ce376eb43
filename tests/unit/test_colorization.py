"""Colorization: the ab bins, soft-encoding, rebalancing, targets on synthetic images, the loss by hand,
the 1-channel trunk through checkpoint, export and extraction, the colour prior as state (the state round
trip and train steps of every pretext method: tests/unit/test_method_registry.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from seerlike import models
from seerlike.data.augment import IMAGENET_MEAN, IMAGENET_STD
from seerlike.methods import METHODS
from seerlike.methods.colorization import (Colorization, cells_reached, in_gamut_ab_bins, rebalancing_weights,
                                           soft_encode)
from seerlike.methods.pretext_ops import SRGB_TO_XYZ, D65_WHITE, srgb_to_lab
from seerlike.recipes import colorization as recipes

torch.set_num_threads(1)
SIZE = 16  # SpatialNet: res5 of 4x4; target_cells 2: 8x8 targets, each the mean of 2x2 pixels


class SpatialNet(nn.Module):
    """A BN-free trunk with the seerlike feature contract: res5 = relu(4x4 conv, stride 4)."""

    out_dim = 6
    stem_conv_name = "conv"

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.feature_dims = {"res5": 6, "pool": 6}
        self.set_in_channels(in_channels)

    def set_in_channels(self, channels: int) -> SpatialNet:
        self.conv = nn.Conv2d(channels, 6, 4, stride=4)
        self.in_channels = channels
        return self

    def forward_features(self, x, until="pool"):
        f = self.conv(x).relu()
        return {"res5": f} if until == "res5" else {"res5": f, "pool": f.mean((2, 3))}

    def forward(self, x):
        return self.forward_features(x)["pool"]


def _colorization(seed: int = 0, backbone: nn.Module | None = None, **kw) -> Colorization:
    torch.manual_seed(seed)
    return Colorization(Colorization.Config(**{"target_cells": 2, **kw}), backbone or SpatialNet())


def normalise(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] -> what the data pipeline hands over (ImageNet normalisation)."""
    return (rgb - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _images(seed: int, n: int = 2) -> torch.Tensor:
    """Smooth random colour images (so ab varies but not wildly), the last one grayscale."""
    g = torch.Generator().manual_seed(seed)
    rgb = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=SIZE, mode="bilinear")
    rgb[-1] = rgb[-1].mean(dim=0, keepdim=True)
    return rgb


# ---------------------------------------------------------------- bins, encoding, weights


def test_in_gamut_bins_are_the_cells_srgb_colours_reach():
    bins = in_gamut_ab_bins()
    assert bins.shape == (261, 2) and torch.equal(bins, bins.round()) and (bins % 10 == 0).all()
    assert bins.min(0).values.tolist() == [-90, -110] and bins.max(0).values.tolist() == [100, 90]
    assert [0.0, 0.0] in bins.tolist() and [80.0, 70.0] in bins.tolist()  # gray and pure red's bin
    assert sorted(map(tuple, bins.tolist())) == list(map(tuple, bins.tolist()))


def test_the_whole_8bit_cube_reaches_exactly_the_surface_bins():
    """All 2^24 8-bit colours, 32 red levels at a time: the same 261 cells as the cube's surface."""
    v = torch.arange(256, dtype=torch.float32) / 255
    lin = torch.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)
    m = torch.tensor(SRGB_TO_XYZ) / torch.tensor(D65_WHITE)[:, None]
    d = 6 / 29
    seen = set()
    for r in lin.split(32):
        xyz = (m[:, 0, None, None, None] * r[:, None, None] + m[:, 1, None, None, None] * lin[:, None]
               + m[:, 2, None, None, None] * lin)  # (3, 32, 256, 256)
        f = torch.where(xyz > d**3, xyz.clamp_min(d**3).pow_(1 / 3), xyz / (3 * d * d) + 4 / 29)
        ab = torch.stack([500 * (f[0] - f[1]), 200 * (f[1] - f[2])]).flatten(1)
        seen |= set(map(tuple, cells_reached(ab, 10).tolist()))
    assert seen == set(map(tuple, in_gamut_ab_bins().tolist()))


def test_soft_encoding_is_a_gaussian_over_the_5_nearest_bins():
    bins = in_gamut_ab_bins()
    ab = torch.tensor([[80.09, 67.20], [0.3, -0.7], [-33.3, 41.7]])  # no two bins equally near
    idx, w = soft_encode(ab, bins, 5, 5.0)
    for i, (a, b) in enumerate(ab.tolist()):
        d2 = sorted(((a - x) ** 2 + (b - y) ** 2, q) for q, (x, y) in enumerate(bins.tolist()))[:5]
        assert idx[i].tolist() == [q for _, q in d2]
        e = [math.exp(-d / 50.0) for d, _ in d2]
        assert w[i].tolist() == pytest.approx([x / sum(e) for x in e], abs=1e-6)
    assert bins[idx[0, 0]].tolist() == [80.0, 70.0] and bins[idx[1, 0]].tolist() == [0.0, 0.0]


def _weights_by_hand(counts, bins, lam, sigma):
    q = len(counts)
    total = sum(counts)
    p = [c / total for c in counts] if total else [1.0 / q] * q
    k = [[math.exp(-((bins[i][0] - bins[j][0]) ** 2 + (bins[i][1] - bins[j][1]) ** 2) / (2 * sigma**2))
          for j in range(q)] for i in range(q)]
    col = [sum(k[i][j] for i in range(q)) for j in range(q)]
    smoothed = [sum(k[i][j] / col[j] * p[j] for j in range(q)) for i in range(q)]
    w = [1.0 / ((1 - lam) * s + lam / q) for s in smoothed]
    z = sum(s * x for s, x in zip(smoothed, w))
    return [x / z for x in w], smoothed


def test_rebalancing_weights_follow_the_paper_by_hand():
    bins = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [50.0, 50.0], [60.0, 50.0]]
    counts = [90.0, 5.0, 4.0, 1.0, 0.0]
    got = rebalancing_weights(torch.tensor(counts, dtype=torch.float64), torch.tensor(bins), 0.5, 5.0)
    want, smoothed = _weights_by_hand(counts, bins, 0.5, 5.0)
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    assert sum(s * w for s, w in zip(smoothed, got.tolist())) == pytest.approx(1.0, rel=1e-5)
    assert got[3] > got[1] > got[0]  # rarer colours weigh more
    no_boost = rebalancing_weights(torch.tensor(counts, dtype=torch.float64), torch.tensor(bins), 1.0, 5.0)
    assert no_boost.tolist() == pytest.approx([1.0] * 5)  # lambda 1: the uniform prior, no rebalancing
    empty = rebalancing_weights(torch.zeros(5, dtype=torch.float64), torch.tensor(bins), 0.5, 5.0)
    assert empty.tolist() == pytest.approx(_weights_by_hand([0.0] * 5, bins, 0.5, 5.0)[0], rel=1e-5)


# ---------------------------------------------------------------- targets and the loss


def test_targets_and_the_colour_prior_on_synthetic_images():
    """A solid red image, a half red / half blue one and a gray one: every target bin is known."""
    red, blue = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    rgb = torch.zeros(3, 3, SIZE, SIZE)
    rgb[0] = red.view(3, 1, 1)
    rgb[1, :, :, :8] = red.view(3, 1, 1)
    rgb[1, :, :, 8:] = blue.view(3, 1, 1)
    rgb[2] = 0.5
    m = _colorization()
    lab = srgb_to_lab(rgb)
    ab, mask, ab_map = m.targets(lab, (8, 8))
    assert mask.view(3, 64).tolist() == [[1.0] * 64, [1.0] * 64, [0.0] * 64]  # the gray image is left out
    torch.testing.assert_close(ab_map[0, :, 3, 5], torch.tensor([80.092, 67.203]), atol=0.02, rtol=0)
    torch.testing.assert_close(ab_map[1, :, 3, 5], torch.tensor([79.188, -107.860]), atol=0.02, rtol=0)
    m([normalise(rgb)])
    bins = m.ab_bins.tolist()
    counted = {tuple(bins[q]): int(c) for q, c in enumerate(m.ab_counts.tolist()) if c}
    assert counted == {(80.0, 70.0): 64 + 32, (80.0, -110.0): 32}
    m.eval()
    m([normalise(rgb)])  # evaluation does not count
    assert int(m.ab_counts.sum()) == 128


def test_loss_is_the_weighted_soft_cross_entropy_written_out():
    m = _colorization(head_dims=())
    rgb = _images(0, n=3)
    m.ab_counts[:40] = torch.arange(40, dtype=torch.float64)  # a prior seen before
    before = m.ab_counts.clone()
    loss, stats = m([normalise(rgb)])
    bins = m.ab_bins.tolist()
    lab = srgb_to_lab(rgb)
    with torch.no_grad():
        logp = torch.log_softmax(m.head(m.backbone.forward_features((lab[:, :1] - 50) / 100, "res5")["res5"]), 1)
    rows = []  # (image, target pixel row, column, ab)
    for b in range(3):
        for y in range(8):
            for x in range(8):
                rows.append((b, y, x, lab[b, 1:, 2 * y:2 * y + 2, 2 * x:2 * x + 2].mean(dim=(1, 2)).tolist()))
    colourful = [any(abs(v) > 5 for _, _, _, ab in rows[64 * b:64 * b + 64] for v in ab) for b in range(3)]
    assert colourful == [True, True, False]
    nearest5 = []
    for _, _, _, (a, bb) in rows:
        nearest5.append(sorted(((a - p) ** 2 + (bb - q) ** 2, i) for i, (p, q) in enumerate(bins))[:5])
    counts = before.tolist()
    for (b, *_), near in zip(rows, nearest5):
        counts[near[0][1]] += colourful[b]
    assert m.ab_counts.tolist() == pytest.approx(counts)
    weight, _ = _weights_by_hand(counts, bins, 0.5, 5.0)
    total = hits = 0.0
    for (b, y, x, _), near in zip(rows, nearest5):
        e = [math.exp(-d / 50.0) for d, _ in near]
        cell = logp[b, :, y // 2, x // 2]
        ce = -sum(ei / sum(e) * float(cell[q]) for ei, (_, q) in zip(e, near))
        total += weight[near[0][1]] * colourful[b] * ce
        hits += int(cell.argmax()) == near[0][1]
    assert loss.item() == pytest.approx(total / len(rows), rel=1e-4)
    assert stats["acc"].item() == pytest.approx(hits / len(rows))
    assert stats["rgb_out_of_range"].item() == 0.0


def test_a_normalisation_mismatch_shows_in_the_stats():
    m = _colorization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # but the views are ImageNet-normalised
    _, stats = m([normalise(_images(6))])
    assert stats["rgb_out_of_range"].item() > 0.3


# ---------------------------------------------------------------- the 1-channel trunk


def test_a_seerlike_trunk_gets_one_input_channel():
    assert METHODS["colorization"] is Colorization
    m = _colorization(backbone=models.build("resnet10_cifar_w16"))
    assert m.backbone.in_channels == 1 and m.backbone.conv1.weight.shape == (16, 1, 3, 3)
    loss, _ = m([normalise(_images(1, n=2))])
    loss.backward()
    assert m.backbone.conv1.weight.grad.abs().sum() > 0
    assert models.build("resnet18", in_channels=1).conv1.weight.shape == (64, 1, 7, 7)
    assert models.build("regnet_y_200mf_cifar", in_channels=1).stem[0].weight.shape[1] == 1
    with pytest.raises(ValueError, match="seerlike backbone"):
        Colorization(Colorization.Config(), nn.Linear(3, 3))


def test_checkpoint_export_and_extraction_keep_the_lightness_input(tmp_path):
    from seerlike import config as configlib
    from seerlike import recipes as all_recipes
    from seerlike.checkpoints import load_backbone
    from seerlike.eval.extract import feature_fn
    from seerlike.exporter import export
    from tests.unit.test_export import write_checkpoint

    cfg = configlib.apply_overrides(all_recipes.get("tiny_colorization"), ["model.name=resnet10_cifar_w16"])
    m = _colorization(backbone=models.build("resnet10_cifar_w16")).eval()
    write_checkpoint(tmp_path / "run", m, cfg)
    loaded = load_backbone(tmp_path / "run")
    assert loaded.model.in_channels == 1
    meta = export(tmp_path / "run", tmp_path / "exp", ["safetensors", "torchscript"], progress=False)
    assert meta["build"] == {"name": "resnet10_cifar_w16", "num_classes": None, "in_channels": 1}
    assert not meta["torchvision_compatible"] and meta["checks"]["torchscript"] < 1e-4
    card = (tmp_path / "exp" / "MODEL_CARD.md").read_text()
    assert "in_channels=1" in card and "lightness float (N, 1, H, W)" in card
    assert json.loads((tmp_path / "exp" / "export.json").read_text())["build"]["in_channels"] == 1
    rebuilt = models.build(**meta["build"]).eval()
    again = load_backbone(tmp_path / "exp")
    rebuilt.load_state_dict(again.model.state_dict(), strict=True)
    rgb = _images(2, n=2)
    light = (srgb_to_lab(rgb)[:, :1] - 50) / 100
    with torch.no_grad():
        want = m.backbone(light)
        torch.testing.assert_close(rebuilt(light), want)
        # extraction hands over ImageNet-normalised RGB; the trunk gets the lightness it was trained on
        torch.testing.assert_close(feature_fn(again, "pool")(normalise(rgb)), want, atol=1e-5, rtol=1e-5)


def test_a_random_lightness_baseline_is_the_rgb_random_init_with_a_lightness_stem():
    """`random:ARCH:in_channels=1`: colorization's own random init, scored on the lightness as the trained trunk is."""
    from seerlike.checkpoints import load_backbone
    from seerlike.config import ConfigError
    from seerlike.eval.extract import feature_fn
    from seerlike.preflight import check_model

    rgb, light = load_backbone("random:resnet10_cifar_w16"), load_backbone("random:resnet10_cifar_w16:in_channels=1")
    assert (rgb.model.in_channels, light.model.in_channels) == (3, 1) and light.model.conv1.weight.shape[1] == 1
    a, b = rgb.model.state_dict(), light.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != "conv1.weight")  # only the stem differs
    assert torch.equal(load_backbone("random:resnet10_cifar_w16:in_channels=1").model.conv1.weight, b["conv1.weight"])
    assert torch.equal(load_backbone("random:resnet10_cifar_w16:in_channels=3").model.conv1.weight, a["conv1.weight"])
    images = _images(2, n=2)
    with torch.no_grad():
        want = light.model((srgb_to_lab(images)[:, :1] - 50) / 100)
        torch.testing.assert_close(feature_fn(light, "pool")(normalise(images)), want, atol=1e-5, rtol=1e-5)
    for bad in ("random:resnet10_cifar:in_channels=2", "random:resnet10_cifar:channels=1", "random:",
                "random:resnet10_cifar:in_channels"):
        with pytest.raises(ConfigError, match="random:ARCH:in_channels=1"):
            load_backbone(bad)
    check_model("random:resnet10_cifar:in_channels=1", "--model")
    with pytest.raises(ConfigError, match="in_channels=1"):
        check_model("random:resnet10_cifar:lightness", "--model")


# ---------------------------------------------------------------- state, steps, config


def test_the_colour_prior_is_state_and_reset_clears_it():
    # the round trip itself: tests/unit/test_method_registry.py, with the train steps
    m = _colorization(seed=0)
    m([normalise(_images(3))])
    assert m.ab_counts.sum() > 0
    assert {"ab_bins", "ab_counts"} <= set(m.state_dict())
    fresh = _colorization(seed=1)
    fresh.load_state_dict(m.state_dict())
    fresh.ab_counts.fill_(7)
    fresh.reset_state()
    assert fresh.ab_counts.sum() == 0 and torch.equal(fresh.ab_bins, m.ab_bins)


def test_recipes_and_bad_config():
    with pytest.raises(ValueError, match="rebalance_lambda"):
        Colorization.Config(rebalance_lambda=1.5)
    with pytest.raises(ValueError, match="target_cells"):
        Colorization.Config(target_cells=0)
    paper = recipes.colorization_resnet50()
    assert paper.optim.name == "adamw" and paper.optim.lr == pytest.approx(3e-5 * 256 / 40)
    assert paper.optim.betas == (0.9, 0.99)
    for cfg in (paper, recipes.tiny_colorization()):
        assert all(v.jitter_p == 0 and v.grayscale_p == 0 for v in cfg.data.augment.views)  # the targets stay true
        assert tuple(cfg.method.mean) == tuple(cfg.data.augment.mean) and tuple(cfg.method.std) == tuple(cfg.data.augment.std)
