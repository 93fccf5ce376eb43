"""VICReg on 2 real gloo ranks == 1 process on the concatenated batch, gradients included."""

from __future__ import annotations

import pytest
import torch

from seerlike.methods.common import gather_with_grad
from seerlike.methods.vicreg import VICReg, vicreg_terms
from seerlike.testing import run_on_ranks
from tests.dist import _global_batch as gb

pytestmark = pytest.mark.dist
torch.set_num_threads(1)


def _embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g) * torch.linspace(0.3, 2, 5)  # the variance hinge active for some features
    return x, 0.7 * x + 0.5 * torch.randn(8, 5, generator=g)


def _terms_and_grads(x: torch.Tensor, y: torch.Tensor) -> dict:
    """The terms over the gathered rows and the gradient of 2 inv + 3 var + 0.5 cov with respect to this rank's rows."""
    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    both = gather_with_grad(torch.stack([x, y], dim=1))
    inv, var, cov = vicreg_terms(both[:, 0], both[:, 1])
    (2 * inv + 3 * var + 0.5 * cov).backward()
    return {"terms": torch.stack([inv, var, cov]).detach(), "gx": x.grad, "gy": y.grad}


def _make(backbone):
    return VICReg(VICReg.Config(projector_dims=(16, 5), invariance_weight=2.0, variance_weight=3.0,
                                covariance_weight=0.5), backbone)


def _everything(rank: int, world: int) -> dict:
    # one spawn for all checks: starting ranks costs far more than the checks
    x, y = _embeddings()
    stats = _terms_and_grads(x.chunk(world)[rank], y.chunk(world)[rank])
    return {"stats": stats, **{s: gb.train(_make, rank, world, s) for s in gb.STRATEGIES}}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_on_ranks(_everything, 2)


def test_terms_and_input_gradients_equal_the_global_batch(two_ranks):
    """Every rank has the global terms; its gradient is world x its rows' global gradient (averaging -> exact)."""
    ref = _terms_and_grads(*_embeddings())
    ranks = [r["stats"] for r in two_ranks]
    assert 0 < ref["terms"][1] < 1  # the hinge is active: the variance gradient is exercised
    for r in ranks:
        torch.testing.assert_close(r["terms"], ref["terms"], atol=1e-6, rtol=1e-5)
    for key in ("gx", "gy"):
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]) / 2, ref[key], atol=1e-6, rtol=1e-5, msg=key)
    assert ref["gx"].abs().max() > 1e-2


@pytest.mark.parametrize("strategy", gb.STRATEGIES)
def test_training_on_two_ranks_equals_one_process(two_ranks, strategy):
    """SyncBN projector + DDP or FSDP2: loss, parameter gradients, 3 SGD steps' losses and final state."""
    gb.assert_like_one_process([r[strategy] for r in two_ranks], gb.train(_make, 0, 1, strategy))
