"""NPID on 2 real gloo ranks == 1 process on the concatenated batch: the losses (so the rows each
rank looked up: its batch's and the shared negatives'), the gradients at every step, the
persistent state (draws, Z) and the sharded bank, whose two shards put together equal the
1-process bank, a sample that both ranks hold in one step included (the later one wins).
"""

from __future__ import annotations

import pytest
import torch

from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig, parallelize
from seerlike.methods.memory_bank import initial_rows
from seerlike.methods.npid import NPID
from tests.dist._equivalence import (STRATEGIES, Linear, assert_equal_to_one_process, each_strategy, train_steps,
                                     two_ranks_fixture, views)

pytestmark = pytest.mark.dist
torch.set_num_threads(1)

N, STEPS = 13, 4  # 13 samples: shares of 7 and 6 rows
# the global batch's indices per step; step 2 holds sample 3 on both ranks (positions 1 and 6)
INDICES = [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 0, 1, 2], [5, 3, 9, 12, 7, 11, 3, 6], [4, 10, 2, 8, 1, 9, 0, 12]]


def _train(rank: int, world: int, strategy: str) -> dict:
    torch.manual_seed(0)
    cfg = NPID.Config(embedding_dim=4, num_negatives=5, temperature=0.5, bank_momentum=0.5)
    m = NPID(cfg, Linear(), num_samples=N)
    model = parallelize(m, ParallelConfig(strategy=strategy))
    share = m.memory.bank.rows[:-1].clone()  # after DDP's broadcast of rank 0's buffers at wrapping
    run = train_steps(m, model, lambda step: views(step)[:1], indices=lambda step: torch.tensor(INDICES[step]),
                      rank=rank, world=world, steps=STEPS, optim=OptimConfig(name="sgd", lr=0.64, weight_decay=1e-4))
    bank = m.memory.bank
    return {**run, "initial_share": share, "range": (bank.lo, bank.hi), "bank": bank.rows[:-1].clone()}


two_ranks = two_ranks_fixture(each_strategy, _train)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_npid_two_ranks_equal_one_process_bank_included(two_ranks, strategy):
    ref = _train(0, 1, "none")
    assert ref["losses"][-1] != ref["losses"][0] and int(ref["state"]["memory.draws"]) == STEPS
    ranks = [x[strategy] for x in two_ranks]
    assert [r["range"] for r in ranks] == [(0, 7), (7, 13)]
    for r in ranks:  # each rank kept its own initial rows through the wrapping
        lo, hi = r["range"]
        assert torch.equal(r["initial_share"], initial_rows(lo, hi, 4, normalize=False))
    assert_equal_to_one_process(ranks, ref)  # the state: parameters, draws, seed, log Z
    bank = torch.cat([r["bank"] for r in ranks])
    assert (bank != initial_rows(0, N, 4, normalize=False)).any(dim=1).all()  # every row was updated
    torch.testing.assert_close(bank, ref["bank"], atol=1e-6, rtol=1e-5)
