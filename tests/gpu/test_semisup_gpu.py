"""CUDA paths of the semi-supervised stages: RandAugment on the device equals the CPU, a FixMatch step runs."""

from __future__ import annotations

import pytest
import torch

from seerlike import models
from seerlike.data.randaugment import RandAugmentConfig, apply_randaugment, sample_randaugment
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods.fixmatch import FixMatch
from seerlike.testing import micro_batch

pytestmark = pytest.mark.gpu


def test_randaugment_on_cuda_equals_the_cpu_bitwise():
    # host-side parameters, integer pixel arithmetic, no convolution: every op lands on the same levels
    cfg = RandAugmentConfig(num_ops=3, magnitude=12, random_magnitude=True, op_p=0.8, cutout=0.5, translate=0.125)
    x = torch.randint(0, 256, (256, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    p = sample_randaugment(cfg, x.shape[0], (40, 40), torch.Generator().manual_seed(1))
    cpu = apply_randaugment(x, cfg, p)
    gpu = apply_randaugment(x.cuda(), cfg, p)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)


def test_a_fixmatch_step_runs_in_bf16_on_cuda():
    torch.manual_seed(0)
    m = FixMatch(FixMatch.Config(num_classes=10, threshold=0.5), models.build("resnet10_cifar")).cuda()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    views = [torch.randn(8, 3, 32, 32, device="cuda"), torch.randn(56, 3, 32, 32, device="cuda"),
             torch.randn(56, 3, 32, 32, device="cuda")]
    before = m.ema.head.weight.clone()
    result = train_step(m, m, opt, None, [micro_batch(views, torch.randint(0, 10, (8,), device="cuda"))], step=0,
                        max_steps=10, precision=PrecisionConfig(dtype="bf16"), device=torch.device("cuda"))
    assert torch.isfinite(torch.tensor(result.loss)) and not torch.equal(m.ema.head.weight, before)
