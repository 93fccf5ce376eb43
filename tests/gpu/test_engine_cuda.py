"""The engine's CUDA paths on one GPU: NCCL bootstrap, FSDP2, activation checkpointing, fp16/bf16, SyncBN.

One GPU allows a world-1 NCCL group only (NCCL refuses two ranks on the same device), so
the collectives run but never reduce across ranks; the multi-rank arithmetic is covered
on gloo by tests/dist. fp32 comparisons run without TF32 and with deterministic cuDNN
(the ``exact_cuda`` fixture).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.utils._python_dispatch import TorchDispatchMode

from seerlike import models
from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.parallelize import ParallelConfig, apply_activation_checkpointing, parallelize
from seerlike.engine.precision import PrecisionConfig, autocast, grad_scaler
from seerlike.engine.syncbn import convert_sync_batchnorm
from tests.dist.test_fsdp_equivalence import FULL, TOL, _method
from tests.unit.test_parallelize import _step

pytestmark = pytest.mark.gpu

BN = nn.modules.batchnorm._BatchNorm


def _full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def test_init_distributed_makes_a_world_one_nccl_group(nccl):
    assert (nccl.backend, nccl.world_size, nccl.rank) == ("nccl", 1, 0)
    assert nccl.device == torch.device("cuda", torch.cuda.current_device())
    t = torch.arange(4.0, device=nccl.device)
    dist.all_reduce(t)
    parts = [torch.empty_like(t)]
    dist.all_gather(parts, t)
    assert t.tolist() == parts[0].tolist() == [0.0, 1.0, 2.0, 3.0]


def _train3(name: str, dtype: torch.dtype, pcfg: ParallelConfig, device: torch.device):
    torch.manual_seed(0)
    method = _method(name).to(dtype)
    model = parallelize(method, pcfg, device=device)
    if pcfg.strategy == "fsdp":
        assert all(hasattr(p, "to_local") and p.device.type == device.type for p in method.parameters())
    opt = build_optimizer(OptimConfig(name="larc" if name == "swav" else "sgd", lr=0.5, weight_decay=1e-4,
                                      momentum=0.9), method)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        views = [torch.randn(8, 3, 16, 16, generator=g).to(device, dtype) for _ in range(2)]
        loss, _ = model(views)
        loss.backward()
        method.on_after_backward(step)
        opt.step()
        opt.zero_grad()
        method.on_step_end(step, 3)
    return get_model_state_dict(model, options=FULL), get_optimizer_state_dict(model, opt, options=FULL)["state"]


@pytest.mark.parametrize("name,dtype,ac", [("swav", torch.float64, "none"), ("byol", torch.float64, "none"),
                                           ("swav", torch.float64, "block"), ("swav", torch.float32, "none")])
def test_fsdp2_on_cuda_trains_like_the_plain_module(nccl, exact_cuda, name, dtype, ac):
    plain, plain_opt = _train3(name, dtype, ParallelConfig(strategy="none"), nccl.device)
    fsdp, fsdp_opt = _train3(name, dtype, ParallelConfig(strategy="fsdp", ac=ac), nccl.device)
    assert fsdp.keys() == plain.keys() and fsdp_opt.keys() == plain_opt.keys()
    tol = TOL[dtype] if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.manual_seed(0)
    init = _method(name).to(dtype).state_dict()
    moved = 0
    for k, v in plain.items():
        v = v.cpu()
        torch.testing.assert_close(fsdp[k].cpu(), v, msg=k, **(TOL[torch.float32] if k == "queue" else tol))
        moved += int(v.dtype.is_floating_point and not torch.equal(v, init[k]))
    assert moved > len(plain) // 2
    for fqn, st in plain_opt.items():
        torch.testing.assert_close(fsdp_opt[fqn]["momentum_buffer"].cpu(), st["momentum_buffer"].cpu(), msg=fqn, **tol)


@pytest.mark.parametrize("ac", ["block", "stage"])
def test_activation_checkpointing_on_cuda_keeps_grads_and_bn_stats(exact_cuda, ac):
    torch.manual_seed(0)
    ref = models.build("resnet10_cifar").cuda()
    ckpt = copy.deepcopy(ref)
    apply_activation_checkpointing(ckpt, ParallelConfig(ac=ac))
    x = torch.randn(8, 3, 32, 32, device="cuda")
    a, b = _step(ref, x), _step(ckpt, x)
    assert a.keys() == b.keys()
    tracked = [k for k in a if k.endswith("num_batches_tracked")]
    assert tracked and all(int(b[k]) == 1 for k in tracked)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def _step_peak_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Peak CUDA bytes above what was allocated before the step (grads kept from a warm-up step)."""
    model(x).square().mean().backward()
    model.zero_grad(set_to_none=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model(x).square().mean().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_activation_checkpointing_cuts_peak_cuda_memory():
    torch.manual_seed(0)
    x = torch.randn(32, 3, 160, 160, device="cuda")
    peaks = {}
    for ac in ("none", "block"):
        model = models.build("resnet50")
        parallelize(model, ParallelConfig(strategy="none", ac=ac), device=torch.device("cuda"))
        peaks[ac] = _step_peak_bytes(model, x)
        del model
        torch.cuda.empty_cache()
    assert peaks["block"] < 0.5 * peaks["none"], peaks


@pytest.mark.parametrize("strategy", ["none", "fsdp"])
def test_fp16_overflow_skips_the_step_halves_the_scale_then_trains(nccl, strategy):
    dev = nccl.device
    torch.manual_seed(0)
    model = parallelize(models.build("resnet10_cifar"), ParallelConfig(strategy=strategy), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cfg = PrecisionConfig(dtype="fp16", init_scale=1024.0)
    scaler = grad_scaler(cfg, dev)
    x = torch.randn(16, 3, 32, 32, device=dev)
    changed, scales, losses = [], [], []
    for step in range(6):
        before = [_full(p) for p in model.parameters()]
        with autocast(cfg, dev):
            out = model(x)
            assert out.dtype == torch.float16
            loss = out.float().square().mean()
        scaler.scale(loss).backward()
        if step == 0:  # one element of one gradient overflows
            g = next(model.parameters()).grad
            (g.to_local() if hasattr(g, "to_local") else g).view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        changed.append(any(not torch.equal(a, _full(p)) for a, p in zip(before, model.parameters())))
        scales.append(scaler.get_scale())
        losses.append(loss.item())
    assert changed == [False] + [True] * 5
    assert scales == [512.0] * 6
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[1]
    assert all(torch.isfinite(_full(p)).all() for p in model.parameters())


class _OpDtypes(TorchDispatchMode):
    """The dtypes of the weight argument of every forward convolution and batch norm."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set] = {"conv": set(), "bn": set(), "bn_input": set()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "backward" not in name and len(args) > 1 and isinstance(args[1], torch.Tensor):
            if "convolution" in name:
                self.seen["conv"].add(args[1].dtype)
            elif "batch_norm" in name:
                self.seen["bn"].add(args[1].dtype)
                self.seen["bn_input"].add(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_bf16_autocast_runs_convs_in_bf16_and_keeps_batchnorm_fp32(nccl):
    dev = nccl.device
    torch.manual_seed(0)
    model = parallelize(models.build("resnet10_cifar"), ParallelConfig(strategy="none"), device=dev)
    bns = [m for m in model.modules() if isinstance(m, BN)]
    before = [bn.running_mean.clone() for bn in bns]
    with _OpDtypes() as ops, autocast(PrecisionConfig(dtype="bf16"), dev):
        loss = model(torch.randn(8, 3, 32, 32, device=dev)).float().square().mean()
    loss.backward()
    assert ops.seen["conv"] == {torch.bfloat16} and ops.seen["bn"] == {torch.float32}
    for bn, b in zip(bns, before):
        for t in (bn.weight, bn.bias, bn.weight.grad, bn.running_mean, bn.running_var):
            assert t.dtype == torch.float32
        assert not torch.equal(bn.running_mean, b)  # the statistics did update


def test_fsdp_bf16_params_gather_batchnorm_in_fp32(nccl):
    dev = nccl.device
    torch.manual_seed(0)
    model = models.build("resnet10_cifar")
    parallelize(model, ParallelConfig(strategy="fsdp", mixed_precision_params=True), compute_dtype=torch.bfloat16,
                device=dev)
    with _OpDtypes() as ops, autocast(PrecisionConfig(dtype="bf16"), dev):
        loss = model(torch.randn(8, 3, 32, 32, device=dev)).float().square().mean()
    loss.backward()
    assert ops.seen["conv"] == {torch.bfloat16}
    # BatchNorm is its own FSDP unit with an fp32 policy: fp32 weights and fp32 inputs
    assert ops.seen["bn"] == {torch.float32} and ops.seen["bn_input"] == {torch.float32}
    for p in model.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad.full_tensor()).all()


def test_sync_batchnorm_on_cuda_is_torch_syncbn(nccl, exact_cuda):
    torch.manual_seed(0)
    ref = models.build("resnet10_cifar").to(nccl.device)
    sync = convert_sync_batchnorm(copy.deepcopy(ref), dist.group.WORLD, cuda=True)
    norms = [m for m in sync.modules() if isinstance(m, BN)]
    assert norms and all(type(m) is nn.SyncBatchNorm for m in norms)
    assert list(sync.state_dict()) == list(ref.state_dict())
    x = torch.randn(8, 3, 32, 32, device=nccl.device)
    a, b = _step(ref, x), _step(sync, x)
    for k in a:  # world 1: the same statistics as BatchNorm
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
