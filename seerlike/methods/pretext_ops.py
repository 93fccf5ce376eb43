"""Pretext transforms on batches of views: rotations, tile grids, permutation sets, Lab colour.

The pretext-task methods (rotnet, jigsaw, relative_position, colorization; PIRL reuses the
rotation and jigsaw ops) receive augmented views as float tensors ``(B, C, H, W)`` and build
their inputs and labels here with batched tensor ops on the views' device, never per image
in Python.

Randomness comes from the global torch RNG of the views' device (``torch.randint(...,
device=x.device)``) unless a ``generator`` is given. The engine saves and restores every
rank's CPU and CUDA RNG state with each checkpoint, so a resumed run draws the same rotations,
tile jitter and permutations as the uninterrupted one.

Tiles are square and laid on a ``grid x grid`` lattice of square cells, row-major (cell ``t``
is row ``t // grid``, column ``t % grid``), centred on the image (the pixels that do not fill
a whole cell are split evenly round the lattice, as in :func:`grid_origin`).
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch
from torch import Tensor

# ---------------------------------------------------------------- views


def same_size_runs(views: list[Tensor]) -> list[Tensor]:
    """Consecutive views of one size concatenated along the batch (one tensor per run).

    Pretext tasks treat every view as an independent image; a run is one batch of them, so
    the trunk runs once per run (as :func:`seerlike.methods.common.forward_views` does).
    """
    runs, start = [], 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[1:] == views[start].shape[1:]:
            end += 1
        runs.append(torch.cat(views[start:end]) if end - start > 1 else views[start])
        start = end
    return runs


def _randint(high: int, shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.randint(high, shape, device=device)
    return torch.randint(high, shape, generator=generator, device=generator.device).to(device)


# ---------------------------------------------------------------- rotations


def rotate(x: Tensor, k: Tensor) -> Tensor:
    """Image ``x[i]`` turned ``k[i]`` quarter turns counterclockwise (``k`` in 0..3), as
    ``torch.rot90(x[i], k[i], (-2, -1))`` and PIL's ``rotate(90 * k)``; square images only."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotations need square images, got {tuple(x.shape[-2:])}")
    out = x
    sel = k.view(-1, *([1] * (x.ndim - 1)))
    for quarter in (1, 2, 3):  # a select per rotation: no data-dependent indexing, no device sync
        out = torch.where(sel == quarter, torch.rot90(x, quarter, (-2, -1)), out)
    return out


