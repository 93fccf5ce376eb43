"""fp16 loss scaling under FSDP2: an overflow on one rank's gradient shard skips the step on every rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

from seerlike.engine.precision import PrecisionConfig, autocast, grad_scaler
from seerlike.testing import run_on_ranks

pytestmark = pytest.mark.dist


def _fp16_step(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = PrecisionConfig(dtype="fp16", init_scale=1024.0)
    scaler = grad_scaler(cfg, torch.device("cpu"))
    full = lambda: [p.full_tensor().clone() for p in model.parameters()]  # noqa: E731
    out = {}
    for step, poison in enumerate((True, False)):
        before = full()
        with autocast(cfg, torch.device("cpu")):
            loss = model(torch.randn(4, 8)).float().square().mean()
        scaler.scale(loss).backward()
        if poison and rank == 1:  # only rank 1's shard of one gradient overflows
            model[0].weight.grad.to_local()[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        out[f"changed{step}"] = any(not torch.equal(a, b) for a, b in zip(before, full()))
        out[f"scale{step}"] = scaler.get_scale()
    return out


def test_fp16_overflow_on_one_rank_skips_the_step_on_all():
    for rank, out in enumerate(run_on_ranks(_fp16_step, 2)):
        assert not out["changed0"], f"rank {rank} stepped despite rank 1's overflow"
        assert out["scale0"] == 512.0  # backed off once, on both ranks
        assert out["changed1"] and out["scale1"] == 512.0
