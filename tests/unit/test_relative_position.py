"""Relative patch position: neighbour labels on a synthetic image, the loss by hand (the state round trip
and train steps of every pretext method: tests/unit/test_method_registry.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from seerlike.methods import METHODS
from seerlike.methods.relative_position import RelativePosition, patch_geometry
from seerlike.recipes import relative_position as recipes
from tests.unit.test_pretext_ops import _coords
from tests.unit.test_swav import TinyNet, _views

torch.set_num_threads(1)
SIZE = 30  # cells of 10 px, patches of round(10 / 1.5) = 7 px, jitter round(0.073 * 7) = 1 px
# (row, column) step from the centre cell to the neighbour of each label
OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _relpos(seed: int = 0, **kw) -> RelativePosition:
    torch.manual_seed(seed)
    base = dict(patch_dims=(8,), pair_dims=(12,))
    return RelativePosition(RelativePosition.Config(**{**base, **kw}), TinyNet())


def _where(patch: torch.Tensor, cell: int = 10) -> tuple[int, int, int, int]:
    """(cell row, cell column, row offset, column offset) of a patch of a coordinate image."""
    r0, c0 = int(patch[0, 0, 0]), int(patch[1, 0, 0])
    return r0 // cell, c0 // cell, r0 % cell, c0 % cell


def test_registered_heads_and_geometry():
    assert METHODS["relative_position"] is RelativePosition
    assert patch_geometry(432, 0.5, 0.073) == (96, 7)  # the paper's 96 px patches, 48 px apart, 7 px jitter
    assert patch_geometry(60, 0.5, 0.073, grid=2) == (20, 1)
    m = _relpos()
    assert [(l.in_features, l.out_features) for l in m.classifier if isinstance(l, nn.Linear)] == [(16, 12), (12, 8)]


def test_one_pair_per_image_labels_say_where_the_neighbour_is():
    m = _relpos(colour_drop=False)
    x = _coords(32, SIZE)
    torch.manual_seed(4)
    patches, pairs, labels = m.patches(x)
    assert patches.shape == (32, 2, 3, 7, 7) and labels.shape == (32, 1) and pairs.tolist() == [[0, 1]]
    assert set(labels.flatten().tolist()) == set(range(8))
    for b in range(32):
        cr, cc, orow, ocol = _where(patches[b, 0])
        assert (cr, cc) == (1, 1) and abs(orow - 1) <= 1 and abs(ocol - 1) <= 1  # centred (1 px) +- 1 px
        nr, nc, _, _ = _where(patches[b, 1])
        assert (nr - 1, nc - 1) == OFFSETS[int(labels[b])]
        r0, c0 = int(patches[b, 1, 0, 0, 0]), int(patches[b, 1, 1, 0, 0])
        assert torch.equal(patches[b, 1], x[b, :, r0:r0 + 7, c0:c0 + 7])


def test_all_pairs_give_the_centre_then_the_8_neighbours_in_label_order():
    m = _relpos(colour_drop=False, all_pairs=True)
    patches, pairs, labels = m.patches(_coords(3, SIZE))
    assert patches.shape == (3, 9, 3, 7, 7) and labels.tolist() == [list(range(8))] * 3
    assert pairs.tolist() == [[0, k] for k in range(1, 9)]
    for b in range(3):
        assert _where(patches[b, 0])[:2] == (1, 1)
        assert [(_where(patches[b, k + 1])[0] - 1, _where(patches[b, k + 1])[1] - 1) for k in range(8)] == OFFSETS


def test_colour_dropping_keeps_one_channel_of_each_patch():
    m = _relpos(all_pairs=True)
    x = _views(0, n=1, bs=2, sizes=[SIZE])[0]
    torch.manual_seed(0)
    dropped = m.patches(x)[0]
    m.cfg.colour_drop = False
    torch.manual_seed(0)
    clean = m.patches(x)[0]
    same = (dropped == clean).flatten(3).all(dim=3)  # (B, 9, 3): which channels were kept
    assert same.sum(dim=2).eq(1).all()


def test_grid2_one_pair_labels_the_step_between_two_quarter_cells():
    m = _relpos(colour_drop=False, grid=2)  # 15 px cells, patches of round(15 / 1.5) = 10 px, jitter 1 px
    x = _coords(400, SIZE)
    torch.manual_seed(5)
    patches, pairs, labels = m.patches(x)
    assert patches.shape == (400, 2, 3, 10, 10) and pairs.tolist() == [[0, 1]] and labels.shape == (400, 1)
    counts = torch.bincount(labels.flatten(), minlength=8)
    assert counts.min() >= 30  # directions drawn uniformly (50 expected each)
    firsts = set()
    for b in range(400):
        (r1, c1, o1r, o1c), (r2, c2, _, _) = _where(patches[b, 0], 15), _where(patches[b, 1], 15)
        assert {r1, c1, r2, c2} <= {0, 1} and abs(o1r - 2) <= 1 and abs(o1c - 2) <= 1  # centred (2 px) +- 1 px
        assert (r2 - r1, c2 - c1) == OFFSETS[int(labels[b, 0])]
        firsts.add((r1, c1))
    assert firsts == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_grid2_all_pairs_are_the_12_ordered_pairs_of_the_four_cells():
    m = _relpos(colour_drop=False, grid=2, all_pairs=True)
    patches, pairs, labels = m.patches(_coords(2, SIZE))
    assert patches.shape == (2, 4, 3, 10, 10) and pairs.shape == (12, 2) and labels.shape == (2, 12)
    assert sorted(map(tuple, pairs.tolist())) == [(a, b) for a in range(4) for b in range(4) if a != b]
    for b in range(2):
        cells = [_where(patches[b, k], 15)[:2] for k in range(4)]
        assert cells == [(0, 0), (0, 1), (1, 0), (1, 1)]
        for (i, j), label in zip(pairs.tolist(), labels[b].tolist()):
            assert (cells[j][0] - cells[i][0], cells[j][1] - cells[i][1]) == OFFSETS[label]
    # each horizontal and vertical step twice, each diagonal once
    assert torch.bincount(labels[0], minlength=8).tolist() == [1, 2, 1, 2, 2, 1, 2, 1]


@pytest.mark.parametrize("grid,all_pairs", [(3, False), (3, True), (2, False), (2, True)])
def test_loss_is_the_cross_entropy_over_the_pairs(grid, all_pairs):
    m = _relpos(all_pairs=all_pairs, grid=grid)
    x = _views(1, n=1, sizes=[SIZE])[0]
    torch.manual_seed(2)
    loss, stats = m([x])
    torch.manual_seed(2)
    with torch.no_grad():
        patches, pairs, labels = m.patches(x)
        p = patches.shape[1]
        feats = m.patch_head(m.backbone(patches.flatten(0, 1)))
        rows, targets = [], []
        for b in range(x.shape[0]):
            for k, (i, j) in enumerate(pairs.tolist()):
                rows.append(torch.cat([feats[b * p + i], feats[b * p + j]]))
                targets.append(int(labels[b, k]))
        logits = m.classifier(torch.stack(rows)).tolist()
    total = sum(math.log(sum(math.exp(v) for v in row)) - row[t] for row, t in zip(logits, targets))
    assert loss.item() == pytest.approx(total / len(targets), abs=1e-5)
    hits = sum(max(range(8), key=lambda c: row[c]) == t for row, t in zip(logits, targets))
    assert stats["acc"].item() == pytest.approx(hits / len(targets))


def test_views_recipes_and_bad_config():
    RelativePosition.check_views(RelativePosition.Config(), [24, 24])
    with pytest.raises(ValueError, match="patches of 1 px"):
        RelativePosition.check_views(RelativePosition.Config(), [5])
    with pytest.raises(ValueError, match="gap and jitter"):
        RelativePosition.Config(gap=-0.1)
    with pytest.raises(ValueError, match="grid must be 2 or 3"):
        RelativePosition.Config(grid=4)
    RelativePosition.check_views(RelativePosition.Config(grid=2), [6])  # 3 px cells, 2 px patches (3x3: 1 px)
    with pytest.raises(ValueError, match="method.grid=2"):
        RelativePosition.check_views(RelativePosition.Config(), [6])
    with pytest.raises(ValueError, match="square"):
        _relpos()([torch.zeros(2, 3, 30, 24)])
    paper = recipes.relative_position_resnet50()
    assert paper.data.augment.views[0].size == 432 and not paper.method.all_pairs and paper.method.colour_drop
    tiny = recipes.tiny_relative_position()
    assert patch_geometry(tiny.data.augment.views[0].size, tiny.method.gap, tiny.method.jitter) == (13, 1)
