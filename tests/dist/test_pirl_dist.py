"""PIRL on 2 real gloo ranks == 1 process on the concatenated batch: losses, gradients of both
heads and the trunk at every step, the persistent state (Z from the transformed term, draws) and
the sharded bank updated with the image embeddings. The jigsaw's random tile places and orders
are fixed here (a per-sample transform: no cross-rank part), so both runs see the same puzzles.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seerlike.engine.optim import OptimConfig
from seerlike.methods.pirl import GRID, PIRL
from seerlike.methods.pretext_ops import extract_tiles, grid_origin, shuffle_tiles, tile_corners, tile_side
from tests.dist._equivalence import (BATCH, STRATEGIES, assert_equal_to_one_process, each_strategy, train,
                                     two_ranks_fixture)

pytestmark = pytest.mark.dist
torch.set_num_threads(1)

N, STEPS = 11, 3  # shares of 6 and 5 rows
INDICES = [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 0, 2, 1, 8, 3], [4, 4, 7, 9, 10, 6, 5, 2]]


class _Pooled(nn.Module):
    """No BatchNorm (per-rank statistics would differ from one process's): pool to 2x2, then a Linear."""

    out_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 6)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))


class _FixedPuzzles(PIRL):
    """Tiles centred in their cells, in reversed order: the same puzzle for a sample on any rank."""

    def jigsaw(self, x):
        cell, _ = grid_origin(x.shape[-1], GRID)
        tile = tile_side(cell, self.cfg.gap)
        corners = tile_corners(x.shape[0], x.shape[-1], GRID, tile, 0)
        order = torch.arange(GRID * GRID - 1, -1, -1).expand(x.shape[0], -1)
        return shuffle_tiles(extract_tiles(x, corners, tile), order, torch.arange(x.shape[0]))


def _views(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.randn(BATCH, 3, 4, 4, generator=g), torch.randn(BATCH, 3, 12, 12, generator=g)]


def _train(rank: int, world: int, strategy: str) -> dict:
    torch.manual_seed(0)
    cfg = PIRL.Config(embedding_dim=4, num_negatives=5, temperature=0.5, transformed_weight=0.3)
    m = _FixedPuzzles(cfg, _Pooled(), num_samples=N)
    run = train(m, strategy, _views, indices=lambda step: torch.tensor(INDICES[step]), rank=rank, world=world,
                steps=STEPS, optim=OptimConfig(name="sgd", lr=0.64, weight_decay=1e-4))
    return {**run, "bank": m.memory.bank.rows[:-1].clone()}


two_ranks = two_ranks_fixture(each_strategy, _train)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pirl_two_ranks_equal_one_process_bank_included(two_ranks, strategy):
    ref = _train(0, 1, "none")
    assert ref["losses"][-1] != ref["losses"][0] and bool(ref["state"]["memory.z_known"])
    ranks = [x[strategy] for x in two_ranks]
    heads = {"image_head.weight", "tile_head.weight", "transformed_head.weight"}
    assert all(set(g) >= heads for g in ref["grads"])  # (the ranks' sets equal it)
    assert_equal_to_one_process(ranks, ref)
    torch.testing.assert_close(torch.cat([r["bank"] for r in ranks]), ref["bank"], atol=1e-6, rtol=1e-5)
