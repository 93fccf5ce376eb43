"""Every registered method meets the contract and can run the whole quickstart chain, with no edit elsewhere."""

from __future__ import annotations

import pytest
from torch import nn

from seerlike import config, recipes
from seerlike.engine.config import TrainConfig
from seerlike.methods import METHODS, build, method_class, pretraining_methods
from seerlike.methods.base import Method, MethodConfig


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
