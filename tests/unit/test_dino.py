"""DINO: loss against an explicit loop, centre / EMA / schedules by hand, gradient hooks, state round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seerlike import recipes
from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods import METHODS
from seerlike.methods.dino import DINO
from seerlike.testing import micro_batch
from tests.unit.test_swav import TinyNet

torch.set_num_threads(1)

SIZES = [6, 6, 4, 4]  # two global views, two local ones


class PoolNet(nn.Module):
    """A BN-free trunk: a view's features do not depend on the other views it is batched with."""

    out_dim = 5

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x):
        return self.conv(x).relu().mean((2, 3))


def _dino(trunk=PoolNet, **kw) -> DINO:
    torch.manual_seed(0)
    base = dict(out_dim=7, hidden_dim=12, bottleneck_dim=4, freeze_last_layer_steps=0, clip_grad=0.0)
    return DINO(DINO.Config(**{**base, **kw}), trunk())


def _views(step: int, sizes=SIZES, bs: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(bs, 3, s, s, generator=g) for s in sizes]


@torch.no_grad()
def _perturb_teacher(m: DINO) -> None:
    g = torch.Generator().manual_seed(7)
    for p in m.teacher.parameters():
        p.add_(0.3 * torch.randn(p.shape, generator=g))


def _explicit_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
                   t_temp: float, s_temp: float) -> float:
    """Average over pairs (teacher global i, student view v != i) of the batch mean of -sum_k q log p."""
    def softmax(row: list[float], temp: float) -> list[float]:
        z = [x / temp for x in row]
        top = max(z)
        e = [math.exp(x - top) for x in z]
        return [x / sum(e) for x in e]

    terms = []
    for i, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == i:
                continue
            per_sample = []
            for b in range(t.shape[0]):
                q = softmax([float(t[b, k] - center[0, k]) for k in range(t.shape[1])], t_temp)
                p = softmax([float(x) for x in s[b]], s_temp)
                per_sample.append(-sum(qk * math.log(pk) for qk, pk in zip(q, p)))
            terms.append(sum(per_sample) / len(per_sample))
    return sum(terms) / len(terms)


def test_loss_equals_the_explicit_pairwise_cross_entropy():
    m = _dino(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_steps=5)
    _perturb_teacher(m)
    with torch.no_grad():
        m.center.copy_(torch.randn(1, 7, generator=torch.Generator().manual_seed(3)))
        m.step.fill_(2)
    views = _views(0)
    center0 = m.center.clone()
    loss, stats = m(views)
    with torch.no_grad():
        student = [m.head(m.backbone(v)) for v in views]  # one view at a time
        teacher = [m.teacher.head(m.teacher.backbone(v)) for v in views[:2]]
    t_temp = 0.04 + (0.07 - 0.04) * 2 / 4
    expected = _explicit_loss(student, teacher, center0, t_temp, 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert stats["teacher_temp"].item() == pytest.approx(t_temp, rel=1e-6)
    assert 0 < stats["teacher_entropy"].item() < math.log(7)


def test_two_views_give_the_symmetric_loss():
    m = _dino()
    views = _views(1, sizes=[6, 6])
    loss, _ = m(views)
    with torch.no_grad():
        s = [m.head(m.backbone(v)) for v in views]
        t = [m.teacher.head(m.teacher.backbone(v)) for v in views]
    q = [F.softmax(x / 0.04, dim=1) for x in t]
    p = [F.log_softmax(x / 0.1, dim=1) for x in s]
    expected = (-(q[0] * p[1]).sum(1).mean() - (q[1] * p[0]).sum(1).mean()) / 2
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)


def test_center_update_by_hand():
    m = _dino(center_momentum=0.9)
    _perturb_teacher(m)
    with torch.no_grad():
        m.center.fill_(0.5)
    views = _views(2)
    m(views)
    with torch.no_grad():
        t = torch.cat([m.teacher.head(m.teacher.backbone(v)) for v in views[:2]])
    expected = 0.9 * 0.5 + 0.1 * t.mean(0, keepdim=True)
    torch.testing.assert_close(m.center, expected, atol=1e-6, rtol=1e-6)
    assert m.center.shape == (1, 7)


def test_teacher_temperature_schedule_is_main_dino_linspace_per_step():
    for w in (0, 1, 5):
        m = _dino(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_steps=w)
        sched = np.concatenate([np.linspace(0.04, 0.07, w), np.full(10 - w, 0.07)])
        for step in range(10):
            assert m.teacher_temp(step) == pytest.approx(sched[step], abs=1e-12), (w, step)
            assert m.teacher_temp(torch.tensor(step)).item() == pytest.approx(sched[step], abs=1e-7)
    default = _dino()
    assert default.teacher_temp(0) == default.teacher_temp(10**6) == 0.04


