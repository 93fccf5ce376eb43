"""NPID on one rank: the loss of a forward by hand (bank rows, drawn negatives, Z), the bank update
after the step by hand, a skipped step, the state through a real checkpoint, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seerlike.engine.checkpoint import CheckpointConfig, Checkpointer
from seerlike.engine.config import TrainConfig
from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods.memory_bank import initial_rows
from seerlike.methods.npid import NPID
from seerlike.testing import micro_batch
from tests.unit.test_memory_bank import nce_by_hand, z_by_hand

torch.set_num_threads(1)
N = 10


class Linear(nn.Module):
    out_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 6)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _npid(**kw) -> NPID:
    torch.manual_seed(0)
    base = dict(embedding_dim=4, num_negatives=5, temperature=0.5, bank_momentum=0.5)
    return NPID(NPID.Config(**{**base, **kw}), Linear(), num_samples=N)


def _views(step: int, n: int = 1, bs: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(bs, 3, 2, 2, generator=g) for _ in range(n)]


def _spy_negatives(m: NPID) -> list[torch.Tensor]:
    drawn = []
    draw = m.memory.negatives
    m.memory.negatives = lambda device: drawn.append(draw(device)) or drawn[-1]
    return drawn


def _step(m, opt, step, views, idx, **kw):
    return train_step(m, m, opt, None, [micro_batch(views, indices=torch.tensor(idx))], step=step, max_steps=10,
                      precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu"), **kw)


def test_forward_is_nce_against_the_bank_rows_and_the_drawn_negatives():
    m = _npid()
    drawn = _spy_negatives(m)
    bank = initial_rows(0, N, 4, normalize=False)  # the official start: uniform rows, not unit
    views, idx = _views(0), [7, 0, 3]
    loss, stats = m(views, indices=torch.tensor(idx))
    with torch.no_grad():
        q = F.normalize(m.head(m.backbone(views[0])), dim=1)
    pos, neg = bank[idx], bank[drawn[0]]
    z = z_by_hand(q, pos, neg, 0.5, N)
    assert loss.item() == pytest.approx(nce_by_hand(q, pos, neg, 0.5, z, N), rel=1e-5)
    assert 0.0 <= stats["acc"].item() <= 1.0


def test_softmax_loss_and_several_views():
    m = _npid(loss="softmax")
    drawn = _spy_negatives(m)
    bank = initial_rows(0, N, 4, normalize=False)
    views, idx = _views(0, n=2), [1, 2, 9]
    loss, _ = m(views, indices=torch.tensor(idx))
    expected = 0.0
    with torch.no_grad():
        for v in views:
            q = F.normalize(m.head(m.backbone(v)), dim=1)
            for i, sample in enumerate(idx):
                e = [math.exp(float(q[i] @ bank[sample]) / 0.5)] + [math.exp(float(q[i] @ r) / 0.5) for r in bank[drawn[0]]]
                expected -= math.log(e[0] / sum(e)) / (3 * 2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_bank_rows_move_after_the_step_by_hand():
    m = _npid()
    drawn = _spy_negatives(m)
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.5, weight_decay=0.0), m)
    before = m.memory.bank.rows[:-1].clone()
    views, idx = _views(0), [4, 1, 8]
    with torch.no_grad():
        q = F.normalize(m.head(m.backbone(views[0])), dim=1)  # the embeddings of the step's forward
    result = _step(m, opt, 0, views, idx)
    z = z_by_hand(q, before[idx], before[drawn[0]], 0.5, N)
    assert result.loss == pytest.approx(nce_by_hand(q, before[idx], before[drawn[0]], 0.5, z, N), rel=1e-5)
    assert float(m.memory.log_z) == pytest.approx(math.log(z), rel=1e-6)  # the taken first step's Z, kept
    expected = before.clone()
    expected[idx] = F.normalize(0.5 * before[idx] + 0.5 * q, dim=1)
    torch.testing.assert_close(m.memory.bank.rows[:-1], expected)
    assert int(m.memory.draws) == 1


def test_a_skipped_step_leaves_the_bank_alone():
    m = _npid()
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.5, weight_decay=0.0), m)
    before = m.memory.bank.rows.clone()
    bad = [torch.full((3, 3, 2, 2), float("nan"))]
    assert _step(m, opt, 0, bad, [0, 1, 2], skip_nonfinite=True).skipped
    assert torch.equal(m.memory.bank.rows, before)  # a NaN embedding never reaches the bank
    _step(m, opt, 1, _views(1), [5, 6, 7])
    changed = (m.memory.bank.rows != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [5, 6, 7]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_state_and_bank_resume_exactly_from_a_checkpoint(tmp_path):
    def run(m, opt, steps):
        return [_step(m, opt, s, _views(s), [(3 * s + j) % N for j in range(3)]).loss for s in steps]

    m = _npid()
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.5, weight_decay=0.0), m)
    run(m, opt, range(3))
    state = m.state_dict()
    assert {"memory.seed", "memory.draws", "memory.log_z", "memory.z_known", "head.weight"} <= set(state)
    assert "memory.bank.rows" not in state and int(state["memory.draws"]) == 3  # the bank is per-rank state
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path / "ck")), tmp_path)
    ckpt.save(3, m, opt, method=m, scaler=None, data_state={}, train_config=TrainConfig())
    ckpt.wait() if hasattr(ckpt, "wait") else None
    after = run(m, opt, range(3, 5))

    fresh = _npid()
    fresh_opt = build_optimizer(OptimConfig(name="sgd", lr=0.5, weight_decay=0.0), fresh)
    restored = Checkpointer(CheckpointConfig(dir=str(tmp_path / "ck")), tmp_path).resume(
        fresh, fresh_opt, method=fresh, scaler=None)
    assert restored.exact and restored.step == 3
    assert run(fresh, fresh_opt, range(3, 5)) == pytest.approx(after, rel=1e-6)
    assert torch.equal(fresh.memory.bank.rows, m.memory.bank.rows)
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_reset_state_restores_the_initial_bank_and_forgets_z():
    m = _npid()
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.5, weight_decay=0.0), m)
    start = m.memory.bank.rows.clone()
    _step(m, opt, 0, _views(0), [0, 1, 2])
    m.reset_state()
    assert torch.equal(m.memory.bank.rows, start) and int(m.memory.draws) == 0 and not bool(m.memory.z_known)


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="needs each sample's dataset index"):
        _npid()(_views(0))
    with pytest.raises(ValueError, match=r"indices must have shape \(3,\)"):
        _npid()(_views(0), indices=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="num_negatives must be >= 1"):
        NPID.Config(num_negatives=0)
    with pytest.raises(ValueError, match="bank_momentum"):
        NPID.Config(bank_momentum=2.0)
    NPID.check_views(NPID.Config(), [24])  # one view is the official recipe; more are averaged
    NPID.check_views(NPID.Config(), [24, 24])
