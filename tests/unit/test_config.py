"""The config machinery: overrides, coercion, errors, round trip, docs."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

import pytest

from seerlike import config
from seerlike.config import ConfigError


class Mode(enum.Enum):
    FAST = "fast"
    EXACT = "exact"


@dataclass(kw_only=True)
class Inner:
    lr: float = 0.1
    """Learning rate per 256 images."""
    steps: int = 10
    """Number of steps."""
    name: Literal["sgd", "larc"] = "sgd"
    """Which optimizer."""

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")


@dataclass(kw_only=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    """The inner section."""
    crops: tuple[int, ...] = (224, 96)
    """Crop sizes."""
    stages: list[list[int]] = field(default_factory=lambda: [[2], [7]])
    """Stages to checkpoint."""
    flag: bool = False
    """A switch."""
    mode: Mode = Mode.FAST
    """An enum."""
    path: str | None = None
    """Optional path."""
    pair: tuple[float, float] = (0.14, 1.0)
    """A pair."""


def test_overrides_coerce_every_supported_type():
    cfg = config.apply_overrides(Outer(), [
        "inner.lr=0.5", "inner.steps=1_000", "inner.name=larc", "crops=160,96,96",
        "stages=[[2],[7,9],[]]", "flag=true", "mode=exact", "path=/tmp/x", "pair=(0.05, 0.14)",
    ])
    assert cfg.inner == Inner(lr=0.5, steps=1000, name="larc")
    assert cfg.crops == (160, 96, 96)
    assert cfg.stages == [[2], [7, 9], []]
    assert cfg.flag is True and cfg.mode is Mode.EXACT and cfg.path == "/tmp/x"
    assert cfg.pair == (0.05, 0.14)
    assert config.apply_overrides(cfg, ["path=none"]).path is None
    assert config.apply_overrides(cfg, ["crops=[128]"]).crops == (128,)


def test_unknown_key_lists_valid_keys_at_that_level():
    with pytest.raises(ConfigError) as e:
        config.apply_overrides(Outer(), ["inner.lrr=0.1"])
    msg = str(e.value)
    assert "'inner.lrr'" in msg and "valid keys: lr, name, steps" in msg
    with pytest.raises(ConfigError, match="valid keys: crops, flag, inner, mode, pair, path, stages"):
        config.apply_overrides(Outer(), ["nope=1"])


@pytest.mark.parametrize("override, needle", [
    ("inner.steps=ten", "inner.steps: expected int, got 'ten'"),
    ("inner.lr=fast", "inner.lr: expected float, got 'fast'"),
    ("flag=maybe", "flag: expected bool"),
    ("inner.name=adam", "inner.name: expected one of ['sgd', 'larc'], got 'adam'"),
    ("mode=slow", "mode: expected one of ['fast', 'exact']"),
    ("pair=1,2,3", "pair: expected 2 values"),
    ("crops=a,b", "crops[0]: expected int, got 'a'"),
    ("inner=3", "inner: is a section"),
    ("flag.x=3", "flag is a value"),
    ("inner.steps=0", "steps must be positive"),
    ("novalue", "not of the form key=value"),
])
def test_bad_values_name_key_type_and_value(override, needle):
    with pytest.raises(ConfigError) as e:
        config.apply_overrides(Outer(), [override])
    assert needle in str(e.value)


def test_overrides_do_not_mutate_the_original():
    base = Outer()
    config.apply_overrides(base, ["inner.lr=3"])
    assert base.inner.lr == 0.1


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_dump_load_round_trip(tmp_path, suffix):
    cfg = config.apply_overrides(Outer(), ["inner.lr=0.25", "mode=exact", "stages=[[1,2]]", "crops=32"])
    path = config.dump(cfg, tmp_path / f"cfg{suffix}")
    assert config.load(path) == cfg
    assert config.load(path, Outer) == cfg


def test_load_rejects_unknown_keys_in_files(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  lr: 0.1\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match="'inner.momentum'.*valid keys: lr, name, steps"):
        config.load(p, Outer)


def test_field_docs_and_reference():
    assert config.field_docs(Inner)["lr"] == "Learning rate per 256 images."
    assert config.undocumented(Outer) == []
    rows = {r[0]: r for r in config.reference(Outer)}
    assert rows["inner.steps"][1:] == ("int", "10", "Number of steps.")
    assert rows["inner"][2] == "(section)"


@dataclass(kw_only=True)
class Sloppy:
    a: int = 1
    b: int = 2
    """Only b is documented."""


def test_undocumented_fields_are_found():
    assert config.undocumented(Sloppy) == ["Sloppy.a"]


@dataclass(kw_only=True)
class Linked:
    warmup: int = 10
    """Warmup steps."""
    steps: int = 100
    """All steps."""

    def __post_init__(self):
        if self.warmup > self.steps:
            raise ValueError(f"warmup={self.warmup} exceeds steps={self.steps}")


def test_cross_field_checks_see_all_overrides_at_once():
    cfg = config.apply_overrides(Linked(), ["steps=4", "warmup=1"])
    assert (cfg.warmup, cfg.steps) == (1, 4)
    with pytest.raises(ConfigError, match="warmup=10 exceeds steps=4"):
        config.apply_overrides(Linked(), ["steps=4"])


def test_single_override_takes_objects_and_shares_the_checks():
    cfg = config.apply_override(Outer(), "inner", Inner(lr=0.3))
    assert cfg.inner.lr == 0.3
    assert config.apply_override(Outer(), "inner.steps", 5).inner.steps == 5
    with pytest.raises(ConfigError, match="'inner.momentum'.*valid keys: lr, name, steps"):
        config.apply_override(Outer(), "inner.momentum", 0.9)
    with pytest.raises(ConfigError, match="steps must be positive"):
        config.apply_override(Outer(), "inner.steps", 0)


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999"])
def test_non_finite_floats_are_rejected_in_overrides_and_files(text, tmp_path):
    with pytest.raises(ConfigError, match=r"^inner\.lr: expected a finite float"):
        config.apply_overrides(Outer(), [f"inner.lr={text}"])
    with pytest.raises(ConfigError, match=r"^pair\[1\]: expected a finite float"):
        config.apply_overrides(Outer(), [f"pair=0.1,{text}"])
    with pytest.raises(ConfigError, match=r"^inner\.lr: expected a finite float"):
        config.apply_override(Outer(), "inner.lr", float(text))
    path = tmp_path / "c.yaml"
    path.write_text(f"inner:\n  lr: {text}\n")
    with pytest.raises(ConfigError, match=r"^inner\.lr: expected a finite float"):
        config.load(path, Outer)


def test_non_finite_floats_are_rejected_in_training_configs(tmp_path):
    from seerlike import recipes

    cfg = recipes.get("tiny_swav")
    with pytest.raises(ConfigError, match=r"^optim\.lr: expected a finite float, got 'nan'"):
        config.apply_overrides(cfg, ["optim.lr=nan"])
    with pytest.raises(ConfigError, match=r"^method\.temperature: expected a finite float, got 'inf'"):
        config.apply_overrides(cfg, ["method.temperature=inf"])
    # YAML's own spellings of the non-finite floats, in a saved config
    path = config.dump(cfg, tmp_path / "config.yaml")
    path.write_text(path.read_text().replace("temperature: 0.1", "temperature: .inf", 1))
    with pytest.raises(ConfigError, match=r"^method\.temperature: expected a finite float, got inf"):
        config.load(path)
    assert config.apply_overrides(cfg, ["optim.lr=1e-3"]).optim.lr == 1e-3