def test_momentum_schedule_is_cosine_to_one():
    m = _dino(momentum_teacher=0.996)
    assert m.momentum(0, 100) == pytest.approx(0.996, abs=1e-12)
    assert m.momentum(50, 100) == pytest.approx(0.998, abs=1e-12)
    assert m.momentum(100, 100) == pytest.approx(1.0, abs=1e-12)
    # utils.cosine_scheduler(0.996, 1, epochs, niter) at iteration 30 of 100
    assert m.momentum(30, 100) == pytest.approx(1 + 0.5 * (0.996 - 1) * (1 + math.cos(math.pi * 30 / 100)), abs=1e-12)
    with pytest.raises(ValueError, match="max_steps"):
        m.momentum(0, 0)


def test_teacher_is_a_frozen_copy_updated_by_the_ema_only():
    m = _dino(momentum_teacher=0.9, trunk=TinyNet)
    student = [*m.backbone.parameters(), *m.head.parameters()]
    teacher = list(m.teacher.parameters())
    assert len(student) == len(teacher) > 0
    for s, t in zip(student, teacher):
        assert torch.equal(s, t) and s.data_ptr() != t.data_ptr() and not t.requires_grad
    opt = build_optimizer(OptimConfig(name="sgd", lr=25.6, weight_decay=0.0), m)
    assert not {id(p) for g in opt.param_groups for p in g["params"]} & {id(p) for p in teacher}
    expected = [t.detach().clone() for t in teacher]
    initial = [e.clone() for e in expected]
    for step in range(3):
        loss, _ = m(_views(step))
        opt.zero_grad()
        loss.backward()
        assert all(t.grad is None for t in teacher)
        opt.step()
        m.on_step_end(step, 3)
        mom = 1 - 0.1 * (math.cos(math.pi * step / 3) + 1) / 2
        expected = [mom * e + (1 - mom) * s.detach() for e, s in zip(expected, student)]
        for e, t in zip(expected, teacher):
            torch.testing.assert_close(t, e, atol=1e-6, rtol=1e-6)
        assert int(m.step) == step + 1
    assert max((t - i).abs().max().item() for t, i in zip(teacher, initial)) > 1e-4


def test_last_layer_is_weight_normalised_with_a_frozen_norm():
    m = _dino()
    last = m.head.last_layer
    assert last.weight_g is None and [n for n, _ in last.named_parameters()] == ["weight_v"]
    x = torch.randn(3, 4)
    w = last.weight_v / last.weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(last(x), x @ w.t())
    with torch.no_grad():
        last.weight_v.mul_(5.0)  # the norm of v does not matter
    torch.testing.assert_close(last(x), x @ w.t(), atol=1e-6, rtol=1e-5)
    learned = _dino(norm_last_layer=False)
    assert learned.head.last_layer.weight_g.requires_grad and torch.equal(learned.head.last_layer.weight_g,
                                                                           torch.ones(7, 1))
    assert not learned.teacher.head.last_layer.weight_g.requires_grad


def test_head_layers_follow_the_config():
    kinds = [type(x).__name__ for x in _dino(num_layers=3, use_bn_in_head=True).head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    assert [type(x).__name__ for x in _dino(num_layers=1).head.mlp] == ["Linear"]
    mlp = _dino(num_layers=2).head.mlp
    assert [type(x).__name__ for x in mlp] == ["Linear", "GELU", "Linear"]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[2].out_features) == (5, 12, 4)
    assert mlp[0].weight.abs().max() <= 2.0 and torch.equal(mlp[0].bias, torch.zeros(12))  # truncated normal, 0 bias


def test_freeze_last_layer_drops_its_gradient_for_the_first_steps():
    m = _dino(freeze_last_layer_steps=2)
    opt = build_optimizer(OptimConfig(name="sgd", lr=25.6, weight_decay=1e-2), m)
    v0 = m.head.last_layer.weight_v.detach().clone()
    fp32 = PrecisionConfig(dtype="fp32")
    for step in range(2):
        m.zero_grad()
        loss, _ = m(_views(step))
        loss.backward()
        m.on_after_backward(step)
        assert m.head.last_layer.weight_v.grad is None
        assert all(p.grad is not None for p in m.head.mlp.parameters())
        m.zero_grad()
        train_step(m, m, opt, None, [micro_batch(_views(step))], step=step, max_steps=4, precision=fp32,
                   device=torch.device("cpu"))
    assert torch.equal(m.head.last_layer.weight_v, v0)  # no gradient, no decay, no momentum
    train_step(m, m, opt, None, [micro_batch(_views(2))], step=2, max_steps=4, precision=fp32,
               device=torch.device("cpu"))
    assert (m.head.last_layer.weight_v - v0).abs().max() > 1e-6


