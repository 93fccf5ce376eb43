"""SwAV: Sinkhorn marginals, ln K at uniform scores, the queue, frozen prototypes, precision."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seerlike.methods.swav import SwAV, sinkhorn

torch.set_num_threads(1)


class TinyNet(nn.Module):
    """Conv + BN + global pool: enough of a trunk to exercise SwAV."""

    out_dim = 16

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.bn(self.conv(x)).relu().mean((2, 3))


def _swav(**kw) -> SwAV:
    torch.manual_seed(0)
    base = dict(head_dims=(32, 8), num_prototypes=10, num_crops=2, freeze_prototypes_steps=0)
    return SwAV(SwAV.Config(**{**base, **kw}), TinyNet())


def _views(step: int, n: int = 2, bs: int = 4, sizes=None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    sizes = sizes or [8] * n
    return [torch.randn(bs, 3, s, s, generator=g) for s in sizes]


def _reference_sinkhorn(out: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """The SwAV repository's single-process code, verbatim in spirit (no max shift)."""
    q = torch.exp(out / eps).t()
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def test_sinkhorn_marginals_and_reference():
    g = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(32, 8, generator=g), dim=1)  # cosine scores in [-1, 1]
    q = sinkhorn(scores, 0.05, 3)
    assert q.shape == (32, 8) and q.dtype == torch.float32 and (q >= 0).all()
    # as returned, each sample's code sums to 1 (the last Sinkhorn step normalises samples)
    torch.testing.assert_close(q.sum(1), torch.ones(32), atol=1e-5, rtol=0)
    torch.testing.assert_close(q, _reference_sinkhorn(scores, 0.05, 3), atol=1e-6, rtol=1e-5)
    # each prototype's total mass over the batch tends to B/K as the iterations converge
    q_conv = sinkhorn(scores, 0.05, 200)
    torch.testing.assert_close(q_conv.sum(0), torch.full((8,), 32 / 8), atol=1e-3, rtol=0)
    assert (q.sum(0) - 4).abs().max() > (q_conv.sum(0) - 4).abs().max()


def test_sinkhorn_is_stable_where_the_unshifted_exp_overflows():
    g = torch.Generator().manual_seed(1)
    scores = F.normalize(torch.randn(16, 5, generator=g), dim=1)
    shifted = scores + 10  # exp(shifted / 0.05) = e^200+ overflows fp32 without the max shift
    assert not torch.isfinite(_reference_sinkhorn(shifted, 0.05, 3)).all()
    q = sinkhorn(shifted, 0.05, 3)
    torch.testing.assert_close(q, _reference_sinkhorn(scores, 0.05, 3), atol=1e-6, rtol=1e-5)


def test_sinkhorn_runs_in_fp32_for_half_inputs():
    scores = F.normalize(torch.randn(16, 6), dim=1)
    for dtype in (torch.bfloat16, torch.float16):
        q = sinkhorn(scores.to(dtype), 0.05, 3)
        assert q.dtype == torch.float32
        torch.testing.assert_close(q, sinkhorn(scores.to(dtype).float(), 0.05, 3))


def test_loss_is_ln_k_for_uniform_scores():
    m = _swav(num_prototypes=37)
    with torch.no_grad():
        m.prototypes.weight.zero_()
    loss, _ = m(_views(0))
    assert abs(loss.item() - math.log(37)) < 1e-5


def test_forward_backward_multicrop_one_trunk_call_per_resolution():
    m = _swav(num_crops=5, crops_for_assign=(0, 1))
    views = _views(0, sizes=[12, 12, 6, 6, 6])
    m.backbone.calls = 0
    loss, metrics = m(views)
    assert m.backbone.calls == 2  # 2 x 12px together, 3 x 6px together
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() > 0
    assert metrics == {"queue_used": 0.0}
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_swapped_prediction_matches_the_formula():
    m = _swav(num_crops=3, crops_for_assign=(0, 2))
    views = _views(3, n=3)
    loss, _ = m(views)
    with torch.no_grad():
        _, scores = m.embed(views)
        s = scores.chunk(3)
        expected = 0.0
        for crop in (0, 2):
            q = _reference_sinkhorn(s[crop], 0.05, 3)
            expected += sum(-(q * F.log_softmax(s[v] / 0.1, 1)).sum(1).mean() for v in range(3) if v != crop) / 2
        expected /= 2
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)


