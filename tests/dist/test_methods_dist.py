"""Methods and LARC on 2 real gloo ranks == 1 process on the concatenated batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seerlike.engine.optim import LRSchedule, OptimConfig, build_optimizer, squared_norms
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods.byol import BYOL
from seerlike.methods.swav import SwAV, sinkhorn
from seerlike.testing import micro_batch, run_on_ranks
from tests.dist._equivalence import Linear

pytestmark = pytest.mark.dist
torch.set_num_threads(1)

SHAPES = [(8, 5), (6, 16), (32, 3)]  # (global batch, prototypes)


def _everything(rank: int, world: int) -> dict:
    # one spawn for all checks: starting ranks and importing FSDP costs far more than the checks
    return {"sinkhorn": _sinkhorn_ranks(rank, world), "swav": _train_swav(rank, world),
            "byol": _byol_ranks(rank, world), "adaptive": _train_adaptive(rank, world)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_on_ranks(_everything, 2)


def _scores(b: int, k: int, seed: int) -> torch.Tensor:
    s = F.normalize(torch.randn(b, k, generator=torch.Generator().manual_seed(seed)), dim=1)
    s[b // 2:] += 3.0  # rank 1's rows have a much larger max: a per-rank shift would be wrong
    return s


# ------------------------------------------------------------------ Sinkhorn


def _sinkhorn_ranks(rank, world):
    out = []
    for i, (b, k) in enumerate(SHAPES):
        mine = _scores(b, k, i).chunk(world)[rank]
        out.append(sinkhorn(mine, 0.05, 3))
        # with a queue: this rank's share of the queue's scores in front of its batch
        queue = _scores(2 * b, k, 100 + i)
        out.append(sinkhorn(torch.cat([queue.tensor_split(world)[rank], mine]), 0.05, 3)[-(b // world):])
    return out


def test_distributed_sinkhorn_equals_single_process(two_ranks):
    ranks = [r["sinkhorn"] for r in two_ranks]
    for i, (b, k) in enumerate(SHAPES):
        full = _scores(b, k, i)
        got = torch.cat([r[2 * i] for r in ranks])
        torch.testing.assert_close(got, sinkhorn(full, 0.05, 3), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.sum(1), torch.ones(b), atol=1e-5, rtol=0)  # each sample sums to 1
        with_queue = sinkhorn(torch.cat([_scores(2 * b, k, 100 + i), full]), 0.05, 3)[-b:]
        torch.testing.assert_close(torch.cat([r[2 * i + 1] for r in ranks]), with_queue, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ SwAV under FSDP2


SWAV_STEPS, SWAV_BATCH = 5, 4  # global batch 4: 2 per rank


def _swav_views(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.randn(SWAV_BATCH, 3, 2, 2, generator=g) for _ in range(3)]


def _train_swav(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    cfg = SwAV.Config(head_dims=(), num_prototypes=7, num_crops=3, crops_for_assign=(0, 1), queue_length=8,
                      queue_start_step=1, freeze_prototypes_steps=2, sinkhorn_iters=3)
    m = SwAV(cfg, Linear())  # BN-free: per-rank batches give exactly the global-batch gradients
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        fully_shard(m, mesh=init_device_mesh("cpu", (world,)))
    opt = build_optimizer(OptimConfig(name="larc", lr=256.0, weight_decay=1e-4), m)  # LARC: big LR per 256
    sched = LRSchedule(OptimConfig(lr=256.0, warmup_steps=1), SWAV_BATCH, SWAV_STEPS)
    def protos():
        w = m.prototypes.weight
        return (w.full_tensor() if hasattr(w, "full_tensor") else w).detach().clone()

    losses, used, history = [], [], [protos()]
    for step in range(SWAV_STEPS):
        views = [v.chunk(world)[rank] for v in _swav_views(step)]
        sched.apply(opt, step)
        result = train_step(m, m, opt, None, [micro_batch(views)], step=step, max_steps=SWAV_STEPS,
                            precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu"))
        losses.append(result.loss)
        used.append(result.stats["queue_used"])
        history.append(protos())
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in m.state_dict().items()}
    return {"losses": losses, "used": used, "state": full, "prototypes": history}


def test_swav_fsdp2_two_ranks_equals_one_process_with_queue(two_ranks):
    """5 steps, LARC, queue (length 8) filled from step 1 and used from step 3, prototypes frozen for 2 steps."""
    ranks = [r["swav"] for r in two_ranks]
    ref = _train_swav(0, 1)
    assert ref["used"] == [0.0, 0.0, 0.0, 1.0, 1.0] == ranks[0]["used"]
    for r in ranks:
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
        assert set(r["state"]) == set(ref["state"])
        for k, v in ref["state"].items():
            torch.testing.assert_close(r["state"][k], v, atol=1e-5, rtol=1e-5, msg=k)
    assert int(ref["state"]["queue_filled"]) == 8
    for r in (ref, *ranks):  # frozen for steps 0 and 1, moving after
        h = r["prototypes"]
        torch.testing.assert_close(h[2], h[0], atol=1e-7, rtol=0)
        assert (h[5] - h[2]).abs().max() > 1e-4


# ------------------------------------------------------------------ BYOL EMA


class _Small(nn.Module):
    out_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.fc(x.flatten(1))).relu()


def _byol_ranks(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = {}
    for mode in ("allreduce", "fsdp2"):
        torch.manual_seed(0)
        m = BYOL(BYOL.Config(projector_dims=(16, 4), predictor_dims=(8, 4), tau_base=0.9), _Small())
        if mode == "fsdp2":
            mesh = init_device_mesh("cpu", (world,))
            for sub in (m.backbone, m.projector, m.predictor, m.target.backbone, m.target.projector):
                fully_shard(sub, mesh=mesh)
            fully_shard(m, mesh=mesh)
        opt = build_optimizer(OptimConfig(name="sgd", lr=25.6, weight_decay=0.0), m)

        def full(ps):
            return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in ps]

        expected = full(m.target.parameters())
        for step in range(3):
            g = torch.Generator().manual_seed(10 * step + rank)  # different data per rank
            loss, _ = m([torch.randn(4, 3, 2, 2, generator=g) for _ in range(2)])
            opt.zero_grad()
            loss.backward()
            if mode == "allreduce":
                for p in m.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            opt.step()
            m.on_step_end(step, 3)
            tau = 1 - (1 - 0.9) * (math.cos(math.pi * step / 3) + 1) / 2
            online = full([*m.backbone.parameters(), *m.projector.parameters()])
            expected = [tau * e + (1 - tau) * o for e, o in zip(expected, online)]
            assert all(p.grad is None for p in m.target.parameters())
        out[mode] = {"target": full(m.target.parameters()), "expected": expected}
    return out


def test_byol_target_is_the_ema_and_identical_on_both_ranks(two_ranks):
    """Plain all-reduced grads and FSDP2-sharded online + target nets, 3 steps each."""
    r0, r1 = [r["byol"] for r in two_ranks]
    for mode in ("allreduce", "fsdp2"):
        for a, b, e in zip(r0[mode]["target"], r1[mode]["target"], r0[mode]["expected"]):
            assert torch.equal(a, b), mode
            torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-6, msg=mode)
        for e0, e1 in zip(r0[mode]["expected"], r1[mode]["expected"]):
            assert torch.equal(e0, e1)


# ------------------------------------------------------------------ LARC / LARS under FSDP2


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))  # 3 rows: an uneven 2 + 1 shard


def _train_adaptive(rank: int, world: int) -> dict:
    out = {}
    for name in ("larc", "larc_clip", "lars"):
        net = _mlp()
        checks = {}
        if world > 1:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh("cpu", (world,))
            fully_shard(net[0], mesh=mesh)
            fully_shard(net[2], mesh=mesh)
            fully_shard(net, mesh=mesh)
            w = net[2].weight
            vn = torch.linalg.vector_norm(w)  # a DTensor with a Partial placement: it still needs a reduction
            checks = {"vector_norm_partial": any(p.is_partial() for p in vn.placements),
                      "ours": squared_norms([w]).sqrt(), "full": w.full_tensor().norm()}
        cfg = OptimConfig(name=name.removesuffix("_clip"), larc_clip=name.endswith("_clip"), lr=8.0,
                          weight_decay=1e-3, warmup_steps=1)
        opt = build_optimizer(cfg, net)
        sched = LRSchedule(cfg, global_batch=8, max_steps=4)
        for step in range(4):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
            loss = F.mse_loss(net(x.chunk(world)[rank]), y.chunk(world)[rank])
            opt.zero_grad()
            loss.backward()
            sched.apply(opt, step)
            opt.step()
        params = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in net.parameters()]
        out[name] = {"params": params, **checks}
    return out


def test_larc_and_lars_fsdp2_two_ranks_equal_one_process(two_ranks):
    """LARC (scale and clip modes) and LARS: 4 steps on a global batch of 8 (4 per rank); tolerance 1e-6 abs / 1e-5 rel."""
    ranks = [r["adaptive"] for r in two_ranks]
    ref = _train_adaptive(0, 1)
    for name in ("larc", "larc_clip", "lars"):
        init = list(_mlp().parameters())
        assert max((a - b).abs().max().item() for a, b in zip(ref[name]["params"], init)) > 1e-4
        for r in ranks:
            for a, b in zip(r[name]["params"], ref[name]["params"]):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
            assert r[name]["vector_norm_partial"]
            torch.testing.assert_close(r[name]["ours"].squeeze(), r[name]["full"])