def all_rotations(x: Tensor) -> tuple[Tensor, Tensor]:
    """The batch in its four rotations (0, 90, 180, 270 degrees counterclockwise), rotation-major:
    images ``(4B, C, H, W)`` and labels ``(4B,)`` = ``[0] * B + [1] * B + [2] * B + [3] * B``."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotations need square images, got {tuple(x.shape[-2:])}")
    images = torch.cat([x] + [torch.rot90(x, k, (-2, -1)) for k in (1, 2, 3)])
    labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
    return images, labels


# ---------------------------------------------------------------- tile grids


def grid_origin(size: int, grid: int) -> tuple[int, int]:
    """(cell side, offset of the lattice) for a ``grid x grid`` lattice centred on a ``size`` image."""
    cell = size // grid
    return cell, (size - grid * cell) // 2


def tile_side(cell: int, gap: float) -> int:
    """The side of a tile that leaves the fraction ``gap`` of its cell uncovered (rounded)."""
    return int(round(cell * (1.0 - gap)))


def tile_corners(n: int, size: int, grid: int, tile: int, jitter: int, *, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> Tensor:
    """Top-left corners ``(n, grid * grid, 2)`` as (row, column) of one tile per cell, per image.

    Each tile sits at its cell's centre (rounded down) displaced by a uniform integer in
    ``[-jitter, jitter]`` on each axis, drawn independently per image, tile and axis; with
    ``jitter = (cell - tile) // 2`` a tile may sit anywhere in its cell (Noroozi & Favaro;
    VISSL's ``ImgPatchesFromTensor``: a 64 px tile at offsets 0..20 of an 85 px cell).
    """
    cell, origin = grid_origin(size, grid)
    centred = (cell - tile) // 2
    if tile < 1 or jitter < 0 or jitter > centred:
        raise ValueError(f"a {tile} px tile with jitter {jitter} does not fit a {cell} px cell "
                         f"({grid}x{grid} grid on {size} px); need 1 <= tile and jitter <= (cell - tile) // 2")
    cells = torch.arange(grid * grid, device=device)
    base = torch.stack([cells // grid, cells % grid], dim=-1) * cell + origin + centred  # (T, 2)
    shift = _randint(2 * jitter + 1, (n, grid * grid, 2), torch.device(device), generator) - jitter
    return base + shift


def extract_tiles(x: Tensor, corners: Tensor, tile: int) -> Tensor:
    """The tiles ``(B, T, C, tile, tile)`` of images ``x`` ``(B, C, H, W)`` at ``corners`` ``(B, T, 2)``."""
    b, t, _ = corners.shape
    steps = torch.arange(tile, device=x.device)
    rows = (corners[..., 0, None] + steps).view(b, t, tile, 1)
    cols = (corners[..., 1, None] + steps).view(b, t, 1, tile)
    batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    # advanced indices around the channel slice: the indexed dims come first, channels last
    return x[batch, :, rows, cols].permute(0, 1, 4, 2, 3)


def normalise_tiles(tiles: Tensor, eps: float = 1e-5) -> Tensor:
    """Each tile and channel to zero mean and unit variance (Noroozi & Favaro's official loader
    normalises every tile on its own, so no tile can be placed by its brightness or contrast)."""
    mean = tiles.mean(dim=(-2, -1), keepdim=True)
    std = tiles.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (tiles - mean) / (std + eps)


def drop_colour_channels(patches: Tensor, noise: float = 0.01, *, generator: torch.Generator | None = None) -> Tensor:
    """Doersch et al.'s colour dropping: per patch keep one random channel and replace the
    others by Gaussian noise of ``noise`` times that channel's standard deviation over the patch
    (so chromatic aberration cannot reveal where a patch was in the image). ``patches (N, C, h, w)``."""
    n, c = patches.shape[:2]
    keep = _randint(c, (n,), patches.device, generator)
    kept = patches[torch.arange(n, device=patches.device), keep]  # (N, h, w)
    std = kept.flatten(1).std(dim=1, unbiased=False).view(n, 1, 1, 1)
    if generator is None:
        z = torch.randn(patches.shape, device=patches.device, dtype=patches.dtype)
    else:
        z = torch.randn(patches.shape, generator=generator, device=generator.device, dtype=patches.dtype)
        z = z.to(patches.device)
    mask = torch.nn.functional.one_hot(keep, c).to(patches.dtype).view(n, c, 1, 1)
    return patches * mask + noise * std * z * (1 - mask)


NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)
"""The 8 cells round the centre of a 3x3 grid, row-major; relative-position label ``k`` is ``NEIGHBOURS[k]``
(0: top-left, 1: top, 2: top-right, 3: left, 4: right, 5: bottom-left, 6: bottom, 7: bottom-right)."""
CENTRE = 4


# ---------------------------------------------------------------- permutation sets


@functools.lru_cache(maxsize=2)
def _all_permutations(k: int) -> Tensor:
    flat = np.fromiter(itertools.chain.from_iterable(itertools.permutations(range(k))), dtype=np.int8,
                       count=k * math.factorial(k))
    return torch.from_numpy(flat.reshape(-1, k))


def all_permutations(k: int) -> Tensor:
    """Every permutation of ``range(k)`` in lexicographic order (``itertools.permutations``): ``(k!, k)`` int8."""
    if not 1 <= k <= 9:
        raise ValueError(f"permutation sets are built for 1..9 tiles, got {k}")
    return _all_permutations(k)


def hamming(perms: Tensor, p: Tensor) -> Tensor:
    """Hamming distance (positions that differ) of every row of ``perms`` to ``p``, as int32."""
    return (perms != p).sum(dim=1, dtype=torch.int32)


@functools.lru_cache(maxsize=8)
def _maximal_hamming(n: int, k: int, seed: int) -> Tensor:
    pool = all_permutations(k)
    by_position = pool.t().contiguous()  # (k, k!): the comparisons run along contiguous memory
    first = int(torch.randint(len(pool), (), generator=torch.Generator().manual_seed(seed)))
    total = torch.zeros(len(pool), dtype=torch.int32)  # summed distance of every candidate to the chosen set
    chosen = []
    j = first
    for _ in range(n):
        chosen.append(j)
        total += (by_position != pool[j][:, None]).sum(dim=0, dtype=torch.int32)
        total[j] = -(2**30)  # taken: never the maximum again
        j = int(total.argmax())  # the first maximum: ties go to the lexicographically first
    return pool[chosen].long()


def maximal_hamming_permutations(n: int, k: int = 9, seed: int = 0) -> Tensor:
    """``n`` permutations of ``k`` tiles ``(n, k)`` by Noroozi & Favaro's greedy algorithm
    (their Algorithm 1, "maximal" variant): start from one permutation drawn with ``seed``,
    then repeatedly add the unused permutation with the largest AVERAGE Hamming distance to
    those already chosen, ties going to the first in lexicographic order. Deterministic; the
    set for 2000 of 9 tiles takes a few seconds (cached per process).
    """
    if not 1 <= n <= math.factorial(k):
        raise ValueError(f"need 1 <= num_permutations <= {k}! = {math.factorial(k)}, got {n}")
    return _maximal_hamming(n, k, seed).clone()


def shuffle_tiles(tiles: Tensor, perms: Tensor, index: Tensor) -> Tensor:
    """Tiles ``(B, T, ...)`` reordered by permutation ``perms[index[b]]`` per image: position ``i``
    of image ``b`` holds its tile ``perms[index[b], i]`` (VISSL's ``ShuffleImgPatches``)."""
    order = perms[index]  # (B, T)
    return tiles[torch.arange(tiles.shape[0], device=tiles.device)[:, None], order]


# ---------------------------------------------------------------- colour


D65_WHITE = (0.95047, 1.0, 1.08883)
"""Reference white of sRGB (D65, 2 degree observer) in XYZ, Y = 1."""
SRGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
               (0.2126729, 0.7151522, 0.0721750),
               (0.0193339, 0.1191920, 0.9503041))
