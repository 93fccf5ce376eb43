"""Pretext transforms: rotations, tile grids, permutation sets, Lab colour, each against an answer known by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from seerlike.methods import pretext_ops as ops

torch.set_num_threads(1)


def _coords(bs: int, size: int) -> torch.Tensor:
    """Images whose pixel (r, c) holds r in channel 0, c in channel 1 and the image index in channel 2."""
    r = torch.arange(size, dtype=torch.float32).view(1, size, 1).expand(bs, size, size)
    c = torch.arange(size, dtype=torch.float32).view(1, 1, size).expand(bs, size, size)
    i = torch.arange(bs, dtype=torch.float32).view(bs, 1, 1).expand(bs, size, size)
    return torch.stack([r, c, i], dim=1).contiguous()


# ---------------------------------------------------------------- rotations


def test_rotation_is_counterclockwise_and_per_image():
    x = torch.arange(4.0).view(1, 1, 2, 2).repeat(3, 1, 1, 1)  # [[0, 1], [2, 3]]
    out = ops.rotate(x, torch.tensor([0, 1, 3]))
    assert out[0, 0].tolist() == [[0, 1], [2, 3]]
    assert out[1, 0].tolist() == [[1, 3], [0, 2]]  # a quarter turn counterclockwise: the top-right comes to the top-left
    assert out[2, 0].tolist() == [[2, 0], [3, 1]]
    images, labels = ops.all_rotations(x[:2])
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert images[4, 0].tolist() == [[3, 2], [1, 0]]


def test_same_size_runs_group_consecutive_views():
    views = [torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8), torch.zeros(2, 3, 6, 6), torch.zeros(2, 3, 8, 8)]
    runs = ops.same_size_runs(views)
    assert [tuple(r.shape) for r in runs] == [(4, 3, 8, 8), (2, 3, 6, 6), (2, 3, 8, 8)]
    assert runs[0][2:].eq(1).all()


# ---------------------------------------------------------------- tile grids


def test_tiles_are_the_pixels_at_their_corners_inside_their_cells():
    size, grid, tile, jitter = 32, 3, 8, 1  # cells of 10 px, lattice offset 1 (32 = 3 x 10 + 2)
    x = _coords(5, size)
    torch.manual_seed(0)
    corners = ops.tile_corners(5, size, grid, tile, jitter)
    tiles = ops.extract_tiles(x, corners, tile)
    assert tiles.shape == (5, 9, 3, tile, tile)
    seen = set()
    for b in range(5):
        for t in range(9):
            r, c = corners[b, t].tolist()
            # the tile is exactly the slice at its corner, and that corner is its cell's centre +- jitter
            assert torch.equal(tiles[b, t], x[b, :, r:r + tile, c:c + tile])
            cell_r, cell_c = 1 + 10 * (t // 3), 1 + 10 * (t % 3)
            assert cell_r <= r and r + tile <= cell_r + 10 and cell_c <= c and c + tile <= cell_c + 10
            assert abs(r - (cell_r + 1)) <= jitter and abs(c - (cell_c + 1)) <= jitter
            seen.add((r - cell_r, c - cell_c))
    assert seen == {(i, j) for i in range(3) for j in range(3)}  # every jitter value occurs


def test_tile_geometry_and_bad_sizes():
    assert ops.grid_origin(255, 3) == (85, 0) and ops.tile_side(85, 0.25) == 64  # VISSL's 64 px tiles
    assert ops.grid_origin(32, 3) == (10, 1)
    with pytest.raises(ValueError, match="does not fit"):
        ops.tile_corners(1, 30, 3, 8, 2)  # (10 - 8) // 2 = 1 < 2


def test_shuffle_puts_tile_perm_i_at_position_i():
    tiles = torch.arange(2 * 4).view(2, 4, 1).float()
    perms = torch.tensor([[0, 1, 2, 3], [3, 1, 0, 2]])
    out = ops.shuffle_tiles(tiles, perms, torch.tensor([1, 0]))
    assert out[0, :, 0].tolist() == [3, 1, 0, 2] and out[1, :, 0].tolist() == [4, 5, 6, 7]


def test_tile_normalisation_and_colour_dropping():
    g = torch.Generator().manual_seed(0)
    tiles = torch.randn(2, 9, 3, 6, 6, generator=g) * 5 + 3
    n = ops.normalise_tiles(tiles)
    torch.testing.assert_close(n.mean(dim=(-2, -1)), torch.zeros(2, 9, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(n.std(dim=(-2, -1), unbiased=False), torch.ones(2, 9, 3), atol=1e-4, rtol=0)
    patches = torch.randn(64, 3, 5, 5, generator=g)
    out = ops.drop_colour_channels(patches, generator=torch.Generator().manual_seed(1))
    kept = torch.randint(3, (64,), generator=torch.Generator().manual_seed(1))
    for i, k in enumerate(kept.tolist()):
        assert torch.equal(out[i, k], patches[i, k])
        for c in {0, 1, 2} - {k}:  # faint noise: 1/100 of the kept channel's spread
            assert 0 < out[i, c].std() < 0.05 * patches[i, k].std()


# ---------------------------------------------------------------- permutation sets


def _greedy_reference(n: int, k: int, first: int) -> list[tuple[int, ...]]:
    """Noroozi & Favaro's Algorithm 1 as published: delete the chosen row, take the argmax of the mean distance."""
    remaining = ops.all_permutations(k).numpy().astype(np.int64)  # itertools' order, checked below
    chosen = [remaining[first]]
    remaining = np.delete(remaining, first, axis=0)
    for _ in range(n - 1):
        mean = np.mean([(remaining != p).sum(axis=1) for p in chosen], axis=0)
        j = int(np.argmax(mean))
        chosen.append(remaining[j])
        remaining = np.delete(remaining, j, axis=0)
    return [tuple(int(v) for v in p) for p in chosen]