def test_queue_fifo_start_and_use():
    """queue_length 6, batch 2, two assignment crops, filled from step 1: full after steps 1-3, used from step 4."""
    m = _swav(queue_length=6, queue_start_step=1)
    assert m.queue.shape == (2, 6, 8)
    embeddings, used, losses = [], [], []
    for step in range(6):
        views = _views(step, bs=2)
        with torch.no_grad():
            z, scores = m.embed(views)
            queue_before = m.queue.clone()
        loss, metrics = m(views)
        used.append(metrics["queue_used"])
        embeddings.append(z)
        losses.append((loss.item(), queue_before, scores))
        m.on_step_end(step, 6)
    assert used == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert int(m.queue_filled) == 6 and int(m.step) == 6
    # newest first: steps 5, 4, 3 of assignment crop i (rows i*2:(i+1)*2 of the embeddings)
    for i in range(2):
        expected = torch.cat([embeddings[s][i * 2:(i + 1) * 2] for s in (5, 4, 3)])
        torch.testing.assert_close(m.queue[i], expected)
    # the loss at step 5 used Sinkhorn over [queue scores; batch scores], codes of the batch rows
    loss5, queue5, scores5 = losses[5]
    with torch.no_grad():
        s = scores5.chunk(2)
        expected = 0.0
        for i, crop in enumerate((0, 1)):
            out = torch.cat([queue5[i] @ m.prototypes.weight.t(), s[crop]])
            q = _reference_sinkhorn(out, 0.05, 3)[-2:]
            expected += -(q * F.log_softmax(s[1 - crop] / 0.1, 1)).sum(1).mean()
        expected /= 2
    assert abs(loss5 - expected.item()) < 1e-5


def test_queue_travels_in_the_state_dict():
    m = _swav(queue_length=4)
    for step in range(3):
        m(_views(step, bs=2))
        m.on_step_end(step, 3)
    fresh = _swav(queue_length=4)
    fresh.load_state_dict(m.state_dict())
    assert {"queue", "queue_filled", "step"} <= set(fresh.state_dict())
    torch.testing.assert_close(fresh.queue, m.queue)
    assert int(fresh.queue_filled) == 4 and int(fresh.step) == 3


def test_frozen_prototypes_do_not_move_then_move():
    m = _swav(freeze_prototypes_steps=3)
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    history = [m.prototypes.weight.detach().clone()]
    for step in range(6):
        loss, _ = m(_views(step))
        opt.zero_grad()
        loss.backward()
        m.on_after_backward(step)
        assert (m.prototypes.weight.grad is None) == (step < 3)
        opt.step()
        m.on_step_end(step, 6)
        history.append(m.prototypes.weight.detach().clone())
        torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(10))
    for s in range(1, 4):  # after steps 0, 1, 2
        torch.testing.assert_close(history[s], history[0], atol=1e-7, rtol=0)
    for s in range(4, 7):
        assert (history[s] - history[s - 1]).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_autocast(dtype):
    m = _swav(queue_length=4)
    views = _views(0)
    ref, _ = m(views)
    m2 = _swav(queue_length=4)
    with torch.autocast("cpu", dtype=dtype):
        loss, _ = m2(views)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()
    loss.backward()
    assert torch.isfinite(m2.prototypes.weight.grad).all()
    assert m2.queue.dtype == torch.float32 and int(m2.queue_filled) == 4


def test_bad_config_and_inputs_fail_clearly():
    with pytest.raises(ValueError, match="crops_for_assign"):
        SwAV.Config(num_crops=2, crops_for_assign=(0, 2))
    with pytest.raises(ValueError, match="num_crops"):
        _swav(num_crops=3)(_views(0, n=2))
    with pytest.raises(ValueError, match="out_dim"):
        SwAV(SwAV.Config(), nn.Linear(3, 3))


def test_reset_state_empties_the_queue_and_renormalises():
    m = _swav(queue_length=4)
    for step in range(2):
        m(_views(step, bs=2))
        m.on_step_end(step, 2)
    with torch.no_grad():
        m.prototypes.weight.mul_(3.0)
    m.reset_state()
    assert not m.queue.any() and int(m.queue_filled) == 0 and int(m.step) == 0
    torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(10))


@pytest.mark.gpu
def test_swav_step_on_cuda_bf16():
    from seerlike.engine.optim import OptimConfig, build_optimizer

    m = _swav(queue_length=4, num_crops=3).cuda()
    opt = build_optimizer(OptimConfig(name="larc"), m)
    for step in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = m([v.cuda() for v in _views(step, n=3, bs=2)])
        loss.backward()
        m.on_after_backward(step)
        opt.step()
        opt.zero_grad()
        m.on_step_end(step, 3)
    assert torch.isfinite(loss) and m.queue.is_cuda and int(m.queue_filled) == 4
