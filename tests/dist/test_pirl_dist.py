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

from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.parallelize import ParallelConfig, parallelize
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods.pirl import GRID, PIRL
from seerlike.methods.pretext_ops import extract_tiles, grid_origin, shuffle_tiles, tile_corners, tile_side
from seerlike.testing import micro_batch, run_on_ranks
from tests.dist.test_simclr_dist import BATCH, _full

pytestmark = pytest.mark.dist
torch.set_num_threads(1)

N, STEPS = 11, 3  # shares of 6 and 5 rows
STRATEGIES = ("ddp", "fsdp")
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
    model = parallelize(m, ParallelConfig(strategy=strategy))
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.64, weight_decay=1e-4), m)
    grads, losses = [], []
    m.on_after_backward = lambda step: (grads.append({n: _full(p.grad) for n, p in m.named_parameters()}),
                                        PIRL.on_after_backward(m, step))
    for step in range(STEPS):
        views = [v.chunk(world)[rank] for v in _views(step)]
        idx = torch.tensor(INDICES[step]).chunk(world)[rank]
        losses.append(train_step(model, m, opt, None, [micro_batch(views, indices=idx)], step=step, max_steps=STEPS,
                                 precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu")).loss)
    return {"losses": losses, "grads": grads, "state": {k: _full(v) for k, v in m.state_dict().items()},
            "bank": m.memory.bank.rows[:-1].clone()}


def _everything(rank: int, world: int) -> dict:
    return {s: _train(rank, world, s) for s in STRATEGIES}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_on_ranks(_everything, 2)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pirl_two_ranks_equal_one_process_bank_included(two_ranks, strategy):
    ref = _train(0, 1, "none")
    assert ref["losses"][-1] != ref["losses"][0] and bool(ref["state"]["memory.z_known"])
    ranks = [x[strategy] for x in two_ranks]
    for r in ranks:
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
        for got, want in zip(r["grads"], ref["grads"], strict=True):
            assert set(got) == set(want) >= {"image_head.weight", "tile_head.weight", "transformed_head.weight"}
            for k, v in want.items():
                assert v.abs().max() > 0, k
                torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-5, msg=k)
        for k, v in ref["state"].items():
            torch.testing.assert_close(r["state"][k], v, atol=1e-5, rtol=1e-5, msg=k)
    torch.testing.assert_close(torch.cat([r["bank"] for r in ranks]), ref["bank"], atol=1e-6, rtol=1e-5)
