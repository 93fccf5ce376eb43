"""VICReg: the three terms by hand, the collapse values, heads, state, steps, recipes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from seerlike.engine.optim import LRSchedule, OptimConfig, build_optimizer
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods import METHODS
from seerlike.methods.vicreg import VICReg, vicreg_terms
from seerlike.recipes import vicreg as recipes
from seerlike.testing import micro_batch
from tests.unit.test_barlow_twins import _embeddings
from tests.unit.test_swav import TinyNet, _views

torch.set_num_threads(1)


def _vicreg(seed: int = 0, **kw) -> VICReg:
    torch.manual_seed(seed)
    base = dict(projector_dims=(32, 6))
    return VICReg(VICReg.Config(**{**base, **kw}), TinyNet())


def _terms_by_hand(x: torch.Tensor, y: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> tuple[float, ...]:
    a, b = x.tolist(), y.tolist()
    n, d = len(a), len(a[0])
    inv = sum((a[k][j] - b[k][j]) ** 2 for k in range(n) for j in range(d)) / (n * d)
    var = cov = 0.0
    for rows in (a, b):
        means = [sum(r[j] for r in rows) / n for j in range(d)]
        c = [[sum((r[i] - means[i]) * (r[j] - means[j]) for r in rows) / (n - 1) for j in range(d)] for i in range(d)]
        var += sum(max(0.0, gamma - math.sqrt(c[j][j] + eps)) for j in range(d)) / d / 2
        cov += sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
    return inv, var, cov


def test_terms_equal_the_formula_by_hand():
    x, y = _embeddings(1)
    x = x * 0.4  # some features below gamma = 1 and some above: the hinge is active for part of them
    got = vicreg_terms(x, y, gamma=1.0, eps=1e-4)
    for g, e in zip(got, _terms_by_hand(x, y)):
        assert g.item() == pytest.approx(e, rel=1e-5)
    assert 0 < got[1].item() < 1.0


def test_method_loss_is_the_weighted_sum_of_the_terms():
    m = _vicreg(invariance_weight=2.0, variance_weight=3.0, covariance_weight=0.5, gamma=2.0)
    v1, v2 = _views(0)
    loss, stats = m([v1, v2])
    with torch.no_grad():
        inv, var, cov = _terms_by_hand(m.projector(m.backbone(v1)), m.projector(m.backbone(v2)), gamma=2.0)
    assert loss.item() == pytest.approx(2.0 * inv + 3.0 * var + 0.5 * cov, rel=1e-5)
    for key, e in (("invariance", inv), ("variance", var), ("covariance", cov)):
        assert stats[key].item() == pytest.approx(e, rel=1e-5), key


def test_a_collapsed_embedding_pays_the_full_variance_hinge():
    const = torch.full((8, 5), 3.0)
    inv, var, cov = vicreg_terms(const, const.clone())
    assert inv.item() == 0.0 and cov.item() == 0.0
    assert var.item() == pytest.approx(1.0 - math.sqrt(1e-4))  # averaged over the two views: (h + h) / 2


def test_projector_layout_and_registration():
    assert METHODS["vicreg"] is VICReg
    m = _vicreg(projector_dims=(16, 16, 6))
    linears = [x for x in m.projector if isinstance(x, nn.Linear)]
    assert [l.out_features for l in linears] == [16, 16, 6] and linears[-1].bias is None
    assert sum(isinstance(x, nn.BatchNorm1d) for x in m.projector) == 2


def test_state_round_trips_into_a_fresh_instance():
    m = _vicreg(seed=0)
    m(_views(0))
    fresh = _vicreg(seed=1)
    fresh.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    torch.testing.assert_close(fresh(_views(2))[0], m(_views(2))[0])


def test_train_steps_lower_the_loss_and_stay_finite():
    m = _vicreg()
    optim = OptimConfig(name="lars", lr=64.0, weight_decay=1e-6, warmup_steps=0)
    opt = build_optimizer(optim, m)
    sched = LRSchedule(optim, 4, 6)
    views = _views(3, bs=8)
    losses = []
    for step in range(6):
        sched.apply(opt, step)
        result = train_step(m, m, opt, None, [micro_batch(views)], step=step, max_steps=6,
                            precision=PrecisionConfig(dtype="bf16"), device=torch.device("cpu"))
        losses.append(result.loss)
        assert result.stats["covariance"].dtype == torch.float32
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] * 0.9


def test_recipes():
    cfg = recipes.vicreg_resnet50()
    m = cfg.method
    assert (m.projector_dims, m.invariance_weight, m.variance_weight, m.covariance_weight) == ((8192,) * 3, 25, 25, 1)
    assert (m.gamma, m.eps) == (1.0, 1e-4) and cfg.data.batch_size * 32 == 2048
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("lars", 0.2, 1e-6)
    tiny = recipes.tiny_vicreg().method
    assert max(tiny.projector_dims) <= 1024
    assert (tiny.invariance_weight, tiny.variance_weight, tiny.covariance_weight) == (25, 25, 1)


def test_bad_config_and_inputs_fail_clearly():
    with pytest.raises(ValueError, match="positive widths"):
        VICReg.Config(projector_dims=())
    with pytest.raises(ValueError, match="at least 2 features"):
        VICReg.Config(projector_dims=(8, 1))
    with pytest.raises(ValueError, match="loss weights"):
        VICReg.Config(variance_weight=-1.0)
    with pytest.raises(ValueError, match="2 views"):
        _vicreg()(_views(0, n=3))
    with pytest.raises(ValueError, match="same batch size"):
        _vicreg()([_views(0)[0], _views(0, bs=6)[0]])
    with pytest.raises(ValueError, match="exactly 2 views"):
        VICReg.check_views(VICReg.Config(), [224, 224, 224])
