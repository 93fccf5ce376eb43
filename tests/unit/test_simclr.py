"""SimCLR: NT-Xent against the formula written out, the head's shape, state round trip, training steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods.simclr import SimCLR, nt_xent
from seerlike.testing import micro_batch
from tests.unit.test_swav import TinyNet, _views

torch.set_num_threads(1)


def _simclr(**kw) -> SimCLR:
    torch.manual_seed(0)
    return SimCLR(SimCLR.Config(**{"temperature": 0.5, "proj_out": 8, **kw}), TinyNet())


def _nt_xent_by_hand(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """Each of the 2N embeddings against the 2N - 1 others; mean over view-1 anchors + mean over view-2 anchors."""
    z = [F.normalize(v, dim=0) for v in [*z1, *z2]]
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[j]) / t) for j in range(2 * n) if j != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / t) / denom)
    return total / n


def test_nt_xent_equals_the_formula_by_hand():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    for t in (0.1, 0.5):
        loss, acc = nt_xent(z1, z2, t)
        assert loss.item() == pytest.approx(_nt_xent_by_hand(z1, z2, t), rel=1e-5)
        assert 0.0 <= acc.item() <= 1.0
    # identical views far apart from each other: every positive is found, the loss is near 0
    loss, acc = nt_xent(torch.eye(4) * 5, torch.eye(4) * 5, 0.1)
    assert acc.item() == 1.0 and loss.item() < 1e-3


def test_forward_is_nt_xent_of_the_projected_views_in_one_batch():
    m = _simclr()
    v1, v2 = _views(0)
    loss, stats = m([v1, v2])
    with torch.no_grad():
        z = m.projector(m.backbone(torch.cat([v1, v2])))  # BN statistics over both views together
    assert loss.item() == pytest.approx(_nt_xent_by_hand(z[:4], z[4:], 0.5), rel=1e-5)
    assert set(stats) == {"acc"} and isinstance(stats["acc"], torch.Tensor)


def test_projection_head_is_the_official_three_layers():
    head = _simclr().projector
    linears = [l for l in head if isinstance(l, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(16, 16), (16, 16), (16, 8)]  # hidden = trunk width
    assert all(l.bias is None for l in linears)  # every Linear is followed by a BN
    assert isinstance(head[-1], nn.BatchNorm1d) and sum(isinstance(l, nn.ReLU) for l in head) == 2
    assert isinstance(_simclr(proj_layers=0).projector, nn.Identity)
    assert [l.out_features for l in _simclr(proj_layers=2, proj_hidden=32).projector if isinstance(l, nn.Linear)] == [32, 8]


def test_state_survives_a_round_trip():
    m = _simclr()
    m(_views(0))  # moves the BN running statistics
    fresh = SimCLR(m.cfg, TinyNet())
    fresh.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert torch.equal(fresh(_views(1))[0], m(_views(1))[0])


def test_train_steps_lower_the_loss_on_a_fixed_batch():
    m = _simclr()
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.5, weight_decay=0.0), m)
    views = _views(0, bs=8)
    losses = [train_step(m, m, opt, None, [micro_batch(views)], step=s, max_steps=5, precision=PrecisionConfig(dtype="fp32"),
                         device=torch.device("cpu")).loss for s in range(5)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert losses[0] == pytest.approx(2 * math.log(15), rel=0.2)  # 2N - 1 = 15 candidates, near chance at the start


def test_bad_config_and_inputs_fail_clearly():
    with pytest.raises(ValueError, match="temperature"):
        SimCLR.Config(temperature=0.0)
    with pytest.raises(ValueError, match="exactly 2 views"):
        SimCLR.check_views(SimCLR.Config(), [24, 24, 24])
    with pytest.raises(ValueError, match="2 views"):
        _simclr()(_views(0, n=3))
    with pytest.raises(ValueError, match="out_dim"):
        SimCLR(SimCLR.Config(), nn.Linear(3, 3))


@pytest.mark.gpu
def test_simclr_step_on_cuda_bf16():
    m = _simclr().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, stats = m([v.cuda() for v in _views(0)])
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and stats["acc"].is_cuda
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
