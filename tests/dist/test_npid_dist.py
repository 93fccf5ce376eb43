"""NPID on 2 real gloo ranks == 1 process on the concatenated batch: the losses (so the rows each
rank looked up: its batch's and the shared negatives'), the gradients at every step, the
persistent state (draws, Z) and the sharded bank, whose two shards put together equal the
1-process bank, a sample that both ranks hold in one step included (the later one wins).
"""

from __future__ import annotations

import pytest
import torch

from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.parallelize import ParallelConfig, parallelize
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods.memory_bank import initial_rows
from seerlike.methods.npid import NPID
from seerlike.testing import micro_batch, run_on_ranks
from tests.dist.test_simclr_dist import BATCH, _full, _Linear, _views

pytestmark = pytest.mark.dist
torch.set_num_threads(1)

N, STEPS = 13, 4  # 13 samples: shares of 7 and 6 rows
STRATEGIES = ("ddp", "fsdp")
# the global batch's indices per step; step 2 holds sample 3 on both ranks (positions 1 and 6)
INDICES = [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 0, 1, 2], [5, 3, 9, 12, 7, 11, 3, 6], [4, 10, 2, 8, 1, 9, 0, 12]]


def _train(rank: int, world: int, strategy: str) -> dict:
    torch.manual_seed(0)
    cfg = NPID.Config(embedding_dim=4, num_negatives=5, temperature=0.5, bank_momentum=0.5)
    m = NPID(cfg, _Linear(), num_samples=N)
    model = parallelize(m, ParallelConfig(strategy=strategy))
    share = m.memory.bank.rows[:-1].clone()  # after DDP's broadcast of rank 0's buffers at wrapping
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.64, weight_decay=1e-4), m)
    grads, losses = [], []
    m.on_after_backward = lambda step: (grads.append({n: _full(p.grad) for n, p in m.named_parameters()}),
                                        NPID.on_after_backward(m, step))
    for step in range(STEPS):
        views = [_views(step)[0].chunk(world)[rank]]
        idx = torch.tensor(INDICES[step]).chunk(world)[rank]
        losses.append(train_step(model, m, opt, None, [micro_batch(views, indices=idx)], step=step, max_steps=STEPS,
                                 precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu")).loss)
    bank = m.memory.bank
    return {"losses": losses, "grads": grads, "state": {k: _full(v) for k, v in m.state_dict().items()},
            "initial_share": share, "range": (bank.lo, bank.hi), "bank": bank.rows[:-1].clone()}


def _everything(rank: int, world: int) -> dict:
    return {s: _train(rank, world, s) for s in STRATEGIES}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_on_ranks(_everything, 2)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_npid_two_ranks_equal_one_process_bank_included(two_ranks, strategy):
    ref = _train(0, 1, "none")
    assert ref["losses"][-1] != ref["losses"][0] and int(ref["state"]["memory.draws"]) == STEPS
    ranks = [x[strategy] for x in two_ranks]
    assert [r["range"] for r in ranks] == [(0, 7), (7, 13)]
    for r in ranks:  # each rank kept its own initial rows through the wrapping
        lo, hi = r["range"]
        assert torch.equal(r["initial_share"], initial_rows(lo, hi, 4, normalize=False))
    for r in ranks:
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
        for got, want in zip(r["grads"], ref["grads"], strict=True):
            assert set(got) == set(want)
            for k, v in want.items():
                assert v.abs().max() > 0, k
                torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-5, msg=k)
        assert set(r["state"]) == set(ref["state"])
        for k, v in ref["state"].items():  # parameters, draws, seed, log Z
            torch.testing.assert_close(r["state"][k], v, atol=1e-5, rtol=1e-5, msg=k)
    bank = torch.cat([r["bank"] for r in ranks])
    assert (bank != initial_rows(0, N, 4, normalize=False)).any(dim=1).all()  # every row was updated
    torch.testing.assert_close(bank, ref["bank"], atol=1e-6, rtol=1e-5)
