"""Backbones: shapes, per-stage features, torchvision names, init, zero-init, stochastic depth, CLI."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from seerlike import models
from seerlike.cli import main as cli_main
from seerlike.config import ConfigError
from seerlike.models.backbone import drop_path
from seerlike.models.regnet import RegNetSpec, regnet

torch.set_num_threads(1)


def _seeded_build(name, **kw):
    torch.manual_seed(0)
    return models.build(name, **kw)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "name,res",
    [("regnet_x_400mf", 64), ("regnet_y_400mf", 64), ("resnet18", 64), ("resnet50", 64), ("resnext50_32x4d", 32), ("resnet10_cifar", 32),
     ("regnet_y_200mf_cifar", 32)],
)
def test_forward_backward_shapes(name, res):
    trunk = _seeded_build(name)
    x = torch.randn(2, 3, res, res)
    feats = trunk(x)
    assert feats.shape == (2, trunk.out_dim)
    feats.square().mean().backward()
    missing = [n for n, p in trunk.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing

    classifier = _seeded_build(name, num_classes=7)
    assert classifier(x).shape == (2, 7)
    assert classifier.out_dim == trunk.out_dim


@pytest.mark.parametrize("name,res", [("regnet_y_400mf", 64), ("resnet50", 64), ("resnet10_cifar", 32)])
def test_forward_features_are_the_stage_outputs(name, res):
    model = _seeded_build(name).eval()
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        out = model.forward_features(x)
        assert list(out) == ["res2", "res3", "res4", "res5", "pool"]
        for key in models.STAGE_KEYS:
            stride = model.feature_strides[key]
            assert out[key].shape == (2, model.feature_dims[key], res // stride, res // stride)
        assert out["pool"].shape == (2, model.out_dim)
        torch.testing.assert_close(out["pool"], model(x))
        torch.testing.assert_close(out["pool"], out["res5"].mean(dim=(2, 3)))
        # Stage outputs agree with the analytic complexity's feature-map sizes.
        stages = models.complexity(name, res)["stages"]
        assert [s["width"] for s in stages] == [model.feature_dims[k] for k in models.STAGE_KEYS]
        assert [s["stride"] for s in stages] == [model.feature_strides[k] for k in models.STAGE_KEYS]
        partial = model.forward_features(x, until="res4")
        assert list(partial) == ["res2", "res3", "res4"]
        torch.testing.assert_close(partial["res4"], out["res4"])
    with pytest.raises(ValueError, match="res4"):
        model.forward_features(x, until="layer3")


def test_strides_of_the_families():
    assert models.build("resnet50").feature_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    assert models.build("regnet_x_400mf").feature_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    assert models.build("resnet10_cifar").feature_strides == {"res2": 1, "res3": 2, "res4": 4, "res5": 8}
    assert models.build("regnet_y_200mf_cifar").feature_strides == {"res2": 2, "res3": 4, "res4": 8, "res5": 16}


def test_blocks_and_stages_are_separate_modules():
    model = models.build("regnet_y_400mf")
    spec = models.spec("regnet_y_400mf")
    stages = model.stages()
    assert [len(list(s.children())) for s in stages] == list(spec.depths) == [1, 3, 6, 6]
    blocks = model.blocks()
    assert len(blocks) == 16 and all(b.__class__.__name__ == "ResBottleneckBlock" for b in blocks)
    assert stages[0] is model.trunk_output.block1
    r50 = models.build("resnet50")
    assert r50.stages() == [r50.layer1, r50.layer2, r50.layer3, r50.layer4]
    assert len(r50.blocks()) == 16


def test_blocks_wrapped_one_by_one_for_activation_checkpointing_give_same_grads():
    plain = _seeded_build("resnet10_cifar")
    wrapped = copy.deepcopy(plain)
    for stage in wrapped.stages():
        for name, block in list(stage.named_children()):
            setattr(stage, name, checkpoint_wrapper(block))
    assert all(type(b).__name__ == "CheckpointWrapper" for b in wrapped.blocks())
    x = torch.randn(4, 3, 32, 32)
    plain(x).sum().backward()
    wrapped(x).sum().backward()
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in wrapped.named_parameters()}
    for n, p in plain.named_parameters():
        torch.testing.assert_close(grads[n], p.grad)


# ---------------------------------------------------------------- torchvision names


def test_resnet18_state_dict_keys_match_torchvision():
    sd = models.build("resnet18", num_classes=1000).state_dict()
    keys = list(sd)
    # torchvision resnet18: 62 parameters (conv1, bn1, 8 blocks x (2 convs + 2 BNs), 3 downsamples, fc)
    # + 60 BN buffers (20 BNs x running_mean/var/num_batches_tracked) = 122 entries.
    assert len(keys) == 122
    assert len(list(models.build("resnet18", num_classes=1000).parameters())) == 62
    assert keys[:7] == [
        "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
        "bn1.num_batches_tracked", "layer1.0.conv1.weight",
    ]
    assert keys[-3:] == ["layer4.1.bn2.num_batches_tracked", "fc.weight", "fc.bias"]
    for key, shape in {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.1.conv2.weight": (64, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_var": (128,),
        "layer4.1.bn2.bias": (512,),
        "fc.weight": (1000, 512),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert "layer1.0.downsample.0.weight" not in sd
    trunk = list(models.build("resnet18").state_dict())
    assert trunk == keys[:-2]


def test_resnext_and_wide_shapes_match_torchvision():
    with torch.device("meta"):
        sd = models.build("resnext101_32x8d").state_dict()
        assert tuple(sd["layer1.0.conv2.weight"].shape) == (256, 8, 3, 3)  # width 256 in 32 groups
        assert tuple(sd["layer4.2.conv3.weight"].shape) == (2048, 2048, 1, 1)
        wide = models.build("wide_resnet50_2").state_dict()
        assert tuple(wide["conv1.weight"].shape) == (64, 3, 7, 7)
        assert tuple(wide["layer1.0.conv2.weight"].shape) == (128, 128, 3, 3)
        assert tuple(wide["layer1.0.conv3.weight"].shape) == (256, 128, 1, 1)
        # SwAV's w2 widens the stem and every block output too.
        swav = models.build("resnet50w2").state_dict()
        assert tuple(swav["conv1.weight"].shape) == (128, 3, 7, 7)
        assert tuple(swav["layer1.0.conv2.weight"].shape) == (128, 128, 3, 3)
        assert tuple(swav["layer4.2.conv3.weight"].shape) == (4096, 1024, 1, 1)
        assert models.build("resnet50w5").out_dim == 10240


def test_regnet_y_400mf_state_dict_keys_match_torchvision():
    sd = models.build("regnet_y_400mf", num_classes=1000).state_dict()
    keys = list(sd)
    # 16 blocks x (a, b, c conv+BN = 9 params, SE 4 params) + 4 projections x 3 + stem 3 + fc 2 = 225 parameters;
    # buffers: stem 3 + 16 x 9 + 4 x 3 = 159.
    assert len(list(models.build("regnet_y_400mf", num_classes=1000).parameters())) == 225
    assert len(keys) == 384
    assert keys[:6] == [
        "stem.0.weight", "stem.1.weight", "stem.1.bias", "stem.1.running_mean", "stem.1.running_var",
        "stem.1.num_batches_tracked",
    ]
    assert keys[6] == "trunk_output.block1.block1-0.proj.0.weight"
    assert keys[-3:] == ["trunk_output.block4.block4-5.f.c.1.num_batches_tracked", "fc.weight", "fc.bias"]
    for key, shape in {
        "stem.0.weight": (32, 3, 3, 3),
        "trunk_output.block1.block1-0.proj.0.weight": (48, 32, 1, 1),
        "trunk_output.block1.block1-0.f.a.0.weight": (48, 32, 1, 1),
        "trunk_output.block1.block1-0.f.b.0.weight": (48, 8, 3, 3),  # 6 groups of 8
        "trunk_output.block1.block1-0.f.se.fc1.weight": (8, 48, 1, 1),  # SE: 0.25 x block input 32
        "trunk_output.block1.block1-0.f.se.fc2.bias": (48,),
        "trunk_output.block2.block2-1.f.se.fc1.weight": (26, 104, 1, 1),  # 0.25 x 104
        "trunk_output.block4.block4-5.f.c.1.weight": (440,),
        "fc.weight": (1000, 440),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert "trunk_output.block1.block1-1.proj.0.weight" not in sd  # no block1-1: depth 1
    assert "trunk_output.block2.block2-1.proj.0.weight" not in sd
    assert not any(k.startswith("fc.") for k in models.build("regnet_y_400mf").state_dict())


def test_every_torchvision_name_has_torchvisions_exact_state_dict_layout():
    # Recorded from torchvision 0.28 by golden/make_torchvision_golden.py: entry count and a hash
    # of the ordered "name:shape" lines, so a strict load into torchvision cannot fail.
    golden = json.loads((Path(__file__).parent / "golden" / "torchvision_state_dicts.json").read_text())["models"]
    assert len(golden) == 24
    got = {}
    with torch.device("meta"):
        for name in golden:
            lines = [f"{k}:{tuple(v.shape)}" for k, v in models.build(name, num_classes=1000).state_dict().items()]
            got[name] = {"entries": len(lines), "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}
    assert got == golden


def test_regnet_x_has_no_se():
    keys = models.build("regnet_x_400mf").state_dict()
    assert not any(".se." in k for k in keys)
    assert "trunk_output.block4.block4-11.f.c.0.weight" in keys


# ---------------------------------------------------------------- init, zero-init, stochastic depth


def test_initialisation_follows_torchvision():
    torch.manual_seed(0)
    rn = models.build("regnet_y_400mf", num_classes=1000)
    w = rn.trunk_output.block4[0].f.b[0].weight  # 440 out, 3x3: std sqrt(2 / (9 * 440))
    assert w.std().item() == pytest.approx(math.sqrt(2 / (9 * 440)), rel=0.03)
    assert rn.fc.weight.std().item() == pytest.approx(0.01, rel=0.03)
    assert rn.fc.bias.abs().max().item() == 0.0
    r50 = models.build("resnet50")
    w = r50.layer4[0].conv2.weight  # kaiming normal, fan_out = 512 * 9
    assert w.std().item() == pytest.approx(math.sqrt(2 / (9 * 512)), rel=0.03)
    bns = [m for m in r50.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in bns)


@pytest.mark.parametrize(
    "name,last", [("resnet18", "bn2"), ("resnet50", "bn3"), ("regnet_y_400mf", "f.c.1")]
)
def test_zero_init_residual_zeroes_exactly_the_last_bn_of_each_block(name, last):
    model = models.build(name, zero_init_residual=True)
    zero = {n for n, p in model.named_parameters() if n.endswith(".weight") and p.ndim == 1 and not p.any()}
    block_prefixes = {n for n, m in model.named_modules() if m in model.blocks()}
    assert zero == {f"{b}.{last}.weight" for b in block_prefixes}
    assert len(zero) == len(model.blocks())


def test_zero_init_blocks_start_as_identity():
    model = models.build("resnet50", zero_init_residual=True).eval()
    block = model.layer1[1]  # no downsample
    x = torch.rand(2, 256, 8, 8)  # post-ReLU inputs are >= 0
    with torch.no_grad():
        torch.testing.assert_close(block(x), x)


def test_drop_path_rates_rise_linearly_to_the_given_rate():
    model = models.build("regnet_x_400mf", drop_path=0.2)
    rates = [b.drop_path_rate for b in model.blocks()]
    assert rates[-1] == pytest.approx(0.2)
    assert rates == pytest.approx([0.2 * (i + 1) / 22 for i in range(22)])
    assert all(b.drop_path_rate == 0.0 for b in models.build("regnet_x_400mf").blocks())
    with pytest.raises(ValueError, match="drop_path"):
        models.build("resnet18", drop_path=1.0)


def test_drop_path_only_in_training():
    x = torch.ones(1000, 4, 2, 2)
    torch.manual_seed(0)
    out = drop_path(x, 0.25, training=True)
    per_sample = out.flatten(1)
    kept = torch.tensor(1 / 0.75)  # kept branches are rescaled by 1 / (1 - p)
    assert set(per_sample.unique().tolist()) == {0.0, kept.item()}
    assert ((per_sample == 0).all(1) | (per_sample == kept).all(1)).all()  # whole samples at once
    assert 0.2 < (per_sample[:, 0] == 0).float().mean().item() < 0.3
    assert drop_path(x, 0.25, training=False) is x

    plain = _seeded_build("resnet10_cifar").eval()
    dropped = copy.deepcopy(plain)
    dropped.set_drop_path(0.5)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dropped(x), plain(x))  # eval: identical
        plain.train()
        dropped.train()
        torch.manual_seed(1)
        assert not torch.allclose(dropped(x), plain(x))  # train: branches dropped


# ---------------------------------------------------------------- names, custom RegNets, errors


def test_names_cover_the_required_configs():
    got = set(models.names())
    required = {
        *(f"regnet_{f}_{s}" for f in "xy" for s in
          ("200mf", "400mf", "600mf", "800mf", "1_6gf", "3_2gf", "4gf", "6_4gf", "8gf", "12gf", "16gf", "32gf")),
        "regnet_y_64gf", "regnet_y_128gf", "regnet_y_256gf", "regnet_y_10b",
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
        "resnext101_32x16d", "resnext101_64x4d", "wide_resnet50_2", "resnet50w2", "resnet50w4", "resnet50w5",
        "resnet10_cifar", "resnet18_cifar", "regnet_y_200mf_cifar",
    }
    assert required <= got
    assert len(models.names()) == len(got)


def test_unknown_name_lists_close_names():
    with pytest.raises(ConfigError, match=r"regnet_y_16gf") as e:
        models.build("regnet_y16gf")
    assert "unknown backbone 'regnet_y16gf'" in str(e.value)
    with pytest.raises(ConfigError, match="num_classes"):
        models.build("resnet18", num_classes=0)


def test_custom_regnet_reproduces_seer_256gf_and_validates():
    with torch.device("meta"):
        model = regnet(depth=27, w0=640, wa=230.83, wm=2.53, group_width=373, se_ratio=0.25)
    assert model.spec == models.spec("regnet_y_256gf")
    assert model.out_dim == 10444
    with pytest.raises(ValueError, match="multiple of 8"):
        RegNetSpec.generate(depth=10, w0=30, wa=20.0, wm=2.5, group_width=8)
    with pytest.raises(ValueError, match="exactly 4 stages"):
        RegNetSpec.generate(depth=4, w0=24, wa=36.44, wm=2.49, group_width=8)  # too shallow: 3 stages
    small = regnet(depth=8, w0=16, wa=12.0, wm=2.0, group_width=8, se_ratio=0.25, bottleneck=1.0)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, small.out_dim)


# ---------------------------------------------------------------- `seerlike model-info`


def test_model_info_cli(capsys):
    assert cli_main(["model-info", "regnet_y_400mf", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["params"], info["flops"]) == (4_344_144, 401_849_056)
    assert [s["width"] for s in info["stages"]] == [48, 104, 208, 440]
    assert sum(s["params"] for s in info["stages"]) + 32 * 27 + 64 + 440 * 1000 + 1000 == info["params"]

    assert cli_main(["model-info", "resnet10_cifar", "--resolution", "32", "--num-classes", "0"]) == 0
    text = capsys.readouterr().out
    assert "1,226,400" in text and "res5" in text

    assert cli_main(["model-info", "--list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == models.names()

    assert cli_main(["model-info", "resnet5O"]) == 2
    assert "resnet50" in capsys.readouterr().err