def test_clip_grad_caps_each_parameter_norm():
    def grads(clip: float) -> dict[str, torch.Tensor]:
        m = _dino(clip_grad=clip)
        loss, _ = m(_views(3))
        loss.backward()
        m.on_after_backward(10)
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    raw = grads(0.0)
    clip = float(torch.stack([g.norm() for g in raw.values()]).median())  # the cap bites on about half
    capped = grads(clip)
    assert raw.keys() == capped.keys()
    clipped = 0
    for name, g in raw.items():
        coef = min(1.0, clip / (g.norm().item() + 1e-6))  # utils.clip_gradients
        clipped += coef < 1
        torch.testing.assert_close(capped[name], g * coef, atol=1e-8, rtol=1e-6, msg=name)
    assert 2 <= clipped < len(raw)


def test_state_survives_a_state_dict_round_trip():
    m = _dino(trunk=TinyNet, warmup_teacher_temp_steps=4, teacher_temp=0.06, freeze_last_layer_steps=1)
    opt = build_optimizer(OptimConfig(name="sgd", lr=25.6, weight_decay=0.0), m)
    for step in range(2):
        train_step(m, m, opt, None, [micro_batch(_views(step))], step=step, max_steps=5,
                   precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu"))
    state = m.state_dict()
    assert {"center", "step", "teacher.head.last_layer.weight_v", "head.last_layer.weight_v"} <= set(state)
    assert any(k.startswith("teacher.backbone.bn.running") for k in state)
    assert int(state["step"]) == 2 and state["center"].abs().sum() > 0
    fresh = _dino(trunk=TinyNet, warmup_teacher_temp_steps=4, teacher_temp=0.06, freeze_last_layer_steps=1)
    fresh.load_state_dict(state)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k
    a, sa = m(_views(5))
    b, sb = fresh(_views(5))
    assert torch.equal(a, b) and torch.equal(sa["teacher_temp"], sb["teacher_temp"])
    assert torch.equal(m.center, fresh.center)


def test_reset_state_copies_the_student_and_clears_the_centre():
    m = _dino(trunk=TinyNet)
    _perturb_teacher(m)
    m(_views(0))
    m.step.fill_(3)
    m.reset_state()
    for s, t in zip([*m.backbone.state_dict().values(), *m.head.state_dict().values()],
                    m.teacher.state_dict().values()):
        assert torch.equal(s, t)
    assert not m.center.any() and int(m.step) == 0


def test_views_are_checked():
    cfg = DINO.Config()
    for ok in ([24, 24], [24, 24, 12, 12, 12], [224, 224, 96, 96, 96, 96, 96, 96, 96, 96]):
        DINO.check_views(cfg, ok)
    for bad in ([24], [24, 12], [12, 24, 24]):
        with pytest.raises(ValueError, match="two global views"):
            DINO.check_views(cfg, bad)
    with pytest.raises(ValueError, match="two global views"):
        _dino()(_views(0, sizes=[6, 4]))
    with pytest.raises(ValueError, match="must be > 0"):
        DINO.Config(teacher_temp=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DINO.Config(momentum_teacher=1.5)


def test_train_steps_give_a_finite_loss_that_moves():
    m = _dino(trunk=TinyNet, freeze_last_layer_steps=1, clip_grad=3.0)
    opt = build_optimizer(OptimConfig(name="sgd", lr=25.6, weight_decay=1e-4), m)
    losses = []
    for step in range(4):
        r = train_step(m, m, opt, None, [micro_batch(_views(step))], step=step, max_steps=4,
                       precision=PrecisionConfig(dtype="bf16"), device=torch.device("cpu"))
        losses.append(r.loss)
        assert set(r.stats) == {"teacher_temp", "teacher_entropy"}
    assert all(math.isfinite(x) for x in losses) and len(set(losses)) == 4


def test_registered_with_its_recipes():
    assert METHODS["dino"] is DINO
    big = recipes.get("dino_resnet50")
    assert big.method.name == "dino" and big.model.name == "resnet50"
    assert (big.optim.name, big.optim.lr, big.optim.weight_decay, big.optim.momentum) == ("sgd", 0.03, 1e-4, 0.9)
    assert big.data.batch_size * 8 == 512 and big.optim.final_lr * 512 / 256 == pytest.approx(1e-6)
    assert (big.method.out_dim, big.method.bottleneck_dim, big.method.hidden_dim) == (65536, 256, 2048)
    views = big.data.augment.expanded()
    assert [v.size for v in views] == [224] * 2 + [96] * 8
    assert [(v.blur_p, v.solarize_p) for v in views[:3]] == [(1.0, 0.0), (0.1, 0.2), (0.5, 0.0)]
    assert views[0].scale == (0.14, 1.0) and views[2].scale == (0.05, 0.14)
    tiny = recipes.get("tiny_dino")
    assert tiny.model.name == "resnet10_cifar" and [v.size for v in tiny.data.augment.expanded()] == [24, 24]
    assert tiny.method.use_bn_in_head and not big.method.use_bn_in_head
