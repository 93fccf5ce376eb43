"""MLP heads shared by the methods: Linear -> BN -> ReLU blocks, then a last Linear."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp(in_dim: int, dims: Sequence[int], *, last_bn: bool = False) -> nn.Sequential:
    """``in_dim -> dims[0] -> ... -> dims[-1]``: Linear -> BN -> ReLU for each hidden width,
    then a plain Linear (SwAV's projection, BYOL's projector and predictor).

    An empty ``dims`` gives an identity (features go straight to the loss). Hidden Linears
    carry no bias because the BN after them would cancel it.
    """
    if in_dim <= 0 or any(d <= 0 for d in dims):
        raise ValueError(f"MLP widths must be positive, got in_dim={in_dim}, dims={list(dims)}")
    layers: list[nn.Module] = []
    widths = [in_dim, *dims]
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        last = i == len(dims) - 1
        layers.append(nn.Linear(a, b, bias=last and not last_bn))
        if not last or last_bn:
            layers.append(nn.BatchNorm1d(b))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)
