"""The contract's ``needs_indices`` (methods/base.py): built with ``num_samples``, given each batch's
``indices``; non-persistent buffers are per-rank state that the engine's checkpoints carry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from torch import nn

from seerlike import methods
from seerlike.config import ConfigError
from seerlike.engine.checkpoint import CheckpointConfig, Checkpointer
from seerlike.engine.config import ModelConfig, TrainConfig
from seerlike.engine.loop import build_method
from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods.base import MethodBase, MethodConfig
from seerlike.testing import micro_batch


class Indexed(MethodBase):
    """Counts how often each sample was seen: a per-rank count and a total every rank would agree on."""

    needs_indices = True

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["indexed"] = "indexed"
        """A test method."""

    def __init__(self, cfg: Config, backbone: nn.Module, *, num_samples: int) -> None:
        super().__init__()
        self.cfg, self.backbone, self.num_samples = cfg, backbone, num_samples
        self.register_buffer("seen_here", torch.zeros(num_samples), persistent=False)
        self.register_buffer("seen", torch.zeros(num_samples))
        self.calls: list[dict] = []

    def forward(self, views, labels=None, indices=None):
        self.calls.append({"labels": labels, "indices": indices})
        self.seen_here[indices] += 1
        self.seen[indices] += 1
        return self.backbone(views[0].flatten(1)).square().mean(), {}


class Plain(Indexed):
    needs_indices = False

    def __init__(self, cfg, backbone) -> None:
        super().__init__(cfg, backbone, num_samples=4)


def _step(method, batch, step=0):
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.1, weight_decay=0.0), method)
    return train_step(method, method, opt, None, [batch], step=step, max_steps=10,
                      precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu"))


def test_train_step_passes_indices_to_a_method_that_needs_them_only():
    views = [torch.randn(3, 2, 2, 3)]
    m = Indexed(Indexed.Config(), nn.Linear(12, 2), num_samples=10)
    _step(m, micro_batch(views, indices=torch.tensor([7, 2, 7])))
    assert m.calls[-1]["indices"].tolist() == [7, 2, 7] and m.calls[-1]["labels"] is None
    assert m.seen[7] == 1  # the same index twice in a batch: an advanced-index assignment, not a sum
    with pytest.raises(ValueError, match="Indexed needs each sample's dataset index"):
        _step(m, micro_batch(views))
    p = Plain(Plain.Config(), nn.Linear(12, 2))
    _step(p, micro_batch(views, indices=torch.tensor([0, 1, 2])))
    assert p.calls[-1]["indices"] is None  # called as before: forward(views)


def test_build_passes_num_samples_to_methods_that_need_indices(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "indexed", Indexed)
    m = methods.build(Indexed.Config(), nn.Linear(12, 2), num_samples=50)
    assert m.num_samples == 50 and m.seen.shape == (50,)
    with pytest.raises(ConfigError, match="needs the size of the training data"):
        methods.build(Indexed.Config(), nn.Linear(12, 2))
    cfg = TrainConfig(method=Indexed.Config(), model=ModelConfig(name="resnet10_cifar"))
    assert build_method(cfg, num_samples=7).num_samples == 7
    monkeypatch.setitem(methods.METHODS, "indexed", Plain)  # the others are built as before
    assert methods.build(Plain.Config(), nn.Linear(12, 2), num_samples=50).num_samples == 4


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_non_persistent_buffers_are_per_rank_state_in_the_checkpoint(tmp_path):
    cfg = Indexed.Config()
    m = Indexed(cfg, nn.Linear(12, 2), num_samples=6)
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.1, weight_decay=0.0), m)
    for step, idx in enumerate(([0, 1], [1, 5])):
        train_step(m, m, opt, None, [micro_batch([torch.randn(2, 3, 2, 2)], indices=torch.tensor(idx))], step=step,
                   max_steps=10, precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu"))
    assert "seen_here" not in m.state_dict() and "seen" in m.state_dict()
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path / "ck")), tmp_path)
    ckpt.save(2, m, opt, method=m, scaler=None, data_state={}, train_config=TrainConfig())
    fresh = Indexed(cfg, nn.Linear(12, 2), num_samples=6)
    fresh_opt = build_optimizer(OptimConfig(name="sgd", lr=0.1, weight_decay=0.0), fresh)
    restored = Checkpointer(CheckpointConfig(dir=str(tmp_path / "ck")), tmp_path).resume(
        fresh, fresh_opt, method=fresh, scaler=None)
    assert restored.exact and restored.step == 2
    assert fresh.seen_here.tolist() == fresh.seen.tolist() == [1, 2, 0, 0, 0, 1]
