"""SimSiam: the symmetric negative cosine with stop-gradient, the heads, the fixed predictor LR, state, steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from seerlike.engine.optim import LRSchedule, OptimConfig, build_optimizer
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods import METHODS
from seerlike.methods.simsiam import SimSiam
from seerlike.recipes import simsiam as recipes
from seerlike.testing import micro_batch
from tests.unit.test_swav import TinyNet, _views

torch.set_num_threads(1)


def _simsiam(seed: int = 0, **kw) -> SimSiam:
    torch.manual_seed(seed)
    base = dict(projector_dims=(32, 32, 8), predictor_dims=(4, 8))
    return SimSiam(SimSiam.Config(**{**base, **kw}), TinyNet())


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_registered_and_heads_follow_the_official_layout():
    assert METHODS["simsiam"] is SimSiam
    m = _simsiam()
    linears = [x for x in m.projector if isinstance(x, nn.Linear)]
    norms = [x for x in m.projector if isinstance(x, nn.BatchNorm1d)]
    assert [l.out_features for l in linears] == [32, 32, 8] and all(l.bias is None for l in linears)
    assert len(norms) == 3 and isinstance(m.projector[-1], nn.BatchNorm1d)  # BN after every layer, the last too
    assert [n.affine for n in norms] == [True, True, False]
    pred = [x for x in m.predictor if isinstance(x, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in pred] == [(8, 4), (4, 8)] and pred[-1].bias is not None


def test_loss_is_the_symmetric_negative_cosine_computed_by_hand():
    m = _simsiam()
    v1, v2 = _views(0)
    loss, stats = m([v1, v2])
    with torch.no_grad():  # the same modules, fresh batches of the same views: identical BN statistics
        z1, z2 = m.projector(m.backbone(v1)), m.projector(m.backbone(v2))
        p1, p2 = m.predictor(z1), m.predictor(z2)
    n = v1.shape[0]
    by_hand = -0.5 * (sum(_cos(p1[i].tolist(), z2[i].tolist()) for i in range(n)) / n
                      + sum(_cos(p2[i].tolist(), z1[i].tolist()) for i in range(n)) / n)
    assert loss.item() == pytest.approx(by_hand, abs=1e-5)
    assert -1.0 <= loss.item() <= 1.0
    z = z1 / z1.norm(dim=1, keepdim=True)
    assert stats["z_std"].item() == pytest.approx(z.std(dim=0).mean().item() * math.sqrt(8), rel=1e-5)


def test_stop_gradient_no_gradient_flows_through_the_targets():
    """The gradient equals that of the loss with z held constant, and differs from the one without stop-gradient."""
    m = _simsiam()
    views = _views(1)
    loss, _ = m(views)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}

    def by_hand(detach: bool) -> dict[str, torch.Tensor]:
        m.zero_grad()
        z1, z2 = (m.projector(m.backbone(v)) for v in views)
        p1, p2 = m.predictor(z1), m.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if detach else (z1, z2)
        cos = nn.functional.cosine_similarity
        (-(cos(p1, t2).mean() + cos(p2, t1).mean()) / 2).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    stopped, through = by_hand(True), by_hand(False)
    for name, g in grads.items():
        torch.testing.assert_close(g, stopped[name], atol=1e-6, rtol=1e-5, msg=name)
    assert max((grads[n] - through[n]).abs().max().item() for n in grads) > 1e-4


def test_recipes_keep_the_predictor_at_the_peak_lr():
    for recipe in (recipes.simsiam_resnet50, recipes.tiny_simsiam):
        cfg = recipe()
        assert cfg.optim.fixed_lr == ("predictor",) and cfg.method.name == "simsiam"
    cfg = recipes.simsiam_resnet50()
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps) == ("sgd", 0.05, 1e-4, 0)
    assert not cfg.optim.exclude_bias_and_norm and cfg.parallel.sync_bn and cfg.data.batch_size * 8 == 512
    m = _simsiam()
    opt = build_optimizer(cfg.optim, m)
    sched = LRSchedule(cfg.optim, 512, 100)
    sched.apply(opt, 90)
    pred = {id(p) for p in m.predictor.parameters()}
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= pred or not ids & pred  # the predictor's params have groups of their own
        expected = 0.1 if ids <= pred else sched(90)
        assert group["lr"] == pytest.approx(expected) and group["weight_decay"] == 1e-4
    assert sched(90) < 0.01  # the others have decayed
    assert sum(len(g["params"]) for g in opt.param_groups if g["fixed"]) == len(pred)


def test_state_round_trips_into_a_fresh_instance():
    m = _simsiam(seed=0)
    m(_views(0))  # moves the BN running statistics
    fresh = _simsiam(seed=1)
    fresh.load_state_dict(m.state_dict())
    assert set(fresh.state_dict()) == set(m.state_dict())
    assert any(k.startswith("projector.") and k.endswith("running_var") for k in m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    torch.testing.assert_close(fresh(_views(2))[0], m(_views(2))[0])


def test_train_steps_lower_the_loss_and_stay_finite():
    m = _simsiam()
    optim = OptimConfig(name="sgd", lr=12.8, weight_decay=1e-4, fixed_lr=("predictor",))  # lr 0.2 at batch 4
    opt = build_optimizer(optim, m)
    sched = LRSchedule(optim, 4, 6)
    views = _views(3)
    losses = []
    for step in range(6):
        sched.apply(opt, step)
        result = train_step(m, m, opt, None, [micro_batch(views)], step=step, max_steps=6,
                            precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu"))
        losses.append(result.loss)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.01


def test_bad_config_and_inputs_fail_clearly():
    with pytest.raises(ValueError, match="predictor_dims ends with"):
        SimSiam.Config(projector_dims=(16, 8), predictor_dims=(4, 6))
    with pytest.raises(ValueError, match="positive"):
        SimSiam.Config(projector_dims=(0, 8), predictor_dims=(4, 8))
    with pytest.raises(ValueError, match="2 views"):
        _simsiam()(_views(0, n=3))
    with pytest.raises(ValueError, match="exactly 2 views"):
        SimSiam.check_views(SimSiam.Config(), [224, 224, 96])
    SimSiam.check_views(SimSiam.Config(), [224, 224])
