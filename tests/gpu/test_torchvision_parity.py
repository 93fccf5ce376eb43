"""Our backbones are torchvision's (and timm's ResNets): state dicts load strictly both ways, same logits on CUDA.

BatchNorm affine parameters and running statistics are randomised first so that eval mode
is not an identity. Logits are compared in fp32 without TF32; the max abs difference,
relative to the largest logit, is recorded as a test property (``--junitxml``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seerlike import models

pytestmark = pytest.mark.gpu

TORCHVISION = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "regnet_y_400mf", "regnet_x_1_6gf",
               "regnet_y_1_6gf", "regnet_y_16gf"]
TIMM = ["resnet18", "resnet50", "resnext50_32x4d"]


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _relative_diff(a: nn.Module, b: nn.Module) -> float:
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        ya, yb = a.cuda().eval()(x), b.cuda().eval()(x)
    assert ya.shape == yb.shape == (4, 1000)
    return float((ya - yb).abs().max() / yb.abs().max())


@pytest.mark.parametrize("name", TORCHVISION)
def test_logits_match_torchvision(exact_cuda, record_property, name):
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    theirs = _randomise_bn(getattr(tvm, name)())
    ours = models.build(name, num_classes=1000)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    to_ours = _relative_diff(ours, theirs)
    fresh = _randomise_bn(models.build(name, num_classes=1000))
    theirs.load_state_dict(fresh.state_dict(), strict=True)
    to_theirs = _relative_diff(theirs, fresh)
    record_property("rel_max_abs_diff", max(to_ours, to_theirs))
    assert to_ours < 1e-5 and to_theirs < 1e-5, (to_ours, to_theirs)


@pytest.mark.parametrize("name", TIMM)
def test_timm_resnets_load_ours(exact_cuda, record_property, name):
    timm = pytest.importorskip("timm")
    ours = _randomise_bn(models.build(name, num_classes=1000))
    theirs = timm.create_model(name, pretrained=False)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    diff = _relative_diff(theirs, ours)
    record_property("rel_max_abs_diff", diff)
    assert diff < 1e-5, diff
