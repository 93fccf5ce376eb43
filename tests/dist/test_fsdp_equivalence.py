"""FSDP2 on 2 ranks trains exactly like 1 rank on the same global batch (SwAV with LARC, BYOL with SGD).

SyncBN makes the 2-rank BatchNorm statistics those of the whole global batch, and the
methods' collectives (Sinkhorn, queue) span the ranks, so the only differences left are
float summation order. The runs are in float64 because BYOL amplifies fp32 rounding
(~3e-4 relative on the stem after 3 steps at LR 0.5, while float64 differs by 1e-14).
SwAV's queue holds float32 embeddings, which feeds fp32 rounding (~1e-7) into its float64
run once the queue is used. Tolerance: rtol 1e-6, atol 1e-7 on every parameter, buffer
and momentum buffer (the queue itself: rtol 1e-5, atol 1e-6).
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from seerlike import models
from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.parallelize import ParallelConfig, parallelize
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods.byol import BYOL
from seerlike.methods.swav import SwAV
from seerlike.testing import micro_batch, run_on_ranks

pytestmark = pytest.mark.dist

GLOBAL_BATCH, STEPS = 8, 3
# SwAV pushes float32 embeddings into its queue whatever the model's dtype
TOL = {torch.float64: dict(rtol=1e-6, atol=1e-7), torch.float32: dict(rtol=1e-5, atol=1e-6),
       torch.int64: dict(rtol=0, atol=0)}
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _method(name: str):
    backbone = models.build("resnet10_cifar")
    if name == "swav":
        return SwAV(SwAV.Config(head_dims=(64, 32), num_prototypes=20, num_crops=2, queue_length=16,
                                freeze_prototypes_steps=1), backbone)
    return BYOL(BYOL.Config(projector_dims=(64, 32), predictor_dims=(64, 32), tau_base=0.9), backbone)


def _train(rank: int, world: int, name: str, dtype: torch.dtype = torch.float32) -> dict:
    torch.manual_seed(0)
    method = _method(name).to(dtype)
    model = parallelize(method, ParallelConfig(strategy="fsdp", sync_bn=True))
    optim = OptimConfig(name="larc" if name == "swav" else "sgd", lr=0.5, weight_decay=1e-4, momentum=0.9)
    opt = build_optimizer(optim, method)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        views = [torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g).to(dtype) for _ in range(2)]
        train_step(model, method, opt, None, [micro_batch([v.chunk(world)[rank] for v in views])], step=step,
                   max_steps=STEPS, precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu"))
    return {"model": get_model_state_dict(model, options=FULL),
            "optim": get_optimizer_state_dict(model, opt, options=FULL).get("state")}


@pytest.mark.parametrize("name", ["swav", "byol"])
def test_fsdp_two_ranks_equals_one_rank(name):
    two = run_on_ranks(_train, 2, name, torch.float64)[0]
    one = run_on_ranks(_train, 1, name, torch.float64)[0]
    assert two["model"].keys() == one["model"].keys()
    moved = 0
    torch.manual_seed(0)
    init = _method(name).double().state_dict()
    for k, v in one["model"].items():
        tol = TOL[torch.float32] if k == "queue" else TOL[v.dtype]
        torch.testing.assert_close(two["model"][k], v, msg=k, **tol)
        moved += int(v.dtype.is_floating_point and not torch.equal(v, init[k]))
    assert moved > len(one["model"]) // 2  # training really changed the weights
    assert two["optim"].keys() == one["optim"].keys()
    for fqn, st in one["optim"].items():
        torch.testing.assert_close(two["optim"][fqn]["momentum_buffer"], st["momentum_buffer"],
                                   msg=fqn, **TOL[torch.float64])
