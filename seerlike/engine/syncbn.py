"""Synchronised BatchNorm over a process group that works on gloo (CPU) as well as NCCL.

``nn.SyncBatchNorm`` needs CUDA; this one computes the batch statistics of the whole
group with two small collectives (one all-gather of per-rank mean/var/count in the
forward, one all-reduce of the two gradient sums in the backward). Its gradient is the
gradient of the *sum* of every rank's loss with respect to the local input, which is what
data-parallel gradient averaging expects (the same convention as ``nn.SyncBatchNorm``).
SEER normalised over groups of 64 GPUs: :func:`bn_group` builds such groups.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


class _SyncBNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        acc = torch.promote_types(x.dtype, torch.float32)  # statistics in fp32 at least
        xf = x.to(acc)
        n_local = xf.numel() // c
        var_local, mean_local = torch.var_mean(xf, dim=dims, correction=0)
        # one all-gather of (count, mean, var) per rank; combining per-rank moments (Chan et al.)
        # avoids the cancellation of a global sum-of-squares
        stats = torch.cat([xf.new_tensor([float(n_local)]), mean_local, var_local])
        world = dist.get_world_size(group)
        gathered = [torch.empty_like(stats) for _ in range(world)]
        dist.all_gather(gathered, stats, group=group)
        g = torch.stack(gathered)
        counts, means, vars_ = g[:, :1], g[:, 1 : 1 + c], g[:, 1 + c :]
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = (counts * (vars_ + (means - mean) ** 2)).sum(0) / total
        invstd = torch.rsqrt(var + eps)
        shape = [1, c] + [1] * (x.dim() - 2)
        xhat = (xf - mean.view(shape)) * invstd.view(shape)
        y = xhat
        if weight is not None:
            y = y * weight.to(acc).view(shape) + bias.to(acc).view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.group, ctx.total, ctx.dims, ctx.shape = group, total, dims, shape
        ctx.mark_non_differentiable(mean, var, total)
        return y.to(x.dtype), mean, var, total

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean, _dvar, _dtotal):
        xhat, invstd, weight = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        dyf = dy.to(xhat.dtype)
        sum_dy = dyf.sum(dims)
        sum_dy_xhat = (dyf * xhat).sum(dims)
        # weight/bias grads stay local: data parallelism averages parameter grads afterwards
        grad_w = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=ctx.group)
            c = sum_dy.numel()
            mean_dy, mean_dy_xhat = sums[:c] / ctx.total, sums[c:] / ctx.total
            scale = invstd if weight is None else invstd * weight.to(xhat.dtype)
            grad_x = (dyf - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape)) * scale.view(shape)
            grad_x = grad_x.to(dy.dtype)
        return grad_x, grad_w, grad_b, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover every rank of ``group`` (any backend).

    Accepts (N, C) and (N, C, ...) inputs, so it replaces BatchNorm1d/2d/3d alike.
    Running statistics use the unbiased group variance, as ``nn.SyncBatchNorm`` does.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.group = group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects (N, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats or not dist.is_initialized() or dist.get_world_size(self.group) == 1:
            return F.batch_norm(
                x, self.running_mean if not self.training or self.track_running_stats else None,
                self.running_var if not self.training or self.track_running_stats else None,
                self.weight, self.bias, use_batch_stats, self._momentum(), self.eps)
        y, mean, var, total = _SyncBNFunction.apply(x, self.weight, self.bias, self.eps, self.group)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self._momentum()
                unbiased = var * (total / (total - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        return y

    def _momentum(self) -> float:
        if self.momentum is None:  # cumulative moving average, as in nn.BatchNorm
            return 1.0 / float(max(int(self.num_batches_tracked), 1))
        return self.momentum


def bn_group(group_size: int):
    """The process group this rank normalises over: all ranks (0) or consecutive groups of ``group_size``."""
    world = dist.get_world_size()
    if group_size <= 0 or group_size >= world:
        return dist.group.WORLD
    if world % group_size:
        raise ValueError(f"parallel.sync_bn_group_size={group_size} must divide the world size {world}")
    group, _ = dist.new_subgroups(group_size)
    return group


def convert_sync_batchnorm(module: nn.Module, group=None, cuda: bool = False) -> nn.Module:
    """Replace every BatchNorm by a synchronised one (``nn.SyncBatchNorm`` on CUDA), keeping its state."""
    if cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group=group)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, group=group)
        with torch.no_grad():
            if module.affine:
                new.weight, new.bias = module.weight, module.bias
            if module.track_running_stats:
                new.running_mean, new.running_var = module.running_mean, module.running_var
                new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child, group, cuda)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
