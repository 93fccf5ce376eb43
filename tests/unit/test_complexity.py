"""Analytic complexity: the published figures exactly, and agreement with the built modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seerlike import models
from seerlike.config import ConfigError
from seerlike.models import regnet as regnet_mod

# pycls / torchvision figures at 224 px with a 1000-class classifier (params, FLOPs = multiply-adds).
PUBLISHED = {
    "regnet_y_400mf": (4_344_144, 401_849_056),
    "regnet_y_8gf_pycls": (39_180_068, 7_963_074_196),  # pycls RegNetY-8.0GF
    "regnet_y_16gf": (83_590_140, 15_911_534_044),
    "regnet_y_32gf": (145_046_770, 32_279_583_362),
    "regnet_x_32gf": (107_811_560, 31_735_930_792),
    "resnet50": (25_557_032, 4_089_185_256),
}
PUBLISHED_PARAMS = {
    "resnext101_32x8d": 88_791_336,
    "regnet_y_128gf": 644_812_894,
    "regnet_x_1_6gf": 9_190_136,
}
# torchvision's `num_params` for every model it ships under the same name.
TORCHVISION_PARAMS = {
    "regnet_x_400mf": 5_495_976,
    "regnet_x_800mf": 7_259_656,
    "regnet_x_1_6gf": 9_190_136,
    "regnet_x_3_2gf": 15_296_552,
    "regnet_x_8gf": 39_572_648,
    "regnet_x_16gf": 54_278_536,
    "regnet_x_32gf": 107_811_560,
    "regnet_y_400mf": 4_344_144,
    "regnet_y_800mf": 6_432_512,
    "regnet_y_1_6gf": 11_202_430,
    "regnet_y_3_2gf": 19_436_338,
    "regnet_y_8gf": 39_381_472,
    "regnet_y_16gf": 83_590_140,
    "regnet_y_32gf": 145_046_770,
    "regnet_y_128gf": 644_812_894,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    "wide_resnet50_2": 68_883_240,
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_params_and_flops_exactly(name):
    cx = models.complexity(name, resolution=224, num_classes=1000)
    assert (cx["params"], cx["flops"]) == PUBLISHED[name]


@pytest.mark.parametrize("name", PUBLISHED_PARAMS)
def test_published_params_exactly(name):
    assert models.complexity(name)["params"] == PUBLISHED_PARAMS[name]


def test_every_torchvision_model_has_torchvisions_param_count():
    got = {name: models.complexity(name)["params"] for name in TORCHVISION_PARAMS}
    assert got == TORCHVISION_PARAMS


def test_seer_models_have_the_papers_widths_and_size():
    big = models.spec("regnet_y_256gf")
    assert (big.widths, big.depths, big.group_widths) == ((746, 1492, 4103, 10444), (2, 7, 17, 1), (373,) * 4)
    ten_b = models.spec("regnet_y_10b")
    assert (ten_b.widths, ten_b.depths) == ((2020, 4040, 11110, 28280), (2, 7, 17, 1))
    trunk_256 = models.complexity("regnet_y_256gf", num_classes=None)
    assert 1.27e9 < trunk_256["params"] < 1.28e9 and 254e9 < trunk_256["flops"] < 255e9
    trunk_10b = models.complexity("regnet_y_10b", num_classes=None)
    assert 9.3e9 < trunk_10b["params"] < 9.4e9 and 1.85e12 < trunk_10b["flops"] < 1.87e12


def test_torchvision_and_pycls_rounding_differ_where_expected():
    # torchvision rounds 392 (RegNetX-400MF stage 4) up to 400, pycls to the even 384.
    assert regnet_mod.make_divisible(392, 16) == 400
    assert regnet_mod.adjust_widths_groups([392], 1.0, 16, "pycls") == ([384], [16])
    assert models.spec("regnet_x_400mf").widths == (32, 64, 160, 400)
    assert models.spec("regnet_x_400mf_pycls").widths == (32, 64, 160, 384)
    assert models.spec("regnet_y_8gf").widths[0] == 224
    assert models.spec("regnet_y_8gf_pycls").widths[0] == 168
    # Narrow stages shrink the group width to the stage width.
    assert models.spec("regnet_x_8gf").group_widths == (80, 120, 120, 120)


def test_resolution_and_classes_scale_the_count():
    base = models.complexity("resnet50", 224, 1000)
    trunk = models.complexity("resnet50", 224, None)
    assert base["params"] - trunk["params"] == 2048 * 1000 + 1000
    assert base["flops"] - trunk["flops"] == 2048 * 1000 + 1000
    # Conv FLOPs scale with the feature-map area: 448 px is exactly 4x the convs of 224 px.
    big = models.complexity("resnet50", 448, None)
    assert big["flops"] == 4 * trunk["flops"]
    assert big["params"] == trunk["params"]


def test_parts_sum_to_totals_and_stage_sizes_follow_strides():
    cx = models.complexity("regnet_y_400mf", 224, 1000)
    assert [p["name"] for p in cx["parts"]][:2] == ["stem", "trunk_output.block1.block1-0"]
    assert cx["parts"][-1]["name"] == "head"
    assert len(cx["parts"]) == 2 + sum(models.spec("regnet_y_400mf").depths)
    for key in ("params", "flops", "acts"):
        assert sum(p[key] for p in cx["parts"]) == cx[key]
    assert [s["stride"] for s in cx["stages"]] == [4, 8, 16, 32]


def test_bad_inputs_are_config_errors():
    with pytest.raises(ConfigError, match="regnet_y_16gf"):
        models.complexity("regnet_y_16GF")
    with pytest.raises(ConfigError, match="resolution"):
        models.complexity("resnet50", resolution=0)


# ---------------------------------------------------------------- analytic vs the real module


def _measure(model: nn.Module, resolution: int) -> dict:
    """Count params, multiply-adds and output activations by running the module (on any device)."""
    tally = {"flops": 0, "acts": 0}

    def conv_hook(m, _inp, out):
        k = m.kernel_size[0] * m.kernel_size[1]
        tally["flops"] += out[0].numel() * k * m.in_channels // m.groups + (m.out_channels if m.bias is not None else 0)
        tally["acts"] += out[0].numel()

    def linear_hook(m, _inp, out):
        tally["flops"] += m.in_features * m.out_features + m.out_features
        tally["acts"] += out[0].numel()

    def pool_hook(_m, _inp, out):
        tally["acts"] += out[0].numel()

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(linear_hook)
        elif isinstance(m, nn.MaxPool2d):
            m.register_forward_hook(pool_hook)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution, device=device))
    return {"params": sum(p.numel() for p in model.parameters()), **tally}


@pytest.mark.parametrize(
    "name,resolution,num_classes",
    [
        ("regnet_y_400mf", 224, 1000),
        ("regnet_x_400mf", 97, 10),  # odd size: (h - 1) // 2 + 1 rounding everywhere
        ("resnet50", 224, 1000),
        ("resnext50_32x4d", 160, None),
        ("resnet18", 75, 1000),
        ("resnet10_cifar", 32, 10),
        ("resnet50w2", 96, None),
        ("regnet_y_256gf", 224, 1000),
        ("regnet_y_10b", 160, None),
    ],
)
def test_analytic_counts_equal_the_built_module(name, resolution, num_classes):
    # Meta tensors carry shapes only: even the 10B model builds and runs in milliseconds.
    with torch.device("meta"):
        model = models.build(name, num_classes=num_classes)
    measured = _measure(model, resolution)
    cx = models.complexity(name, resolution, num_classes)
    assert {k: cx[k] for k in ("params", "flops", "acts")} == measured
