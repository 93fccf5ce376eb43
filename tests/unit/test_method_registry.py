"""Every registered method meets the contract and can run the whole quickstart chain, with no edit elsewhere;
the pretext methods' state round trip and train steps, one test for all."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from seerlike import config, recipes
from seerlike.engine.config import TrainConfig
from seerlike.engine.optim import LRSchedule, OptimConfig, build_optimizer
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods import METHODS, build, method_class, pretraining_methods
from seerlike.methods.base import Method, MethodConfig
from seerlike.testing import micro_batch
from tests.unit.test_colorization import _colorization, _images, normalise
from tests.unit.test_jigsaw import _jigsaw
from tests.unit.test_pretext_ops import _coords
from tests.unit.test_relative_position import _relpos
from tests.unit.test_rotnet import _rotnet
from tests.unit.test_swav import _views


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_meets_the_contract_and_its_config_is_its_section(name):
    cls = METHODS[name]
    assert isinstance(cls.Config(), MethodConfig) and cls.Config().name == name
    assert cls.stage in ("pretrain", "followup") and isinstance(cls.needs_labels, bool)
    for hook in ("forward", "on_after_backward", "on_step_end", "reset_state", "check_views"):
        assert callable(getattr(cls, hook)), (name, hook)
    assert issubclass(cls, nn.Module)
    # `method.name=X` swaps in X's defaults, and the section saved holds X's keys only (with one view
    # for the methods that take one: FixMatch, the Noisy Student student)
    try:
        cfg = config.apply_overrides(recipes.get("tiny_swav"), [f"method.name={name}"])
    except config.ConfigError as e:
        assert "takes exactly 1 views" in str(e)
        cfg = config.apply_overrides(recipes.get("tiny_swav"), [f"method.name={name}", "data.augment.views=[{size: 24}]"])
    assert type(cfg.method) is cls.Config
    assert set(config.to_dict(cfg)["method"]) == set(config.to_dict(cls.Config()))


@pytest.mark.parametrize("name", pretraining_methods())
def test_every_pretraining_method_has_its_recipes_and_a_quickstart(name, tmp_path):
    tiny = recipes.get(f"tiny_{name}")
    paper = recipes.get(f"{name}_resnet50")
    for cfg in (tiny, paper):
        assert isinstance(cfg, TrainConfig) and cfg.method.name == name
    assert paper.model.name == "resnet50"
    from seerlike.quickstart import budget_for, build_pipeline

    p = build_pipeline(tmp_path, images="imgs", eval_train="t.csv", eval_val="v.csv", method=name,
                       budget=budget_for(15))
    pretrain = next(s for s in p.stages if s.name == "pretrain")
    assert f"tiny_{name}" in pretrain.args


def test_an_unknown_method_fails_listing_the_valid_ones_everywhere():
    with pytest.raises(config.ConfigError, match=r"unknown method 'sw4v'; choose one of \["):
        method_class("sw4v")
    with pytest.raises(config.ConfigError, match="method.name: unknown method 'sw4v'"):
        config.apply_overrides(recipes.get("tiny_swav"), ["method.name=sw4v"])
    with pytest.raises(config.ConfigError, match="unknown method 'sw4v'"):
        build(MethodConfig(name="sw4v"), nn.Identity())
    with pytest.raises(config.ConfigError, match="unknown method 'sw4v'"):
        TrainConfig(method=MethodConfig(name="sw4v"))


def test_configs_saved_with_one_section_per_method_still_load(tmp_path):
    old = config.to_dict(recipes.get("tiny_byol"))
    old["method"] = {"name": "byol", "swav": {"temperature": 0.1}, "byol": {**old["method"], "tau_base": 0.97}}
    del old["method"]["byol"]["name"]
    cfg = config.from_dict(TrainConfig, old)
    assert cfg.method.name == "byol" and cfg.method.tau_base == 0.97


def test_a_view_count_the_method_cannot_use_fails_at_parse_time():
    with pytest.raises(config.ConfigError, match="byol takes exactly 2 views per image but the data config makes 3"):
        config.apply_overrides(recipes.get("tiny_byol"), ["data.augment.views=[{count: 3, size: 24}]"])


def test_runtime_protocol_check():
    from seerlike.methods.byol import BYOL
    from tests.unit.test_swav import TinyNet

    assert isinstance(BYOL(BYOL.Config(projector_dims=(8, 4), predictor_dims=(8, 4)), TinyNet()), Method)


# ---------------------------------------------------------------- pretext methods: state and steps


@dataclass(frozen=True)
class Pretext:
    """A pretext method on a small trunk, and inputs it takes (the method's own numerics are tested in its file)."""

    make: Callable[..., nn.Module]
    """``make(seed=s, **config)``: the method, its parameters drawn after ``torch.manual_seed(s)``."""
    before: Callable[[], list[Tensor]]
    """A batch run before the state is saved (so running statistics and counts have moved)."""
    probe: Callable[[], list[Tensor]]
    """A batch both instances must score alike once the state is loaded."""
    learnable: Callable[[], list[Tensor]]
    """A batch whose task a few steps can learn (coordinate images, a visible "up", colours)."""
    learner: dict
    """Config overrides of the method that learns ``learnable``."""
    lr: float
    """SGD learning rate per 256 images."""


RAMP = torch.linspace(-2, 2, 8).view(1, 1, 8, 1)  # "up" is visible: the rotation is learnable
PRETEXT = {
    "jigsaw": Pretext(_jigsaw, lambda: _views(0, n=1, sizes=[24]), lambda: _views(2, n=1, sizes=[24]),
                      lambda: [_coords(8, 24) / 24], dict(tile_norm=False), lr=12.8),
    "relative_position": Pretext(_relpos, lambda: _views(0, n=1, sizes=[30]), lambda: _views(2, n=1, sizes=[30]),
                                 lambda: [_coords(4, 30) / 30], dict(all_pairs=True, colour_drop=False), lr=12.8),
    "colorization": Pretext(_colorization, lambda: [normalise(_images(3))], lambda: [normalise(_images(4))],
                            lambda: [normalise(_images(5, n=4))], dict(head_dims=(8,)), lr=25.6),
    "rotnet": Pretext(_rotnet, lambda: _views(0, n=1), lambda: _views(2, n=1),
                      lambda: [_views(3, n=1)[0] * 0.3 + RAMP], {}, lr=12.8),
}


@pytest.mark.parametrize("name", sorted(PRETEXT))
def test_pretext_state_round_trips_into_a_fresh_instance(name):
    case = PRETEXT[name]
    m = case.make(seed=0)
    assert isinstance(m, METHODS[name])
    m(case.before())
    fresh = case.make(seed=1)
    fresh.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    torch.manual_seed(3)  # the same random puzzles / pairs / rotations for both
    a = m(case.probe())[0]
    torch.manual_seed(3)
    torch.testing.assert_close(fresh(case.probe())[0], a)


@pytest.mark.parametrize("name", sorted(PRETEXT))
def test_pretext_train_steps_lower_the_loss_and_stay_finite(name):
    case = PRETEXT[name]
    m = case.make(**case.learner)
    views = case.learnable()
    optim = OptimConfig(name="sgd", lr=case.lr, weight_decay=1e-4)
    opt = build_optimizer(optim, m)
    sched = LRSchedule(optim, views[0].shape[0], 8)
    losses = []
    for step in range(8):
        sched.apply(opt, step)
        result = train_step(m, m, opt, None, [micro_batch(views)], step=step, max_steps=8,
                            precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu"))
        losses.append(result.loss)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05
