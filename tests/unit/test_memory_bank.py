"""The memory bank of NPID and PIRL on one rank: initial rows, lookups, updates by hand, the NCE
loss and its normalisation constant against the official formulas written out with loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seerlike.methods.memory_bank import (BankContrast, MemoryBank, initial_rows, last_occurrences, nce_loss, softmax_loss)

torch.set_num_threads(1)


def nce_by_hand(q, pos_rows, neg_rows, t: float, z: float, n: int) -> float:
    """lemniscate's NCECriterion: P(data) for the positive, P(noise) for each negative, Pn = 1/N."""
    k, pn = len(neg_rows), 1.0 / n
    total = 0.0
    for i in range(q.shape[0]):
        p = math.exp(float(q[i] @ pos_rows[i]) / t) / z
        total += math.log(p / (p + k * pn))
        for row in neg_rows:
            p_noise = math.exp(float(q[i] @ row) / t) / z
            total += math.log(k * pn / (p_noise + k * pn))
    return -total / q.shape[0]


def z_by_hand(q, pos_rows, neg_rows, t: float, n: int) -> float:
    """The official estimate: N times the mean of exp(score / T) over every (sample, row) pair of the batch."""
    values = []
    for i in range(q.shape[0]):
        values.append(math.exp(float(q[i] @ pos_rows[i]) / t))
        values.extend(math.exp(float(q[i] @ row) / t) for row in neg_rows)
    return n * sum(values) / len(values)


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_nce_loss_equals_the_official_criterion_by_hand():
    q, pos, neg = _unit(3, 5, seed=1), _unit(3, 5, seed=2), _unit(4, 5, seed=3)
    t, z, n = 0.07, 250.0, 40
    got = nce_loss((q * pos).sum(1) / t, q @ neg.t() / t, torch.tensor(math.log(z)), n)
    assert got.item() == pytest.approx(nce_by_hand(q, pos, neg, t, z, n), rel=1e-5)


