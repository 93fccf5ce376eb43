"""precision.dtype=auto: bf16 only where the device has it natively, resolved by the engine and recorded; the
warning for bf16 on a CPU that emulates it (docs/engine.md, "bf16 on CPUs")."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml

from seerlike import config, recipes
from seerlike.engine import precision
from seerlike.engine.loop import train
from seerlike.engine.precision import PrecisionConfig, autocast, emulated_bf16_warning
from tests.unit.test_budget import _Data

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_where_native_and_fp32_elsewhere(monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    auto = PrecisionConfig(dtype="auto")
    assert auto.resolved(CPU).dtype == ("bf16" if native else "fp32")
    for dtype in ("fp32", "bf16", "fp16"):  # a concrete dtype is never changed
        assert PrecisionConfig(dtype=dtype).resolved(CPU).dtype == dtype
    with pytest.raises(ValueError, match="resolved for a device"):
        auto.torch_dtype
    with autocast(auto, CPU):
        assert torch.is_autocast_enabled("cpu") is native
        assert (torch.get_autocast_dtype("cpu") == torch.bfloat16) or not native
    warning = emulated_bf16_warning(PrecisionConfig(dtype="bf16"), CPU)
    assert (warning is None) is native
    if not native:
        assert "precision.dtype=fp32 or auto" in warning
    assert emulated_bf16_warning(PrecisionConfig(dtype="fp32"), CPU) is None


def test_native_bf16_on_cpus_is_onednns_answer(monkeypatch):
    from types import SimpleNamespace

    for answer in (True, False):
        monkeypatch.setattr(torch.ops, "mkldnn", SimpleNamespace(_is_mkldnn_bf16_supported=lambda a=answer: a))
        assert precision.native_bf16("cpu") is answer and precision.native_bf16(CPU) is answer
    monkeypatch.setattr(torch.ops, "mkldnn", SimpleNamespace())  # a torch without oneDNN: no bf16 kernels
    assert precision.native_bf16("cpu") is False


def test_the_cpu_recipes_ask_for_auto_and_the_gpu_ones_for_their_papers_dtype():
    for name in recipes.RECIPES:
        cpu = name.startswith("tiny_") or name.endswith("_tiny")
        assert (recipes.get(name).precision.dtype == "auto") is cpu, name


@pytest.mark.parametrize("native", [True, False])
def test_the_engine_records_the_resolved_dtype_and_warns_only_for_emulated_bf16(tmp_path, monkeypatch, caplog,
                                                                                native, one_thread):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    base = ["loop.max_steps=2", "loop.progress=false", "loop.tensorboard=false", "optim.warmup_steps=1",
            "parallel.strategy=none", "checkpoint.every_steps=2"]
    cfg = config.apply_overrides(recipes.get("tiny_swav"), base)
    with caplog.at_level(logging.INFO, logger="seerlike.engine.loop"):
        assert train(cfg, tmp_path / "auto", data=_Data()) == 0
    recorded = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["precision"]["dtype"]
    assert recorded == ("bf16" if native else "fp32")
    assert f"precision.dtype=auto -> {recorded} on cpu" in caplog.text
    assert "emulates it" not in caplog.text
    caplog.clear()
    explicit = config.apply_overrides(recipes.get("tiny_swav"), [*base, "precision.dtype=bf16", "loop.max_steps=1",
                                                                 "optim.warmup_steps=0"])
    with caplog.at_level(logging.WARNING, logger="seerlike.engine.loop"):
        assert train(explicit, tmp_path / "bf16", data=_Data()) == 0
    assert ("autocast emulates it" in caplog.text) is (not native)  # said, and the dtype given is kept
    assert yaml.safe_load((tmp_path / "bf16" / "config.yaml").read_text())["precision"]["dtype"] == "bf16"
