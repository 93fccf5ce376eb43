"""BYOL: loss formula and range, EMA target by hand, no gradients into the target."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.methods.byol import BYOL
from tests.unit.test_swav import TinyNet, _views

torch.set_num_threads(1)


def _byol(**kw) -> BYOL:
    torch.manual_seed(0)
    base = dict(projector_dims=(32, 8), predictor_dims=(16, 8), tau_base=0.9)
    return BYOL(BYOL.Config(**{**base, **kw}), TinyNet())


def test_tau_schedule_endpoints():
    m = _byol(tau_base=0.996)
    assert m.tau(0, 100) == pytest.approx(0.996, abs=1e-12)
    assert m.tau(50, 100) == pytest.approx(1 - 0.004 / 2, abs=1e-12)
    assert m.tau(100, 100) == pytest.approx(1.0, abs=1e-12)
    assert m.tau(30, 100) == pytest.approx(1 - 0.004 * (math.cos(math.pi * 0.3) + 1) / 2, abs=1e-12)


def test_target_starts_as_a_frozen_copy():
    m = _byol()
    online = [*m.backbone.parameters(), *m.projector.parameters()]
    target = list(m.target.parameters())
    assert len(online) == len(target) > 0
    for o, t in zip(online, target):
        assert torch.equal(o, t) and o.data_ptr() != t.data_ptr() and not t.requires_grad
    assert any(k.startswith("target.backbone.") for k in m.state_dict())


def test_loss_is_the_symmetric_sum_of_2_minus_2cos():
    m = _byol()
    v1, v2 = _views(0)
    loss, _ = m([v1, v2])
    with torch.no_grad():
        p = m.predictor(m.projector(m.backbone(torch.cat([v1, v2]))))
        t = m.target(torch.cat([v1, v2]))
        p1, p2, t1, t2 = (F.normalize(x, dim=1) for x in (*p.chunk(2), *t.chunk(2)))
        expected = (2 - 2 * (p1 * t2).sum(1)).mean() + (2 - 2 * (p2 * t1).sum(1)).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    assert 0.0 <= loss.item() <= 8.0


def test_target_gets_no_gradient_and_is_not_optimised():
    m = _byol()
    opt = build_optimizer(OptimConfig(name="lars", lr=0.1), m)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in m.target.parameters()}
    loss, _ = m(_views(0))
    loss.backward()
    assert all(p.grad is None for p in m.target.parameters())
    assert all(p.grad is not None for p in m.predictor.parameters())


def test_ema_update_equals_the_formula_by_hand():
    m = _byol(tau_base=0.9)
    opt = build_optimizer(OptimConfig(name="sgd", lr=25.6, weight_decay=0.0), m)  # lr 0.1 x 256 / 256
    expected = [t.detach().clone() for t in m.target.parameters()]
    initial = [e.clone() for e in expected]
    max_steps = 4
    for step in range(max_steps):
        loss, _ = m(_views(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.on_step_end(step, max_steps)
        tau = 1 - (1 - 0.9) * (math.cos(math.pi * step / max_steps) + 1) / 2
        online = [*m.backbone.parameters(), *m.projector.parameters()]
        expected = [tau * e + (1 - tau) * o.detach() for e, o in zip(expected, online)]
        for e, t in zip(expected, m.target.parameters()):
            torch.testing.assert_close(t, e, atol=1e-6, rtol=1e-6)
    # the target really moved (tau < 1) but lags behind the online net
    target = list(m.target.parameters())
    assert max((t - i).abs().max().item() for t, i in zip(target, initial)) > 1e-4
    assert max((t - o).abs().max().item() for t, o in zip(target, m.backbone.parameters())) > 1e-4


def test_bad_config_and_inputs_fail_clearly():
    with pytest.raises(ValueError, match="predictor_dims"):
        BYOL.Config(projector_dims=(32, 8), predictor_dims=(16, 4))
    with pytest.raises(ValueError, match="2 views"):
        _byol()(_views(0, n=3))
    with pytest.raises(ValueError, match="max_steps"):
        _byol().tau(0, 0)


def test_reset_state_copies_online_into_target():
    m = _byol()
    with torch.no_grad():
        for t in m.target.parameters():
            t.add_(1.0)
    m(_views(0))  # moves the online BN running stats only
    m.reset_state()
    for o, t in zip([*m.backbone.state_dict().values(), *m.projector.state_dict().values()],
                    m.target.state_dict().values()):
        assert torch.equal(o, t)
