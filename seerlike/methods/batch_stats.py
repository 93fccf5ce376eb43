"""Statistics over the GLOBAL batch (every rank's samples) that keep their gradients.

Barlow Twins and VICReg regularise the statistics of a batch of embeddings (a standardised
cross-correlation, a variance and a covariance), so a batch split over ranks must be
reduced across them INSIDE the loss. The collectives here are autograd functions
(``torch.distributed.nn.functional``): the backward of an all-reduce all-reduces the
gradient, the backward of an all-gather reduce-scatters it. Every rank then computes the
same global loss ``L`` and receives ``world x dL/d(its inputs)`` (the gradient of the sum
of the ranks' identical losses, the convention of SyncBatchNorm), which data-parallel
gradient AVERAGING turns into exactly ``dL/dparameters``: N ranks train like 1 process on
the concatenated batch. A plain (non-autograd) all-reduce instead leaves each rank only its
own samples' share, i.e. 1/world of that gradient.

Without a process group (world size 1) every function is the single-process computation.
The statistics need equal batch sizes on every rank only where they all-gather. With
gradient accumulation they cover one micro-batch of every rank, not the whole step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seerlike.methods.common import all_reduce_with_grad


def standardize(z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Each feature of each view to zero mean and unit variance over the GLOBAL batch, and the global batch size.

    ``z`` is (views, local batch, features). This is BatchNorm without affine parameters in
    training mode (biased variance, ``eps`` inside the square root), with SyncBatchNorm's
    statistics: mean, then the variance around it (two passes: no cancellation), each an
    all-reduce of per-feature sums that keeps the gradient. The global count travels with
    the sums, so ranks may hold different batch sizes.
    """
    views, n, _ = z.shape
    sums = all_reduce_with_grad(torch.cat([z.sum(1), z.new_full((views, 1), float(n))], dim=1))
    count = sums[:, -1:].detach()
    centered = z - (sums[:, :-1] / count)[:, None]
    var = all_reduce_with_grad(centered.square().sum(1)) / count
    return centered * torch.rsqrt(var + eps)[:, None], count[0, 0]


def off_diagonal(m: Tensor) -> Tensor:
    """The off-diagonal entries of a square matrix as a flat view (no copy).

    In row-major order the diagonal entries sit every ``d + 1`` elements: dropping the first
    element and viewing the rest as rows of ``d + 1`` puts one diagonal entry at the end of
    each row, so dropping the last column leaves exactly the off-diagonal entries.
    """
    d = m.shape[0]
    if m.ndim != 2 or m.shape[1] != d:
        raise ValueError(f"off_diagonal expects a square matrix, got shape {tuple(m.shape)}")
    return m.flatten()[1:].view(d - 1, d + 1)[:, :-1].flatten()
