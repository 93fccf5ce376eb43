"""Barlow Twins: standardisation = BatchNorm, the loss by hand, collapse, heads, state, steps, recipes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from seerlike.engine.optim import LRSchedule, OptimConfig, build_optimizer
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods import METHODS
from seerlike.methods.barlow_twins import BarlowTwins, barlow_twins_loss
from seerlike.methods.batch_stats import off_diagonal, standardize
from seerlike.recipes import barlow_twins as recipes
from seerlike.testing import micro_batch
from tests.unit.test_swav import TinyNet, _views

torch.set_num_threads(1)


def _bt(seed: int = 0, **kw) -> BarlowTwins:
    torch.manual_seed(seed)
    base = dict(projector_dims=(32, 6), lambd=0.3)
    return BarlowTwins(BarlowTwins.Config(**{**base, **kw}), TinyNet())


def _embeddings(seed: int, n: int = 8, d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g) * torch.linspace(0.5, 3, d) + 2.0
    return z1, 0.7 * z1 + 0.5 * torch.randn(n, d, generator=g)


def _loss_by_hand(z1: torch.Tensor, z2: torch.Tensor, lambd: float, eps: float = 1e-5) -> tuple[float, float]:
    a, b = z1.tolist(), z2.tolist()
    n, d = len(a), len(a[0])

    def standardized(rows):
        cols = []
        for j in range(d):
            col = [r[j] for r in rows]
            mean = sum(col) / n
            var = sum((x - mean) ** 2 for x in col) / n  # biased, as BatchNorm in training
            cols.append([(x - mean) / math.sqrt(var + eps) for x in col])
        return cols

    sa, sb = standardized(a), standardized(b)
    on = off = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(sa[i][k] * sb[j][k] for k in range(n)) / n
            if i == j:
                on += (1 - c) ** 2
            else:
                off += c ** 2
    return on, off


def test_standardize_is_batchnorm_without_affine_in_training():
    z = torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1
    out, count = standardize(z, 1e-5)
    bn = nn.BatchNorm1d(5, affine=False).train()
    for v in range(2):
        torch.testing.assert_close(out[v], bn(z[v]), atol=1e-6, rtol=1e-5)
    assert count.item() == 8


def test_off_diagonal_lists_exactly_the_entries_off_the_diagonal():
    m = torch.arange(16.0).view(4, 4)
    expected = [m[i, j].item() for i in range(4) for j in range(4) if i != j]
    assert off_diagonal(m).tolist() == expected
    with pytest.raises(ValueError, match="square"):
        off_diagonal(torch.zeros(2, 3))


def test_loss_terms_equal_the_formula_by_hand():
    z1, z2 = _embeddings(1)
    on, off, c = barlow_twins_loss(z1, z2, lambd=0.3)
    on_hand, off_hand = _loss_by_hand(z1, z2, 0.3)
    assert on.item() == pytest.approx(on_hand, rel=1e-5)
    assert off.item() == pytest.approx(off_hand, rel=1e-5)
    assert c.shape == (5, 5)


def test_method_loss_is_scaled_on_diag_plus_lambda_off_diag():
    m = _bt(scale_loss=0.5)
    v1, v2 = _views(0)
    loss, stats = m([v1, v2])
    with torch.no_grad():
        on, off = _loss_by_hand(m.projector(m.backbone(v1)), m.projector(m.backbone(v2)), 0.3)
    assert loss.item() == pytest.approx(0.5 * (on + 0.3 * off), rel=1e-5)
    assert stats["on_diag"].item() == pytest.approx(on, rel=1e-5)
    assert stats["off_diag"].item() == pytest.approx(off, rel=1e-5)
    assert -1.0 <= stats["mean_corr"].item() <= 1.0


def test_identical_views_give_a_zero_diagonal_term_and_a_collapse_gives_d():
    z1, _ = _embeddings(2)
    on, _, c = barlow_twins_loss(z1, z1.clone(), lambd=0.0051, eps=1e-5)
    var = z1.var(dim=0, correction=0)
    torch.testing.assert_close(c.diagonal(), var / (var + 1e-5), atol=1e-6, rtol=0)  # 1 but for BN's eps
    assert on.item() == pytest.approx(0.0, abs=1e-7)
    const = torch.full((8, 5), 3.0)  # a collapsed embedding: nothing to standardise, C = 0
    on, off, _ = barlow_twins_loss(const, const, lambd=0.0051)
    assert on.item() == pytest.approx(5.0) and off.item() == 0.0


def test_projector_layout_and_registration():
    assert METHODS["barlow_twins"] is BarlowTwins
    m = _bt(projector_dims=(16, 16, 6))
    linears = [x for x in m.projector if isinstance(x, nn.Linear)]
    assert [l.out_features for l in linears] == [16, 16, 6] and all(l.bias is None for l in linears)
    assert sum(isinstance(x, nn.BatchNorm1d) for x in m.projector) == 2
    assert not isinstance(m.projector[-1], nn.BatchNorm1d)


def test_state_round_trips_into_a_fresh_instance():
    m = _bt(seed=0)
    m(_views(0))
    fresh = _bt(seed=1)
    fresh.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    torch.testing.assert_close(fresh(_views(2))[0], m(_views(2))[0])


def test_train_steps_lower_the_loss_and_stay_finite():
    m = _bt()
    optim = OptimConfig(name="lars", lr=64.0, weight_decay=1e-6, warmup_steps=0)
    opt = build_optimizer(optim, m)
    sched = LRSchedule(optim, 4, 6)
    views = _views(3, bs=8)
    losses = []
    for step in range(6):
        sched.apply(opt, step)
        result = train_step(m, m, opt, None, [micro_batch(views)], step=step, max_steps=6,
                            precision=PrecisionConfig(dtype="bf16"), device=torch.device("cpu"))
        losses.append(result.loss)
        assert result.stats["on_diag"].dtype == torch.float32  # the loss runs in fp32 under autocast
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] * 0.9


def test_recipes():
    cfg = recipes.barlow_twins_resnet50()
    m = cfg.method
    assert (m.projector_dims, m.lambd) == ((8192, 8192, 8192), 0.0051)
    assert m.scale_loss == pytest.approx(0.024 / 16)
    assert cfg.data.batch_size * recipes.OFFICIAL_RANKS == 2048
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("lars", 0.2, 1e-6)
    assert cfg.optim.final_lr == pytest.approx(0.2e-3) and cfg.optim.warmup_steps == 10 * recipes.STEPS_PER_EPOCH
    tiny = recipes.tiny_barlow_twins()
    assert max(tiny.method.projector_dims) <= 1024 and tiny.method.lambd == 0.0051


def test_bad_config_and_inputs_fail_clearly():
    with pytest.raises(ValueError, match="positive widths"):
        BarlowTwins.Config(projector_dims=(8, 0))
    with pytest.raises(ValueError, match="at least 2 features"):
        BarlowTwins.Config(projector_dims=(8, 1))
    with pytest.raises(ValueError, match="scale_loss"):
        BarlowTwins.Config(scale_loss=0.0)
    with pytest.raises(ValueError, match="2 views"):
        _bt()(_views(0, n=3))
    with pytest.raises(ValueError, match="exactly 2 views"):
        BarlowTwins.check_views(BarlowTwins.Config(), [224])
