"""PIRL on one rank: the loss by hand (lambda between the transformed and the image term, both
against the bank row and the same negatives, Z from the transformed term), the jigsaw tiles on a
synthetic image whose pixels name their position, the bank update with f(v_I), bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods.memory_bank import initial_rows
from seerlike.methods.pirl import PIRL
from seerlike.testing import micro_batch
from tests.unit.test_memory_bank import nce_by_hand, z_by_hand
from tests.unit.test_npid import _spy_negatives
from tests.unit.test_swav import TinyNet

torch.set_num_threads(1)
N = 10


def _pirl(**kw) -> PIRL:
    torch.manual_seed(0)
    base = dict(embedding_dim=4, num_negatives=5, temperature=0.5, bank_momentum=0.5, transformed_weight=0.3)
    return PIRL(PIRL.Config(**{**base, **kw}), TinyNet(), num_samples=N)


def _views(step: int, bs: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(200 + step)
    return [torch.randn(bs, 3, 8, 8, generator=g), torch.randn(bs, 3, 12, 12, generator=g)]


@pytest.mark.parametrize("transform", ["jigsaw", "rotation"])
def test_loss_is_lambda_between_the_two_nce_terms_by_hand(transform):
    m = _pirl(transform=transform)
    drawn = _spy_negatives(m)
    bank = initial_rows(0, N, 4, normalize=True)  # VISSL's norm_init: unit rows
    views, idx = _views(0), [6, 2, 9]
    torch.manual_seed(11)
    loss, stats = m(views, indices=torch.tensor(idx))
    with torch.no_grad():
        f = F.normalize(m.image_head(m.backbone(views[0])), dim=1)
        torch.manual_seed(11)  # the same tiles and order (or rotations) as the forward drew
        g = F.normalize(m.transformed(views[1]), dim=1)
    pos, neg = bank[idx], bank[drawn[0]]
    z = z_by_hand(g, pos, neg, 0.5, N)  # estimated on the first term, the transformed one (as VISSL)
    expected = 0.3 * nce_by_hand(g, pos, neg, 0.5, z, N) + 0.7 * nce_by_hand(f, pos, neg, 0.5, z, N)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert set(stats) == {"acc_image", "acc_transformed"}


def test_jigsaw_cuts_one_tile_per_cell_inside_it_and_shuffles_them():
    m = _pirl()
    size, cell, tile = 12, 4, 3  # 3x3 cells of 4 px, tiles of 3 px (gap 0.25)
    b = 64
    # pixel (c, i, j) of image n holds n * 10000 + c * 1000 + i * 100 + j: every tile says where it came from
    n_, c_, i_, j_ = torch.meshgrid(torch.arange(b), torch.arange(3), torch.arange(size), torch.arange(size),
                                    indexing="ij")
    x = (n_ * 10000 + c_ * 1000 + i_ * 100 + j_).float()
    tiles = m.jigsaw(x)
    assert tiles.shape == (b, 9, 3, tile, tile)
    cells_at = torch.empty(b, 9, dtype=torch.long)
    for n in range(b):
        for t in range(9):
            corner = int(tiles[n, t, 0, 0, 0]) - n * 10000
            i, j = corner // 100, corner % 100
            assert torch.equal(tiles[n, t], x[n, :, i:i + tile, j:j + tile])  # a whole, unscaled block
            ci, cj = i // cell, j // cell
            assert (i + tile - 1) // cell == ci and (j + tile - 1) // cell == cj  # inside one cell
            cells_at[n, t] = ci * 3 + cj
        assert sorted(cells_at[n].tolist()) == list(range(9))  # every cell once
    assert len({tuple(r) for r in cells_at.tolist()}) > 50  # orders vary (64 draws of 9! orders)
    assert (cells_at != torch.arange(9)).any(dim=0).all()  # every position receives other cells


def test_bank_moves_toward_the_image_embedding_not_the_transformed_one():
    m = _pirl()
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.5, weight_decay=0.0), m)
    before = m.memory.bank.rows[:-1].clone()
    views, idx = _views(0), [3, 8, 0]
    with torch.no_grad():
        f = F.normalize(m.image_head(m.backbone(views[0])), dim=1)
    train_step(m, m, opt, None, [micro_batch(views, indices=torch.tensor(idx))], step=0, max_steps=4,
               precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu"))
    expected = before.clone()
    expected[idx] = F.normalize(0.5 * before[idx] + 0.5 * f, dim=1)
    torch.testing.assert_close(m.memory.bank.rows[:-1], expected)


def test_lambda_one_trains_through_the_transformed_head_only():
    m = _pirl(transformed_weight=1.0)
    loss, _ = m(_views(0), indices=torch.tensor([1, 2, 3]))
    loss.backward()
    assert torch.equal(m.image_head.weight.grad, torch.zeros_like(m.image_head.weight))
    assert m.tile_head.weight.grad.abs().max() > 0 and m.transformed_head.weight.grad.abs().max() > 0


def test_steps_are_finite_and_the_state_round_trips():
    m = _pirl()
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.5, weight_decay=0.0), m)
    for step in range(3):
        r = train_step(m, m, opt, None, [micro_batch(_views(step), indices=torch.tensor([step, step + 3, step + 6]))],
                       step=step, max_steps=4, precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu"))
        assert math.isfinite(r.loss)
    state = m.state_dict()
    assert {"image_head.weight", "tile_head.weight", "transformed_head.weight", "memory.draws",
            "memory.log_z"} <= set(state)
    fresh = _pirl()
    fresh.load_state_dict(state)
    fresh.memory.bank.rows.copy_(m.memory.bank.rows)  # per-rank state: the engine's rank files carry it
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    torch.manual_seed(3)
    a = m(_views(5), indices=torch.tensor([0, 1, 2]))[0]
    torch.manual_seed(3)
    assert torch.equal(fresh(_views(5), indices=torch.tensor([0, 1, 2]))[0], a)


def test_bad_views_and_settings_fail_clearly():
    with pytest.raises(ValueError, match="pirl takes exactly 2 views"):
        PIRL.check_views(PIRL.Config(), [224, 224, 224])
    with pytest.raises(ValueError, match="jigsaw tiles of 1 px"):
        PIRL.check_views(PIRL.Config(), [24, 3])
    PIRL.check_views(PIRL.Config(transform="rotation"), [24, 3])
    with pytest.raises(ValueError, match="lambda"):
        PIRL.Config(transformed_weight=1.5)
    with pytest.raises(ValueError, match="square"):
        _pirl()([torch.randn(2, 3, 8, 8), torch.randn(2, 3, 12, 9)], indices=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="batch size 3"):
        _pirl()(_views(0), indices=torch.tensor([0, 1]))
