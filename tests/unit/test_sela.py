"""SeLa: random equipartitioned start, labels equal to SeLa's own Sinkhorn-Knopp on the stored
logits (written out here), its marginals, the loss written out, unit heads, state, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods.sela import SeLa, equipartition
from seerlike.methods.swav import sinkhorn
from seerlike.testing import micro_batch
from tests.unit.test_deepcluster_v2 import Flat, _views

torch.set_num_threads(1)


def _method(n: int = 16, **kw) -> SeLa:
    torch.manual_seed(0)
    base = dict(head_dims=(), num_prototypes=(4, 3), crops_for_assign=(0, 1), sinkhorn_iters=300)
    return SeLa(SeLa.Config(**{**base, **kw}), Flat(), num_samples=n)


def _selfLabel_sinkhorn(logits: np.ndarray, lamb: float, iters: int) -> np.ndarray:
    """yukimasano/self-label's optimize_L_sk in float64: P = softmax^lambda, then r and c alternately."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p = (p / p.sum(1, keepdims=True)).T ** lamb  # K x N
    k, n = p.shape
    r, c = np.ones((k, 1)) / k, np.ones((n, 1)) / n
    for _ in range(iters):
        r = (1 / k) / (p @ c)
        c = (1 / n) / (r.T @ p).T
    return np.argmax(p * c.T * r, axis=0)


def test_labels_start_as_a_random_equipartition():
    lab = equipartition(10, 3, seed=1)
    assert sorted(np.bincount(lab.numpy()).tolist()) == [3, 3, 4]
    m = _method()
    assert np.bincount(m.labels[0].numpy()).tolist() == [4, 4, 4, 4]
    assert not torch.equal(m.labels[0], torch.arange(16) % 4)  # shuffled


def test_relabelling_is_selfLabels_sinkhorn_on_the_memory_logits():
    m = _method(n=16, epsilon=1 / 5)  # lambda 5
    for step in range(3):  # 12 of the 16 samples in the memory (a pass is 4 calls of 4)
        m(_views(step), indices=torch.arange(4 * step, 4 * step + 4))
    before = m.labels.clone()
    m.relabel()
    rows = torch.argsort(m.memory.index[:12])
    for h in range(2):
        x = m.memory.emb[h % 2][:12][rows]
        logits = m.heads[h](x).detach().double().numpy()
        assert m.labels[h, :12].tolist() == _selfLabel_sinkhorn(logits, 5.0, 300).tolist()
    assert torch.equal(m.labels[:, 12:], before[:, 12:])  # samples the memory does not hold keep their labels
    assert int(m.labellings) == 1


def test_sinkhorn_marginals_on_stored_logits_and_why_float64():
    g = torch.Generator().manual_seed(3)
    logits = 4 * torch.randn(200, 5, generator=g, dtype=torch.float64)
    q = sinkhorn(logits, 0.04, 2000, dtype=torch.float64)
    assert q.dtype == torch.float64
    torch.testing.assert_close(q.sum(1), torch.ones(200, dtype=torch.float64))  # every sample sums to 1
    torch.testing.assert_close(q.sum(0), torch.full((5,), 40.0, dtype=torch.float64), atol=1e-6, rtol=0)  # N / K
    assert np.bincount(q.argmax(1).numpy(), minlength=5).tolist() == [40] * 5  # hard labels: an equipartition
    # in float32 exp(logits / 0.04) underflows for most samples far from the global maximum: their mass is lost
    q32 = sinkhorn(logits, 0.04, 2000)
    assert float(q32.sum()) < 100


def test_loss_is_the_mean_over_heads_of_every_views_cross_entropy():
    for kw in (dict(), dict(normalize=True, temperature=0.1)):
        m = _method(**kw)
        with torch.no_grad():
            m.labels[0] = torch.arange(16) % 4
            m.labels[1] = (torch.arange(16) * 7) % 3
        views, idx = _views(0, bs=3, n=3), torch.tensor([2, 11, 7])
        loss, _ = m(views, indices=idx)
        t = kw.get("temperature", 1.0)
        total = 0.0
        for h, head in enumerate(m.heads):
            w, b = head.weight.detach(), None if head.bias is None else head.bias.detach()
            head_sum = 0.0
            for v in views:
                z = m.backbone(v).detach()
                if kw:
                    z = F.normalize(z, dim=1)
                for i, s in enumerate(idx.tolist()):
                    logits = [float(z[i] @ w[j] + (b[j] if b is not None else 0)) / t
                              for j in range(head.out_features)]
                    head_sum -= logits[int(m.labels[h, s])] - math.log(sum(math.exp(l) for l in logits))
            total += head_sum / 9
        assert float(loss.detach()) == pytest.approx(total / 2, rel=1e-5)


def test_normalised_heads_stay_unit_rows_and_relabelling_follows_label_every():
    m = _method(normalize=True, temperature=0.1, epsilon=0.05, label_every=3)
    assert all(h.bias is None for h in m.heads)
    opt = build_optimizer(OptimConfig(name="sgd", lr=1.0, weight_decay=0.0), m)
    done = []
    for step in range(7):
        batch = micro_batch(_views(step), indices=torch.arange(4 * (step % 4), 4 * (step % 4) + 4))
        train_step(m, m, opt, None, [batch], step=step, max_steps=7, precision=PrecisionConfig(dtype="fp32"),
                   device=torch.device("cpu"))
        done.append(int(m.labellings))
        for h in m.heads:
            torch.testing.assert_close(h.weight.norm(dim=1), torch.ones(h.out_features))
    assert done == [0, 0, 0, 1, 1, 1, 2]  # before the calls 3 and 6


def test_state_survives_state_dict_and_training_is_finite():
    m = _method(head_dims=(8, 4))
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.5, weight_decay=0.0), m)
    losses = []
    for step in range(6):
        batch = micro_batch(_views(step), indices=torch.arange(4 * (step % 4), 4 * (step % 4) + 4))
        r = train_step(m, m, opt, None, [batch], step=step, max_steps=6, precision=PrecisionConfig(dtype="fp32"),
                       device=torch.device("cpu"))
        losses.append(r.loss)
    assert all(0 < l < 10 for l in losses) and int(m.labellings) == 1
    state = m.state_dict()
    assert {"labels", "labellings", "heads.0.weight", "heads.1.bias"} <= set(state)
    assert not any(k.startswith("memory.") for k in state)
    fresh = _method(head_dims=(8, 4), seed=7)
    assert not torch.equal(fresh.labels, m.labels)
    fresh.load_state_dict(state)
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_bad_settings_fail_naming_the_fix():
    with pytest.raises(ValueError, match="fewer than the 30 classes"):
        SeLa(SeLa.Config(num_prototypes=(30,)), Flat(), num_samples=20)
    with pytest.raises(ValueError, match="crops_for_assign=\\[1\\] names view 1"):
        SeLa.check_views(SeLa.Config(crops_for_assign=(1,)), [224])
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        SeLa.Config(epsilon=0)
    assert isinstance(_method().heads[0], nn.Linear)
