"""Barlow Twins on 2 real gloo ranks == 1 process on the concatenated batch, gradients included."""

from __future__ import annotations

import pytest
import torch

from seerlike.methods import batch_stats
from seerlike.methods.barlow_twins import BarlowTwins, barlow_twins_loss
from seerlike.testing import run_on_ranks
from tests.dist import _global_batch as gb

pytestmark = pytest.mark.dist
torch.set_num_threads(1)

LAMBD = 0.3
SPLITS = {"even": [4], "uneven": [3]}  # row indices where rank 1's share of the 8 samples starts


def _embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(8, 5, generator=g) * torch.linspace(0.5, 3, 5) + 2.0
    return z1, 0.7 * z1 + 0.5 * torch.randn(8, 5, generator=g)


def _loss_and_grads(z1: torch.Tensor, z2: torch.Tensor, plain_all_reduce: bool = False) -> dict:
    """The loss of (this rank's rows of) z1, z2 and its gradient with respect to them."""
    z1, z2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    if plain_all_reduce:  # the official code: C summed by a non-autograd all_reduce
        n, count = batch_stats.standardize(torch.stack([z1, z2]), 1e-5)
        local = n[0].T @ n[1] / count
        total = local.detach().clone()
        torch.distributed.all_reduce(total)
        c = local + (total - local.detach())  # the global value, the gradient of this rank's share only
        on, off = (c.diagonal() - 1).square().sum(), batch_stats.off_diagonal(c).square().sum()
    else:
        on, off, c = barlow_twins_loss(z1, z2, LAMBD)
    (on + LAMBD * off).backward()
    return {"on": on.detach(), "off": off.detach(), "c": c.detach(), "g1": z1.grad, "g2": z2.grad}


def _statistics(rank: int, world: int) -> dict:
    z1, z2 = _embeddings()
    out = {name: _loss_and_grads(z1.tensor_split(at)[rank], z2.tensor_split(at)[rank]) for name, at in SPLITS.items()}
    out["plain"] = _loss_and_grads(z1.chunk(world)[rank], z2.chunk(world)[rank], plain_all_reduce=True)
    return out


def _make(backbone):
    return BarlowTwins(BarlowTwins.Config(projector_dims=(16, 5), lambd=LAMBD, scale_loss=0.5), backbone)


def _everything(rank: int, world: int) -> dict:
    # one spawn for all checks: starting ranks costs far more than the checks
    return {"stats": _statistics(rank, world), **{s: gb.train(_make, rank, world, s) for s in gb.STRATEGIES}}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_on_ranks(_everything, 2)


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_loss_and_input_gradients_equal_the_global_batch(two_ranks, split):
    """Every rank has the global loss; its gradient is world x its rows' global gradient (averaging -> exact)."""
    ref = _loss_and_grads(*_embeddings())
    ranks = [r["stats"][split] for r in two_ranks]
    for r in ranks:
        for key in ("on", "off", "c"):
            torch.testing.assert_close(r[key], ref[key], atol=1e-5, rtol=1e-5, msg=key)
    for key in ("g1", "g2"):
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]) / 2, ref[key], atol=1e-6, rtol=1e-5, msg=key)
    assert ref["g1"].abs().max() > 1e-2


def test_a_plain_all_reduce_leaves_each_rank_one_world_th_of_the_gradient(two_ranks):
    """What the official code's non-autograd all_reduce gives (the reason for the recipe's scale_loss / 16)."""
    ref = _loss_and_grads(*_embeddings())
    ranks = [r["stats"]["plain"] for r in two_ranks]
    torch.testing.assert_close(ranks[0]["on"], ref["on"], atol=1e-5, rtol=1e-5)
    for key in ("g1", "g2"):  # after gradient averaging: (sum / 2) = ref / 2
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]) / 2, ref[key] / 2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("strategy", gb.STRATEGIES)
def test_training_on_two_ranks_equals_one_process(two_ranks, strategy):
    """SyncBN projector + DDP or FSDP2: loss, parameter gradients, 3 SGD steps' losses and final state."""
    gb.assert_like_one_process([r[strategy] for r in two_ranks], gb.train(_make, 0, 1, strategy))
