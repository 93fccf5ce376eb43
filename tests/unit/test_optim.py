"""Optimizers: param groups, LARC / LARS steps by hand, state dict round trip, LR schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from seerlike.engine.optim import LARC, LARS, LRSchedule, OptimConfig, build_optimizer, param_groups, squared_norms

torch.set_num_threads(1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
                         nn.LayerNorm(5))


def test_param_groups_exclude_bias_and_norm_and_frozen():
    net = _net()
    net[4].bias.requires_grad_(False)
    groups = {g["name"]: g for g in param_groups(OptimConfig(weight_decay=0.1), net)}
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups["decay"]["params"]) == ids([net[0].weight, net[4].weight])
    assert ids(groups["no_decay"]["params"]) == ids([net[0].bias, net[1].weight, net[1].bias,
                                                     net[5].weight, net[5].bias])
    assert groups["decay"]["weight_decay"] == 0.1 and groups["decay"]["adapt"]
    assert groups["no_decay"]["weight_decay"] == 0.0 and not groups["no_decay"]["adapt"]
    everything = {g["name"] for g in param_groups(OptimConfig(exclude_bias_and_norm=False), net)}
    assert everything == {"decay"}


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("larc", LARC), ("lars", LARS),
                                      ("adamw", torch.optim.AdamW)])
def test_build_optimizer_kinds(name, cls):
    opt = build_optimizer(OptimConfig(name=name, weight_decay=0.01), _net())
    assert type(opt) is cls
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]


def _one_param_step(opt_cls, p0, g, **kw):
    p = nn.Parameter(p0.clone())
    opt = opt_cls([{"params": [p], "weight_decay": kw.pop("weight_decay", 0.0), **kw.pop("group", {})}], **kw)
    p.grad = g.clone()
    opt.step()
    return p.detach()


def test_larc_scale_mode_step_by_hand():
    g0 = torch.Generator().manual_seed(0)
    p0, g = torch.randn(6, 3, generator=g0), torch.randn(6, 3, generator=g0) * 0.01
    lr, wd, trust, eps = 0.5, 1e-4, 0.001, 1e-8
    out = _one_param_step(LARC, p0, g, lr=lr, momentum=0.9, weight_decay=wd, trust_coefficient=trust, eps=eps)
    local = trust * p0.norm() / (g.norm() + wd * p0.norm() + eps)
    torch.testing.assert_close(out, p0 - lr * local * (g + wd * p0))


def test_larc_clip_mode_caps_the_local_lr_at_the_global_lr():
    p0, g = torch.ones(4, 4), torch.full((4, 4), 1e-6)  # huge trust ratio -> clipped to plain SGD
    out = _one_param_step(LARC, p0, g, lr=0.1, momentum=0.0, clip=True, weight_decay=1e-3)
    torch.testing.assert_close(out, p0 - 0.1 * (g + 1e-3 * p0))
    p0, g = torch.ones(4, 4), torch.full((4, 4), 10.0)  # small ratio -> scaled by local / lr
    out = _one_param_step(LARC, p0, g, lr=0.1, momentum=0.0, clip=True)
    local = 0.001 * p0.norm() / (g.norm() + 1e-8)
    torch.testing.assert_close(out, p0 - 0.1 * (local / 0.1) * g)


def test_larc_leaves_excluded_and_zero_norm_params_alone():
    p0, g = torch.randn(5), torch.randn(5)
    out = _one_param_step(LARC, p0, g, lr=0.1, momentum=0.0, group={"adapt": False})
    torch.testing.assert_close(out, p0 - 0.1 * g)
    out = _one_param_step(LARC, torch.zeros(5), g, lr=0.1, momentum=0.0, weight_decay=0.5)
    torch.testing.assert_close(out, -0.1 * g)  # as apex: unscaled, undecayed


def test_lars_step_by_hand():
    g0 = torch.Generator().manual_seed(1)
    p0, g = torch.randn(6, 3, generator=g0), torch.randn(6, 3, generator=g0)
    out = _one_param_step(LARS, p0, g, lr=0.3, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.001)
    u = g + 1e-2 * p0
    torch.testing.assert_close(out, p0 - 0.3 * (0.001 * p0.norm() / u.norm()) * u)


@pytest.mark.parametrize("name", ["larc", "lars"])
def test_state_dict_round_trip_continues_identically(name):
    cfg = OptimConfig(name=name, lr=0.2, weight_decay=1e-3)
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(0))

    def steps(net, opt, n):
        for _ in range(n):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()

    a = _net()
    opt_a = build_optimizer(cfg, a)
    steps(a, opt_a, 2)
    b = _net()
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(cfg, b)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # load_state_dict would share the buffers
    steps(a, opt_a, 2)
    steps(b, opt_b, 2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert all(g["weight_decay"] in (1e-3, 0.0) for g in opt_a.param_groups)  # restored after each step


def test_squared_norms_of_plain_tensors():
    ts = [torch.randn(3, 4), torch.randn(7), torch.zeros(2)]
    torch.testing.assert_close(squared_norms(ts), torch.stack([t.square().sum() for t in ts]))


def test_lr_schedule_warmup_cosine_final():
    cfg = OptimConfig(lr=0.3, warmup_lr=0.03, final_lr=0.003, warmup_steps=10)
    s = LRSchedule(cfg, global_batch=512, max_steps=110)  # x2 scaling
    assert s(0) == pytest.approx(0.06)
    assert s(5) == pytest.approx(0.06 + (0.6 - 0.06) / 2)
    assert s(10) == pytest.approx(0.6)
    assert s(60) == pytest.approx((0.6 + 0.006) / 2)
    assert s(110) == pytest.approx(0.006) and s(500) == pytest.approx(0.006)
    assert s(35) == pytest.approx(0.006 + (0.6 - 0.006) * (1 + math.cos(math.pi / 4)) / 2)
    lrs = [s(k) for k in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    opt = build_optimizer(cfg, _net())
    assert s.apply(opt, 10) == pytest.approx(0.6)
    assert all(g["lr"] == pytest.approx(0.6) for g in opt.param_groups)
    no_warmup = LRSchedule(OptimConfig(lr=0.1), global_batch=256, max_steps=4)
    assert no_warmup(0) == pytest.approx(0.1) and no_warmup(4) == pytest.approx(0.0)


def test_bad_optim_config_fails_clearly():
    with pytest.raises(ValueError, match="optim.lr"):
        OptimConfig(lr=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        LRSchedule(OptimConfig(warmup_steps=20), global_batch=256, max_steps=10)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(OptimConfig(), nn.Linear(2, 2).requires_grad_(False))


def test_lr_multipliers_and_fixed_lr_per_parameter_prefix():
    from torch import nn as tnn

    net = tnn.ModuleDict({"backbone": tnn.Linear(4, 4), "predictor": tnn.Sequential(tnn.Linear(4, 4)),
                          "head": tnn.Linear(4, 2)})
    cfg = OptimConfig(name="sgd", lr=0.4, warmup_steps=2, lr_multipliers={"head": 10.0, "predictor": 2.0},
                      fixed_lr=("predictor",))
    opt = build_optimizer(cfg, net)
    sched = LRSchedule(cfg, global_batch=256, max_steps=10)
    by_param = {}
    for step in (0, 1, 5, 9):
        sched.apply(opt, step)
        for g in opt.param_groups:
            for p in g["params"]:
                by_param.setdefault(step, {})[id(p)] = g["lr"]
    base = {s: sched(s) for s in (0, 1, 5, 9)}
    for step, lrs in by_param.items():
        assert lrs[id(net["backbone"].weight)] == pytest.approx(base[step])
        assert lrs[id(net["head"].weight)] == pytest.approx(10.0 * base[step])
        assert lrs[id(net["predictor"][0].weight)] == pytest.approx(2.0 * 0.4)  # fixed: the peak, no warmup/decay
    assert base[0] == 0.0 and base[9] < 0.4
    with pytest.raises(ValueError, match="no trainable parameter of the method is named 'projector'"):
        build_optimizer(OptimConfig(lr_multipliers={"projector": 2.0}), net)
