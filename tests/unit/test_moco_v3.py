"""MoCo v3: the scaled InfoNCE against the formula, heads, the momentum schedule and EMA by hand, state round trip."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods.moco_v3 import MoCoV3, contrastive_loss
from seerlike.testing import micro_batch
from tests.unit.test_swav import TinyNet, _views

torch.set_num_threads(1)


def _moco(**kw) -> MoCoV3:
    torch.manual_seed(0)
    base = dict(projector_dims=(32, 8), predictor_dims=(16, 8), temperature=0.5, momentum=0.9)
    return MoCoV3(MoCoV3.Config(**{**base, **kw}), TinyNet())


def _ctr_by_hand(q: torch.Tensor, k: torch.Tensor, t: float) -> float:
    """Mean over queries of -log softmax of (q_i . k_i) among (q_i . k_j) for all j, times 2t."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    total = 0.0
    for i in range(q.shape[0]):
        denom = sum(math.exp(float(q[i] @ k[j]) / t) for j in range(k.shape[0]))
        total += -math.log(math.exp(float(q[i] @ k[i]) / t) / denom)
    return 2 * t * total / q.shape[0]


def test_contrastive_loss_equals_the_formula_by_hand():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    for t in (0.2, 1.0):
        loss, acc = contrastive_loss(q, k, t)
        assert loss.item() == pytest.approx(_ctr_by_hand(q, k, t), rel=1e-5)
    q.requires_grad_(True)
    k.requires_grad_(True)
    contrastive_loss(q, k, 1.0)[0].backward()
    assert q.grad is not None and k.grad is None  # keys are targets, never trained through


def test_forward_is_the_symmetric_sum_with_per_view_forwards():
    m = _moco()
    v1, v2 = _views(0)
    loss, stats = m([v1, v2])
    with torch.no_grad():
        q1, q2 = (m.predictor(m.projector(m.backbone(v))) for v in (v1, v2))
        k1, k2 = (m.momentum_encoder(v) for v in (v1, v2))
    expected = _ctr_by_hand(q1, k2, 0.5) + _ctr_by_hand(q2, k1, 0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert 0.0 <= stats["acc"].item() <= 1.0


def test_heads_are_the_official_resnet_form():
    m = _moco()
    lin = [l for l in m.projector if isinstance(l, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(16, 32), (32, 8)] and all(l.bias is None for l in lin)
    assert isinstance(m.projector[-1], nn.BatchNorm1d) and not m.projector[-1].affine  # last BN: no gamma, no beta
    assert isinstance(m.predictor[-1], nn.Linear) and m.predictor[-1].bias is None  # predictor ends without BN
    assert [l.out_features for l in m.predictor if isinstance(l, nn.Linear)] == [16, 8]


def test_momentum_schedule_is_a_cosine_from_the_base_to_one():
    m = _moco(momentum=0.99)
    assert m.momentum_at(0, 100) == pytest.approx(0.99, abs=1e-12)
    assert m.momentum_at(50, 100) == pytest.approx(0.995, abs=1e-12)
    assert m.momentum_at(100, 100) == pytest.approx(1.0, abs=1e-12)
    assert m.momentum_at(30, 100) == pytest.approx(1 - 0.01 * (math.cos(math.pi * 0.3) + 1) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="max_steps"):
        m.momentum_at(0, 0)


def test_momentum_encoder_is_a_frozen_ema_of_trunk_and_projector():
    m = _moco(momentum=0.9)
    opt = build_optimizer(OptimConfig(name="sgd", lr=25.6, weight_decay=0.0), m)
    assert not {id(p) for g in opt.param_groups for p in g["params"]} & {id(p) for p in m.momentum_encoder.parameters()}
    expected = [p.detach().clone() for p in m.momentum_encoder.parameters()]
    initial = [e.clone() for e in expected]
    max_steps = 4
    for step in range(max_steps):
        train_step(m, m, opt, None, [micro_batch(_views(step))], step=step, max_steps=max_steps,
                   precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu"))
        mom = 1 - 0.1 * (math.cos(math.pi * (step + 1) / max_steps) + 1) / 2  # next iteration's momentum
        online = [*m.backbone.parameters(), *m.projector.parameters()]
        expected = [mom * e + (1 - mom) * o.detach() for e, o in zip(expected, online)]
        for e, t in zip(expected, m.momentum_encoder.parameters()):
            torch.testing.assert_close(t, e, atol=1e-6, rtol=1e-6)
        assert all(p.grad is None for p in m.momentum_encoder.parameters())
    moved = [t - i for t, i in zip(m.momentum_encoder.parameters(), initial)]
    assert max(d.abs().max().item() for d in moved) > 1e-4


def test_state_survives_a_round_trip():
    m = _moco()
    opt = build_optimizer(OptimConfig(name="sgd", lr=25.6, weight_decay=0.0), m)
    for step in range(2):
        train_step(m, m, opt, None, [micro_batch(_views(step))], step=step, max_steps=4,
                   precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu"))
    state = m.state_dict()
    assert any(k.startswith("momentum_encoder.backbone.") for k in state)
    assert any(k.startswith("momentum_encoder.head.") for k in state)
    fresh = _moco()
    fresh.load_state_dict(state)
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert torch.equal(fresh(_views(5))[0], m(_views(5))[0])


def test_reset_state_copies_online_into_the_momentum_encoder():
    m = _moco()
    with torch.no_grad():
        for p in m.momentum_encoder.parameters():
            p.add_(1.0)
    m(_views(0))  # moves BN running statistics
    m.reset_state()
    online = [*m.backbone.state_dict().values(), *m.projector.state_dict().values()]
    for o, t in zip(online, m.momentum_encoder.state_dict().values()):
        assert torch.equal(o, t)


def test_bad_config_and_inputs_fail_clearly():
    with pytest.raises(ValueError, match="predictor_dims"):
        MoCoV3.Config(projector_dims=(32, 8), predictor_dims=(16, 4))
    with pytest.raises(ValueError, match="momentum"):
        MoCoV3.Config(momentum=1.5)
    with pytest.raises(ValueError, match="exactly 2 views"):
        MoCoV3.check_views(MoCoV3.Config(), [24])
    with pytest.raises(ValueError, match="2 views"):
        _moco()(_views(0, n=3))


@pytest.mark.gpu
def test_moco_v3_step_on_cuda_bf16():
    m = _moco().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, stats = m([v.cuda() for v in _views(0)])
    loss.backward()
    m.on_step_end(0, 4)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and stats["acc"].is_cuda
    assert all(torch.isfinite(p.grad).all() for p in m.predictor.parameters())
