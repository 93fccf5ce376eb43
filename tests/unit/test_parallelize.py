"""Activation checkpointing keeps BatchNorm statistics right; SyncBN equals BN on the whole batch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from seerlike import models
from seerlike.engine.parallelize import ParallelConfig, apply_activation_checkpointing
from seerlike.engine.syncbn import SyncBatchNorm, convert_sync_batchnorm
from seerlike.testing import run_on_ranks


def _step(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model(x).square().mean().backward()
    out = {f"grad.{n}": p.grad.clone() for n, p in model.named_parameters()}
    out.update({f"buf.{n}": b.clone() for n, b in model.named_buffers()})
    return out


@pytest.mark.parametrize("ac,segments", [("block", []), ("stage", []), ("segments", [[1], [], [1], [1]])])
def test_checkpointing_updates_bn_stats_once_and_keeps_grads(ac, segments):
    torch.manual_seed(0)
    ref = models.build("resnet10_cifar")
    ckpt = copy.deepcopy(ref)
    apply_activation_checkpointing(ckpt, ParallelConfig(ac=ac, ac_segments=segments))
    x = torch.randn(4, 3, 16, 16)
    a, b = _step(ref, x), _step(ckpt, x)
    assert a.keys() == b.keys()
    n_tracked = [k for k in a if k.endswith("num_batches_tracked")]
    assert n_tracked and all(int(b[k]) == 1 for k in n_tracked)  # not 2: the recompute left them alone
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    # the stats inside checkpointed blocks did move (once) away from their init
    inner = [k for k in a if k.startswith("buf.layer") and k.endswith("running_mean")]
    assert inner and all(a[k].abs().sum() > 0 for k in inner)
    assert list(ckpt.state_dict()) == list(ref.state_dict())  # names unchanged


def test_checkpointing_with_plain_bn_would_double_count():
    """Guard for the test above: without the fix, a recompute does update stats a second time."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False).sum().backward()
    assert int(m[1].num_batches_tracked) == 2


def _syncbn_vs_bn(rank: int, world: int):
    torch.manual_seed(0)
    full_x = torch.randn(8, 6, 5, 5, dtype=torch.float64)
    g = torch.randn(8, 6, 5, 5, dtype=torch.float64)
    bn = nn.BatchNorm2d(6).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    sync = convert_sync_batchnorm(copy.deepcopy(bn), group=dist.group.WORLD)
    assert isinstance(sync, SyncBatchNorm)
    # reference: plain BN on the concatenated batch
    xr = full_x.clone().requires_grad_()
    (bn(xr) * g).sum().backward()
    # synchronised BN on this rank's half
    xs = full_x.chunk(world)[rank].clone().requires_grad_()
    ys = sync(xs)
    (ys * g.chunk(world)[rank]).sum().backward()
    grads = [sync.weight.grad.clone(), sync.bias.grad.clone()]
    for t in grads:
        dist.all_reduce(t)  # data parallelism sums (then averages) parameter grads
    return {
        "y": ys.detach(), "y_ref": _bn_forward_ref(bn, full_x).chunk(world)[rank],
        "dx": xs.grad, "dx_ref": xr.grad.chunk(world)[rank],
        "dw": grads[0], "dw_ref": bn.weight.grad, "db": grads[1], "db_ref": bn.bias.grad,
        "rm": sync.running_mean, "rm_ref": bn.running_mean, "rv": sync.running_var, "rv_ref": bn.running_var,
    }


def _bn_forward_ref(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    return ((x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)).detach()


@pytest.mark.dist
def test_syncbn_equals_bn_on_the_concatenated_batch():
    for out in run_on_ranks(_syncbn_vs_bn, 2):
        for k in ("y", "dx", "dw", "db", "rm", "rv"):
            torch.testing.assert_close(out[k], out[f"{k}_ref"], rtol=1e-10, atol=1e-12, msg=k)


def test_syncbn_single_process_is_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(5)
    sync = convert_sync_batchnorm(copy.deepcopy(bn))
    x = torch.randn(7, 5)
    torch.testing.assert_close(sync(x), bn(x))
    torch.testing.assert_close(sync.running_var, bn.running_var)
