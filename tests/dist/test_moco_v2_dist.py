"""MoCo v2 on 2 real gloo ranks: the queue, losses, gradients and state equal 1 process on the
concatenated batch; shuffled BN computes each key with the statistics of a shuffled slice of
the global batch and puts the keys back in order.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seerlike.engine.optim import OptimConfig
from seerlike.methods.moco_v2 import MoCoV2, shuffle_permutation, shuffled_slice, unshuffle
from tests.dist._equivalence import BATCH, Linear, assert_equal_to_one_process, train, two_ranks_fixture, views

pytestmark = pytest.mark.dist
torch.set_num_threads(1)

STEPS = 4
# (strategy, symmetric, queue length): 8 or 16 keys a step, so the ring wraps around within 4 steps
CASES = [("ddp", False, 12), ("fsdp", False, 12), ("ddp", True, 20)]


def _train(rank: int, world: int, strategy: str, symmetric: bool, queue: int) -> dict:
    torch.manual_seed(0)
    cfg = MoCoV2.Config(head_dims=(16, 8), queue_length=queue, momentum=0.5, temperature=0.5, symmetric=symmetric)
    m = MoCoV2(cfg, Linear())  # no BN anywhere: shuffling the keys' batch must change nothing
    return train(m, strategy, views, rank=rank, world=world, steps=STEPS,
                 optim=OptimConfig(name="sgd", lr=0.64, weight_decay=1e-4))


class _LinearBN(nn.Module):
    out_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.fc(x.flatten(1)))


def _bn_model() -> MoCoV2:
    torch.manual_seed(0)
    return MoCoV2(MoCoV2.Config(head_dims=(16, 8), queue_length=16), _LinearBN())


def _images() -> torch.Tensor:
    return torch.randn(BATCH, 3, 2, 2, generator=torch.Generator().manual_seed(7))


def _shuffle_bn(rank: int, world: int) -> dict:
    m = _bn_model()
    x = _images().chunk(world)[rank]
    k_local, k_all = m._keys(x)  # the first key batch: permutation seed 0
    perm = shuffle_permutation(BATCH, 0)
    with torch.no_grad():
        own = F.normalize(m.key_encoder(x), dim=1)  # keys with the statistics of this rank's own batch
    return {"k_local": k_local, "k_all": k_all, "own": own, "key_batches": int(m.key_batches),
            "round_trip": unshuffle(shuffled_slice(x, perm, world, rank), perm)}


def _everything(rank: int, world: int) -> dict:
    return {"train": [_train(rank, world, *case) for case in CASES], "shuffle": _shuffle_bn(rank, world)}


two_ranks = two_ranks_fixture(_everything)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{s}-{'sym' if y else 'asym'}" for s, y, _ in CASES])
def test_moco_v2_two_ranks_equal_one_process_queue_included(two_ranks, case):
    _, symmetric, length = CASES[case]
    ref = _train(0, 1, "none", symmetric, length)
    keys_per_step = BATCH * (2 if symmetric else 1)
    assert int(ref["state"]["queue_ptr"]) == STEPS * keys_per_step % length
    assert int(ref["state"]["key_batches"]) == STEPS * (2 if symmetric else 1)
    assert torch.allclose(ref["state"]["queue"].norm(dim=1), torch.ones(length))
    assert not any(k.startswith("key_encoder.") for g in ref["grads"] for k in g)  # (the ranks' sets equal it)
    # the state: queue, its position, the key encoder, the parameters
    assert_equal_to_one_process([x["train"][case] for x in two_ranks], ref)


def test_keys_get_the_bn_statistics_of_a_shuffled_slice_of_the_global_batch(two_ranks):
    ranks = [r["shuffle"] for r in two_ranks]
    m, x = _bn_model(), _images()
    perm = shuffle_permutation(BATCH, 0)
    slices = perm.view(2, -1)
    with torch.no_grad():  # each rank's key batch, normalised by BN over that slice alone, then unshuffled
        expected = torch.cat([F.normalize(m.key_encoder(x[s]), dim=1) for s in slices])[torch.argsort(perm)]
    for rank, r in enumerate(ranks):
        own = set(range(rank * BATCH // 2, (rank + 1) * BATCH // 2))
        assert set(slices[rank].tolist()) != own  # the key batch a rank normalises is not its query batch
        torch.testing.assert_close(r["k_all"], expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["k_local"], expected.chunk(2)[rank], atol=1e-6, rtol=1e-5)
        assert (r["k_local"] - r["own"]).abs().max() > 1e-2  # the rank's own statistics would give other keys
        assert torch.equal(r["round_trip"], x)  # shuffle then unshuffle is the identity, bit for bit
        assert r["key_batches"] == 1
