"""MoCo v2: InfoNCE against the queue by hand, the queue ring by hand, momentum by hand, state round trip."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods.moco_v2 import MoCoV2, moco_loss, shuffle_permutation, shuffled_slice, unshuffle
from seerlike.testing import micro_batch
from tests.unit.test_swav import TinyNet, _views

torch.set_num_threads(1)


def _moco(**kw) -> MoCoV2:
    torch.manual_seed(0)
    base = dict(head_dims=(32, 8), queue_length=6, momentum=0.9, temperature=0.5)
    return MoCoV2(MoCoV2.Config(**{**base, **kw}), TinyNet())


def _step(m: MoCoV2, opt, step: int, max_steps: int = 4, bs: int = 4) -> float:
    return train_step(m, m, opt, None, [micro_batch(_views(step, bs=bs))], step=step, max_steps=max_steps,
                      precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu")).loss


def _infonce_by_hand(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, t: float) -> float:
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / t)
        neg = sum(math.exp(float(q[i] @ n) / t) for n in negatives)
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


def test_moco_loss_equals_the_formula_by_hand():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 4, generator=g), F.normalize(torch.randn(3, 4, generator=g), dim=1)
    negatives = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    loss, acc = moco_loss(q, k, negatives, 0.2)
    assert loss.item() == pytest.approx(_infonce_by_hand(q, k, negatives, 0.2), rel=1e-5)
    assert 0.0 <= acc.item() <= 1.0


def test_forward_uses_the_queue_before_this_batch_then_enqueues_its_keys():
    m = _moco()
    v1, v2 = _views(0)
    before = m.queue.clone()
    assert torch.allclose(before.norm(dim=1), torch.ones(6))  # the official start: random unit keys
    loss, _ = m([v1, v2])
    with torch.no_grad():
        q = m.head(m.backbone(v1))
        k = F.normalize(m.key_encoder(v2), dim=1)
    assert loss.item() == pytest.approx(_infonce_by_hand(q, k, before, 0.5), rel=1e-5)
    torch.testing.assert_close(m.queue[:4], k)
    assert torch.equal(m.queue[4:], before[4:]) and int(m.queue_ptr) == 4


def test_queue_is_a_ring_that_wraps_around():
    m = _moco()
    keys = []
    for step in range(3):
        v1, v2 = _views(step)
        m([v1, v2])
        with torch.no_grad():
            keys.append(F.normalize(m.key_encoder(v2), dim=1))  # no step end: the key encoder is unchanged
    # 12 keys into 6 slots: rows 0-3 of step 0, then 4,5,0,1 of step 1, then 2,3,4,5 of step 2
    expected = torch.cat([keys[1][2:], keys[2]])
    torch.testing.assert_close(m.queue, expected)
    assert int(m.queue_ptr) == 0


def test_symmetric_loss_sums_both_directions_and_enqueues_both_views():
    m = _moco(symmetric=True, queue_length=10)
    v1, v2 = _views(0)
    before = m.queue.clone()
    loss, _ = m([v1, v2])
    with torch.no_grad():
        q1, q2 = m.head(m.backbone(v1)), m.head(m.backbone(v2))
        k1, k2 = (F.normalize(m.key_encoder(v), dim=1) for v in (v1, v2))
    expected = _infonce_by_hand(q1, k2, before, 0.5) + _infonce_by_hand(q2, k1, before, 0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(m.queue[:8], torch.cat([k1, k2]))
    assert int(m.queue_ptr) == 8


def test_key_encoder_is_a_frozen_momentum_copy():
    m = _moco(momentum=0.9)
    assert isinstance(m.head[1], nn.ReLU) and not any(isinstance(l, nn.BatchNorm1d) for l in m.head)
    opt = build_optimizer(OptimConfig(name="sgd", lr=25.6, weight_decay=0.0), m)
    assert not {id(p) for g in opt.param_groups for p in g["params"]} & {id(p) for p in m.key_encoder.parameters()}
    expected = [p.detach().clone() for p in m.key_encoder.parameters()]
    for step in range(3):
        assert math.isfinite(_step(m, opt, step, bs=2))
        online = [*m.backbone.parameters(), *m.head.parameters()]
        expected = [0.9 * e + 0.1 * o.detach() for e, o in zip(expected, online)]
        for e, t in zip(expected, m.key_encoder.parameters()):
            torch.testing.assert_close(t, e, atol=1e-6, rtol=1e-6)
        assert all(p.grad is None for p in m.key_encoder.parameters())


def test_state_survives_a_round_trip():
    m = _moco()
    opt = build_optimizer(OptimConfig(name="sgd", lr=25.6, weight_decay=0.0), m)
    for step in range(2):
        _step(m, opt, step)
    state = m.state_dict()
    assert {"queue", "queue_ptr", "key_batches"} <= set(state) and int(state["queue_ptr"]) == 2
    assert any(k.startswith("key_encoder.backbone.") for k in state)
    fresh = _moco()
    fresh.load_state_dict(state)
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert torch.equal(fresh(_views(5))[0], m(_views(5))[0])
    assert torch.equal(fresh.queue, m.queue)


def test_reset_state_restores_the_initial_queue_and_copies_the_key_encoder():
    m = _moco()
    start = m.queue.clone()
    m(_views(0))
    with torch.no_grad():
        for p in m.key_encoder.parameters():
            p.add_(1.0)
    m.reset_state()
    assert torch.equal(m.queue, start) and int(m.queue_ptr) == 0 and int(m.key_batches) == 0
    assert torch.equal(_moco(queue_length=6).queue, start)  # a fixed seed: identical on every rank
    for o, t in zip([*m.backbone.parameters(), *m.head.parameters()], m.key_encoder.parameters()):
        assert torch.equal(o, t)


def test_shuffle_helpers_round_trip_on_one_rank():
    x = torch.arange(10.0).view(5, 2)
    perm = shuffle_permutation(5, 3)
    assert torch.equal(perm, shuffle_permutation(5, 3)) and sorted(perm.tolist()) == list(range(5))
    shuffled = shuffled_slice(x, perm, 1, 0)
    assert torch.equal(shuffled, x[perm])
    assert torch.equal(unshuffle(shuffled * 2, perm), x * 2)


def test_bad_config_and_inputs_fail_clearly():
    with pytest.raises(ValueError, match="queue_length"):
        _moco(queue_length=3)(_views(0))
    with pytest.raises(ValueError, match="queue_length must be >= 1"):
        MoCoV2.Config(queue_length=0)
    with pytest.raises(ValueError, match="exactly 2 views"):
        MoCoV2.check_views(MoCoV2.Config(), [24, 24, 24])
    with pytest.raises(ValueError, match="2 views"):
        _moco()(_views(0, n=3))


@pytest.mark.gpu
def test_moco_v2_step_on_cuda_bf16():
    m = _moco().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, stats = m([v.cuda() for v in _views(0)])
    loss.backward()
    m.on_step_end(0, 4)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and stats["acc"].is_cuda
    assert m.queue.dtype == torch.float32 and m.queue.is_cuda and int(m.queue_ptr) == 4