def test_softmax_loss_is_the_cross_entropy_of_the_positive():
    q, pos, neg = _unit(3, 5, seed=1), _unit(3, 5, seed=2), _unit(4, 5, seed=3)
    expected = 0.0
    for i in range(3):
        e = [math.exp(float(q[i] @ pos[i]) / 0.1)] + [math.exp(float(q[i] @ r) / 0.1) for r in neg]
        expected -= math.log(e[0] / sum(e)) / 3
    got = softmax_loss((q * pos).sum(1) / 0.1, q @ neg.t() / 0.1)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_initial_rows_depend_on_the_sample_only_and_follow_the_official_range():
    full = initial_rows(0, 10_000, 6, normalize=False)
    a = 1 / math.sqrt(6 / 3)
    assert full.abs().max() <= a and full.min() < -0.9 * a and full.max() > 0.9 * a
    assert full.pow(2).sum(1).mean().item() == pytest.approx(1.0, abs=0.02)  # expected squared norm 1
    share = -(-10_000 // 3)  # three ranks' contiguous shares, blocks cut anywhere
    parts = [initial_rows(r * share, min((r + 1) * share, 10_000), 6, normalize=False) for r in range(3)]
    assert torch.equal(torch.cat(parts), full)
    assert torch.equal(initial_rows(4100, 4101, 6, normalize=False), full[4100:4101])
    unit = initial_rows(0, 10_000, 6, normalize=True)
    torch.testing.assert_close(unit, F.normalize(full, dim=1))


def test_last_occurrences_keeps_the_last_of_each_repeated_index():
    idx = torch.tensor([4, 2, 4, 7, 2, 4])
    assert last_occurrences(idx).tolist() == [False, False, False, True, True, True]
    assert last_occurrences(torch.tensor([3])).tolist() == [True]


def test_bank_fetch_and_update_by_hand():
    bank = MemoryBank(9, 4, momentum=0.5, normalize_init=True)
    assert bank.rows.shape == (10, 4) and bank.lo == 0 and bank.hi == 9  # 9 rows and the scratch row
    before = bank.rows[:-1].clone()
    torch.testing.assert_close(bank.fetch(torch.tensor([3, 0, 3])), before[[3, 0, 3]])
    feats = _unit(4, 4, seed=5)
    bank.update(torch.tensor([1, 6, 1, 8]), feats)
    expected = before.clone()
    expected[6] = F.normalize(0.5 * before[6] + 0.5 * feats[1], dim=0)
    expected[1] = F.normalize(0.5 * before[1] + 0.5 * feats[2], dim=0)  # twice in the batch: the last one
    expected[8] = F.normalize(0.5 * before[8] + 0.5 * feats[3], dim=0)
    torch.testing.assert_close(bank.rows[:-1], expected)
    assert int(bank.updates) == 1 and torch.equal(bank.rows[-1], torch.zeros(4))
    bank.reset()
    assert torch.equal(bank.rows[:-1], before) and int(bank.updates) == 0


def _contrast(**kw) -> BankContrast:
    torch.manual_seed(0)
    base = dict(num_negatives=5, temperature=0.1, momentum=0.5, loss="nce", normalize_init=False)
    return BankContrast(12, 4, **{**base, **kw})


def test_negatives_are_reproducible_per_draw_and_differ_between_draws():
    a, b = _contrast(), _contrast()
    assert int(a.seed) == int(b.seed)  # seeded from the global RNG: the same on every rank
    first = a.negatives(torch.device("cpu"))
    assert torch.equal(first, b.negatives(torch.device("cpu")))
    assert first.shape == (5,) and 0 <= first.min() and first.max() < 12
    second = a.negatives(torch.device("cpu"))
    assert not torch.equal(first, second) and int(a.draws) == 2
    fresh = _contrast()  # a checkpoint's counter: the next draw continues the sequence
    fresh.load_state_dict(a.state_dict())
    assert torch.equal(fresh.negatives(torch.device("cpu")), a.negatives(torch.device("cpu")))


def test_first_taken_step_sets_z_from_its_batch_then_keeps_it():
    m = _contrast()
    q = _unit(3, 4, seed=7)
    pos, neg, batch_idx = m.lookup(torch.tensor([2, 9, 4]))
    torch.testing.assert_close(pos, initial_rows(0, 12, 4, normalize=False)[[2, 9, 4]])
    assert torch.equal(batch_idx, torch.tensor([2, 9, 4])) and neg.shape == (5, 4)
    loss, acc = m.loss(q, pos, neg)
    z = z_by_hand(q, pos, neg, 0.1, 12)
    assert loss.item() == pytest.approx(nce_by_hand(q, pos, neg, 0.1, z, 12), rel=1e-5)
    q2 = _unit(3, 4, seed=8)
    loss2, _ = m.loss(q2, pos, neg)  # the same step (PIRL's second term, a later micro-batch): the same Z
    assert loss2.item() == pytest.approx(nce_by_hand(q2, pos, neg, 0.1, z, 12), rel=1e-5)
    assert not bool(m.z_known)  # kept only once the step is taken
    m.close_step()
    m.commit()
    assert bool(m.z_known) and float(m.log_z) == pytest.approx(math.log(z), rel=1e-6)
    loss3, _ = m.loss(q2, pos, neg)  # later steps: Z stays
    assert loss3.item() == pytest.approx(loss2.item(), rel=1e-6)
    expected_acc = sum(float(q[i] @ pos[i]) > max(float(q[i] @ r) for r in neg) for i in range(3)) / 3
    assert acc.item() == pytest.approx(expected_acc)


def test_a_skipped_step_drops_its_z_estimate():
    m = _contrast()
    pos, neg, _ = m.lookup(torch.tensor([2, 9, 4]))
    m.loss(torch.full((3, 4), float("nan")), pos, neg)
    m.close_step()  # no commit: the step was skipped
    q = _unit(3, 4, seed=7)
    loss, _ = m.loss(q, pos, neg)
    assert loss.item() == pytest.approx(nce_by_hand(q, pos, neg, 0.1, z_by_hand(q, pos, neg, 0.1, 12), 12), rel=1e-5)


def test_updates_wait_for_the_step_and_a_skipped_step_drops_them():
    m = _contrast()
    m.train()
    before = m.bank.rows.clone()
    _, _, batch_idx = m.lookup(torch.tensor([1, 2]))
    m.remember(batch_idx, _unit(2, 4, seed=1))
    m.close_step()  # the step's backward is done; the optimizer step was skipped: no commit
    assert torch.equal(m.bank.rows, before)
    _, _, batch_idx = m.lookup(torch.tensor([3, 4]))
    feats = _unit(2, 4, seed=2)
    m.remember(batch_idx, feats)
    m.close_step()
    m.commit()
    changed = (m.bank.rows != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [3, 4]  # only the taken step's samples
    torch.testing.assert_close(m.bank.rows[3], F.normalize(before[3] + feats[0], dim=0))
    m.eval()
    m.remember(batch_idx, feats)  # evaluation forwards leave the bank alone
    m.close_step()
    assert m._ready == []


def test_per_rank_buffers_are_kept_out_of_ddp_broadcasts():
    from seerlike.engine.parallelize import keep_rank_buffers_out_of_ddp

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.memory = _contrast()
            self.fc = nn.Linear(2, 2)
    h = Holder()
    keep_rank_buffers_out_of_ddp(h)
    assert h._ddp_params_and_buffers_to_ignore == ["memory.bank.rows", "memory.bank.updates"]
    assert getattr(h.memory.bank.rows, "_ddp_ignored", False) and not hasattr(h.memory.seed, "_ddp_ignored")


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="num_samples >= 1"):
        MemoryBank(0, 4, momentum=0.5, normalize_init=False)
    with pytest.raises(ValueError, match="momentum"):
        MemoryBank(4, 4, momentum=1.5, normalize_init=False)
    with pytest.raises(ValueError, match="loss must be 'nce' or 'softmax'"):
        _contrast(loss="hinge")
    with pytest.raises(ValueError, match="int64 vector"):
        _contrast().lookup(torch.tensor([1.0, 2.0]))
