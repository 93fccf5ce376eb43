"""DeepCluster-v2 and SeLa on 2 real gloo ranks == 1 process on the concatenated batch: losses,
gradients at every step, the distributed k-means / Sinkhorn labels, the memory's union, the state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig, parallelize
from seerlike.methods.deepcluster_v2 import DeepClusterV2, initial_centroids, spherical_kmeans
from seerlike.methods.pass_memory import all_gather_rows
from seerlike.methods.sela import SeLa
from seerlike.testing import run_on_ranks
from tests.dist._equivalence import Linear, train_steps

pytestmark = pytest.mark.dist
torch.set_num_threads(1)

N, GLOBAL, STEPS = 16, 8, 7  # a pass is 2 calls: clusterings / labellings before steps 2, 4 and 6

CASES = {
    "deepcluster_v2/ddp": (DeepClusterV2, dict(head_dims=(4,), num_prototypes=(3, 2), kmeans_iters=4), "ddp"),
    "deepcluster_v2/fsdp": (DeepClusterV2, dict(head_dims=(4,), num_prototypes=(3, 2), kmeans_iters=4), "fsdp"),
    "sela/ddp": (SeLa, dict(head_dims=(4,), num_prototypes=(3, 2), sinkhorn_iters=30, epsilon=0.1), "ddp"),
    "sela/fsdp": (SeLa, dict(head_dims=(4,), num_prototypes=(3, 2), normalize=True, temperature=0.1, epsilon=0.05,
                             sinkhorn_iters=30), "fsdp"),
}


def _batch(step: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The global batch of a step: a fresh permutation of the samples every pass."""
    epoch, pos = divmod(step, N // GLOBAL)
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(epoch))[pos * GLOBAL:(pos + 1) * GLOBAL]
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(GLOBAL, 3, 2, 2, generator=g) for _ in range(2)], idx


def _train(rank: int, world: int, case: str) -> dict:
    cls, kw, strategy = CASES[case]
    torch.manual_seed(0)
    m = cls(cls.Config(crops_for_assign=(0, 1), **kw), Linear(), num_samples=N)
    if world > 1 and strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        fully_shard(m, mesh=init_device_mesh("cpu", (world,)))
        model = m
    else:
        model = parallelize(m, ParallelConfig(strategy="ddp"))
    run = train_steps(m, model, lambda step: _batch(step)[0], indices=lambda step: _batch(step)[1], rank=rank,
                      world=world, steps=STEPS, optim=OptimConfig(name="sgd", lr=0.5, weight_decay=0.0))
    mem = m.memory
    return {**run, "memory": {int(i): mem.emb[:, r].clone() for r, i in enumerate(mem.index.tolist()) if i >= 0}}


def _kmeans_uneven(rank: int, world: int) -> dict:
    """k-means alone, the 16 rows split 10 / 6 over the ranks."""
    g = torch.Generator().manual_seed(5)
    x = F.normalize(torch.randn(N, 4, generator=g), dim=1)
    index = torch.randperm(N, generator=g)
    part = slice(0, N) if world == 1 else [slice(0, 10), slice(10, N)][rank]
    mine, stamp = index[part], torch.arange(N)[part]
    start = initial_centroids(mine, stamp, x[part], k=3, num_samples=N, seed=2)
    centroids, local = spherical_kmeans(x[part], start, iters=5)
    pad = torch.full((N,), -1)  # equal shapes for the gather
    pad_idx, pad_lab = pad.clone(), pad.clone()
    pad_idx[:mine.numel()], pad_lab[:mine.numel()] = mine, local
    every_index, every_label = all_gather_rows(pad_idx, pad_lab)
    labels = torch.full((N,), -1)
    labels[every_index[every_index >= 0]] = every_label[every_index >= 0]
    return {"start": start, "centroids": centroids, "labels": labels}


def _everything(rank: int, world: int) -> dict:
    # one spawn for all checks: starting ranks costs far more than these tiny trainings
    return {"kmeans": _kmeans_uneven(rank, world), **{case: _train(rank, world, case) for case in CASES}}


@pytest.fixture(scope="module")
def runs() -> tuple[dict, list[dict]]:
    return _everything(0, 1), run_on_ranks(_everything, 2)


def test_distributed_kmeans_on_uneven_shares_equals_one_process(runs):
    one, two = runs
    for r in two:
        torch.testing.assert_close(r["kmeans"]["start"], one["kmeans"]["start"], atol=0, rtol=0)
        torch.testing.assert_close(r["kmeans"]["centroids"], one["kmeans"]["centroids"], atol=1e-6, rtol=1e-6)
        assert torch.equal(r["kmeans"]["labels"], one["kmeans"]["labels"])
    assert len(set(one["kmeans"]["labels"].tolist())) == 3


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_train_like_one_process(runs, case):
    one, two = runs
    ref = one[case]
    assert len(ref["grads"]) == STEPS
    for r in (x[case] for x in two):
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
        for step, (got, want) in enumerate(zip(r["grads"], ref["grads"])):
            assert got.keys() == want.keys(), step
            for name in want:
                torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=f"step {step} {name}")
        assert r["state"].keys() == ref["state"].keys()
        for k, v in ref["state"].items():
            if v.dtype == torch.long:  # assignments, labels, counters: exactly
                assert torch.equal(r["state"][k], v), k
            else:
                torch.testing.assert_close(r["state"][k], v, atol=1e-5, rtol=1e-5, msg=k)
    # the ranks' memories together hold what the one process's does: the last pass (here the
    # second half of pass 3 and the first of pass 4, 13 distinct samples)
    union = {**two[0][case]["memory"], **two[1][case]["memory"]}
    assert set(union) == set(ref["memory"]) and len(union) == 13
    for i, emb in ref["memory"].items():
        torch.testing.assert_close(union[i], emb, atol=1e-5, rtol=1e-5)
    counter = "clusterings" if case.startswith("deepcluster") else "labellings"
    assert int(ref["state"][counter]) == 3
    assert ref["losses"][0] > 0 or case.startswith("deepcluster")