def _min_distance(perms) -> int:
    return min(sum(a != b for a, b in zip(p, q)) for p, q in itertools.combinations(perms, 2))


@pytest.mark.parametrize("n,k", [(8, 4), (24, 4), (6, 9)])
def test_maximal_hamming_set_is_the_greedy_algorithms(n, k):
    first = int(torch.randint(len(list(itertools.permutations(range(k)))), (),
                              generator=torch.Generator().manual_seed(3)))
    ref = _greedy_reference(n, k, first)
    got = [tuple(p) for p in ops.maximal_hamming_permutations(n, k, seed=3).tolist()]
    assert got == ref
    assert len(set(got)) == n and all(sorted(p) == list(range(k)) for p in got)
    assert _min_distance(got) == _min_distance(ref)
    if k == 9:
        assert _min_distance(got) >= 6  # a few far-apart permutations of 9 differ almost everywhere


def test_all_permutations_are_in_itertools_order():
    assert ops.all_permutations(4).tolist() == [list(p) for p in itertools.permutations(range(4))]
    nine = ops.all_permutations(9)
    assert nine.shape == (362880, 9) and nine[0].tolist() == list(range(9)) and nine[-1].tolist() == list(range(8, -1, -1))
    assert nine[1000].tolist() == list(next(itertools.islice(itertools.permutations(range(9)), 1000, None)))


def test_permutation_sets_are_deterministic_and_seeded():
    a = ops.maximal_hamming_permutations(12, 9, seed=0)
    assert torch.equal(a, ops.maximal_hamming_permutations(12, 9, seed=0))
    assert not torch.equal(a, ops.maximal_hamming_permutations(12, 9, seed=1))
    assert torch.equal(a[:5], ops.maximal_hamming_permutations(5, 9, seed=0))  # greedy: prefixes agree
    with pytest.raises(ValueError, match="num_permutations"):
        ops.maximal_hamming_permutations(25, 4)


# ---------------------------------------------------------------- colour


@pytest.mark.parametrize("rgb,lab", [
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((0.5, 0.5, 0.5), (53.389, 0.0, 0.0)),
    ((1.0, 0.0, 0.0), (53.241, 80.092, 67.203)),  # sRGB primaries, D65 (Lindbloom's calculator)
    ((0.0, 1.0, 0.0), (87.735, -86.183, 83.179)),
    ((0.0, 0.0, 1.0), (32.297, 79.188, -107.860)),
])
def test_srgb_to_lab_known_values(rgb, lab):
    got = ops.srgb_to_lab(torch.tensor(rgb).view(1, 3, 1, 1))[0, :, 0, 0]
    torch.testing.assert_close(got, torch.tensor(lab), atol=0.02, rtol=0)


def test_lab_is_fp32_under_autocast_and_lightness_is_centred():
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lab = ops.srgb_to_lab(x)
    assert lab.dtype == torch.float32
    torch.testing.assert_close(lab, ops.srgb_to_lab(x))
    light = ops.lightness_input(lab)
    assert light.shape == (2, 1, 4, 4) and torch.equal(light, (lab[:, :1] - 50) / 100)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normed = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(ops.unnormalise(normed, mean, std), x)