"""Linear sRGB -> CIE XYZ (IEC 61966-2-1, D65)."""


def srgb_to_lab(rgb: Tensor) -> Tensor:
    """CIE L*a*b* (D65) of sRGB values in [0, 1] along dim -3: ``(..., 3, H, W)`` -> L in [0, 100], a, b.

    The standard definitions: the sRGB transfer function undone (linear below 0.04045), the
    IEC matrix to XYZ, divided by the D65 white, then L = 116 f(Y) - 16, a = 500 (f(X) - f(Y)),
    b = 200 (f(Y) - f(Z)) with f(t) = t^(1/3) above (6/29)^3 and linear below. In fp32 even
    under autocast; inputs are clamped to [0, 1].
    """
    with torch.autocast(rgb.device.type, enabled=False):
        c = rgb.float().clamp(0.0, 1.0)
        lin = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        m = torch.tensor(SRGB_TO_XYZ, device=c.device) / torch.tensor(D65_WHITE, device=c.device)[:, None]
        xyz = torch.einsum("ij,...jhw->...ihw", m, lin)
        d = 6.0 / 29.0
        f = torch.where(xyz > d**3, xyz.clamp_min(d**3) ** (1.0 / 3.0), xyz / (3 * d * d) + 4.0 / 29.0)
        fx, fy, fz = f.unbind(dim=-3)
        return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)


def lightness_input(lab: Tensor) -> Tensor:
    """What a 1-channel (lightness) trunk sees: ``(L - 50) / 100`` in [-0.5, 0.5], ``(..., 1, H, W)``
    (Zhang et al.'s centring and scale, ``l_cent = 50, l_norm = 100`` in their released models)."""
    return (lab[..., :1, :, :] - 50.0) / 100.0


def unnormalise(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Views normalised by the data pipeline (``(x - mean) / std``) back to RGB in [0, 1]."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(-1, 1, 1)
    return x.float() * s + m
