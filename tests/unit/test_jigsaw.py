"""Jigsaw: puzzle labels on a synthetic image, the permutation buffer, the loss by hand (the state round
trip and train steps of every pretext method: tests/unit/test_method_registry.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from seerlike.methods import METHODS
from seerlike.methods.jigsaw import Jigsaw
from seerlike.methods.pretext_ops import maximal_hamming_permutations
from seerlike.recipes import jigsaw as recipes
from tests.unit.test_pretext_ops import _coords
from tests.unit.test_swav import TinyNet, _views

torch.set_num_threads(1)
SIZE = 24  # 3x3 cells of 8 px, 6 px tiles (gap 0.25), jitter +-1


def _jigsaw(seed: int = 0, **kw) -> Jigsaw:
    torch.manual_seed(seed)
    base = dict(num_permutations=10, tile_dims=(8,))
    return Jigsaw(Jigsaw.Config(**{**base, **kw}), TinyNet())


def test_registered_heads_and_permutation_buffer():
    assert METHODS["jigsaw"] is Jigsaw
    m = _jigsaw(hidden_dims=(12,))
    assert torch.equal(m.permutations, maximal_hamming_permutations(10, 9, 0))
    assert "permutations" in m.state_dict()
    assert [l.out_features for l in m.tile_head if isinstance(l, nn.Linear)] == [8]
    assert isinstance(m.tile_head[-1], nn.ReLU)  # BN and ReLU after the per-tile layer too (VISSL)
    assert [(l.in_features, l.out_features) for l in m.classifier if isinstance(l, nn.Linear)] == [(72, 12), (12, 10)]


def test_puzzle_labels_and_tiles_are_exact_on_a_synthetic_image():
    """Pixel (r, c) of the image holds (r, c): each shuffled tile says where it came from."""
    m = _jigsaw(tile_norm=False)
    x = _coords(6, SIZE)
    torch.manual_seed(3)
    tiles, index = m.puzzles(x)
    assert tiles.shape == (6, 9, 3, 6, 6)
    for b in range(6):
        perm = m.permutations[index[b]].tolist()
        for i in range(9):
            r0, c0 = int(tiles[b, i, 0, 0, 0]), int(tiles[b, i, 1, 0, 0])
            assert (r0 // 8) * 3 + c0 // 8 == perm[i]  # position i holds tile perm[i]
            assert 0 <= r0 % 8 <= 2 and 0 <= c0 % 8 <= 2  # inside its cell, 2 px of jitter room
            assert torch.equal(tiles[b, i], x[b, :, r0:r0 + 6, c0:c0 + 6])
    torch.manual_seed(3)
    again, index2 = m.puzzles(x)
    assert torch.equal(again, tiles) and torch.equal(index2, index)  # the global RNG decides: resumable


def test_tiles_are_normalised_each_on_its_own():
    m = _jigsaw()
    tiles, _ = m.puzzles(_coords(2, SIZE) * 3 + 1)
    torch.testing.assert_close(tiles.mean(dim=(-2, -1))[:, :, :2], torch.zeros(2, 9, 2), atol=1e-5, rtol=0)


def test_loss_is_the_cross_entropy_over_concatenated_tiles():
    m = _jigsaw()
    x = _views(0, n=1, sizes=[SIZE])[0]
    torch.manual_seed(1)
    loss, stats = m([x])
    torch.manual_seed(1)
    with torch.no_grad():
        tiles, index = m.puzzles(x)
        feats = m.tile_head(m.backbone(tiles.flatten(0, 1)))  # one batch: the same BN statistics
        rows = torch.stack([torch.cat([feats[b * 9 + i] for i in range(9)]) for b in range(x.shape[0])])
        logits = m.classifier(rows).tolist()
    total = sum(math.log(sum(math.exp(v) for v in row)) - row[int(index[b])] for b, row in enumerate(logits))
    assert loss.item() == pytest.approx(total / len(logits), abs=1e-5)
    hits = sum(max(range(10), key=lambda c: row[c]) == int(index[b]) for b, row in enumerate(logits))
    assert stats["acc"].item() == pytest.approx(hits / len(logits))


def test_a_different_permutation_set_is_refused_and_reset_makes_the_set_again():
    # the round trip itself: tests/unit/test_method_registry.py, with the train steps
    m = _jigsaw(seed=0)
    with pytest.raises(RuntimeError, match="permutations"):
        _jigsaw(num_permutations=12).load_state_dict(m.state_dict())
    fresh = _jigsaw(seed=1)
    fresh.permutations.zero_()
    fresh.reset_state()  # materialised from the meta device: the set is made again
    assert torch.equal(fresh.permutations, m.permutations)


def test_views_recipes_and_bad_config():
    Jigsaw.check_views(Jigsaw.Config(), [24, 24])  # tiny_swav's views still make 6 px tiles
    with pytest.raises(ValueError, match="tiles of 1 px"):
        Jigsaw.check_views(Jigsaw.Config(), [4])
    with pytest.raises(ValueError, match="num_permutations"):
        Jigsaw.Config(grid=2, num_permutations=30)
    with pytest.raises(ValueError, match="gap"):
        Jigsaw.Config(gap=1.0)
    with pytest.raises(ValueError, match="square"):
        _jigsaw()([torch.zeros(2, 3, 24, 18)])
    paper = recipes.jigsaw_resnet50()
    assert (paper.method.num_permutations, paper.data.augment.views[0].size, paper.data.batch_size * 8) == (2000, 255, 256)
    assert paper.data.augment.views[0].grayscale_p == 0.66 and not paper.method.tile_norm
    tiny = recipes.tiny_jigsaw()
    Jigsaw.check_views(tiny.method, [v.size for v in tiny.data.augment.expanded()])
    assert tiny.data.augment.views[0].size == 60 and (tiny.method.grid, tiny.method.num_permutations) == (2, 24)
    assert not tiny.method.tile_norm  # four tiles of a quarter of the image each: docs/benchmarks.md
