"""What every backbone shares: the trunk contract, stochastic depth, residual zero-init.

A backbone is a stem, four stages of residual blocks, a global average pool and an
optional linear classifier (``fc``). Stages and blocks are plain child modules, looked up
afresh on every call, so activation checkpointing and ``fully_shard`` can wrap them one by
one after the model is built.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

STAGE_KEYS = ("res2", "res3", "res4", "res5")
"""Feature names of the four stage outputs (detectron/VISSL spelling), then ``pool``."""

FEATURE_KEYS = (*STAGE_KEYS, "pool")


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``.

    Surviving branches are scaled by 1 / (1 - p) so evaluation needs no rescaling.
    """
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class ResidualBlock(nn.Module):
    """Base of every residual block: a stochastic-depth rate and the BN to zero-init."""

    drop_path_rate: float = 0.0

    def last_bn(self) -> nn.BatchNorm2d:
        """The BN closing the residual branch (zeroed by ``zero_init_residual``)."""
        raise NotImplementedError


class Backbone(nn.Module):
    """A trunk with the seerlike contract (see ``seerlike.models``).

    Subclasses build ``stem`` layers, four stages, ``avgpool`` and ``fc`` (None for a trunk),
    set ``out_dim``, ``feature_dims`` and ``feature_strides``, and implement ``stem_forward``
    and ``stages``.
    """

    out_dim: int
    """Width of the pooled features."""
    feature_dims: dict[str, int]
    """Channels of each entry of ``forward_features``."""
    feature_strides: dict[str, int]
    """Input-to-feature-map stride of each stage output (res2..res5)."""
    num_classes: int | None
    stem_conv_name: str
    """Dotted name of the first convolution, the one that sees the images (``conv1``, ``stem.0``)."""
    in_channels: int = 3
    """Channels of the input images: 3 (RGB), or 1 for a trunk trained on lightness alone (colorization)."""

    def stem_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def stages(self) -> list[nn.Module]:
        """The four stages in order (modules, looked up now: wrappers are seen)."""
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """Every residual block in forward order."""
        return [block for stage in self.stages() for block in stage.children()]

    def forward_features(self, x: Tensor, until: str = "pool") -> dict[str, Tensor]:
        """Stage outputs ``res2..res5`` (N, C, H, W) and ``pool`` (N, out_dim).

        ``until`` stops after that key (e.g. ``"res4"`` skips the last stage).
        """
        if until not in FEATURE_KEYS:
            raise ValueError(f"until={until!r} is not a feature; choose from {', '.join(FEATURE_KEYS)}")
        out: dict[str, Tensor] = {}
        x = self.stem_forward(x)
        for key, stage in zip(STAGE_KEYS, self.stages()):
            x = stage(x)
            out[key] = x
            if key == until:
                return out
        out["pool"] = torch.flatten(self.avgpool(x), 1)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features (N, out_dim), or logits (N, num_classes) when built with a classifier."""
        x = self.stem_forward(x)
        for stage in self.stages():
            x = stage(x)
        x = torch.flatten(self.avgpool(x), 1)
        return x if self.fc is None else self.fc(x)

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth rising linearly over the blocks, ``rate`` at the last one.

        Block ``l`` of ``L`` (1-based) drops its branch with probability ``rate * l / L``
        (Huang et al. 2016's linear decay rule); only in training mode.
        """
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_path={rate} must be in [0, 1)")
        blocks = self.blocks()
        for i, block in enumerate(blocks, start=1):
            block.drop_path_rate = rate * i / len(blocks)

    def set_in_channels(self, channels: int) -> Backbone:
        """Replace the first convolution by a freshly initialised one taking ``channels`` input
        channels (width, kernel, stride, device and dtype kept); returns self.

        For methods that feed the trunk something other than RGB (colorization feeds the
        lightness channel): the engine builds RGB trunks and such a method adapts its own. The
        init is torchvision's for both families (normal, std sqrt(2 / fan_out)).
        """
        if channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {channels}")
        old = self.get_submodule(self.stem_conv_name)
        if old.in_channels != channels:
            new = nn.Conv2d(channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
                            bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
            parent, _, child = self.stem_conv_name.rpartition(".")
            setattr(self.get_submodule(parent), child, new)
        self.in_channels = channels
        return self

    def apply_options(self, zero_init_residual: bool = False, drop_path: float = 0.0) -> Backbone:
        """The build-time options every builder takes; returns self."""
        if zero_init_residual:
            self.zero_init_residual()
        if drop_path:
            self.set_drop_path(drop_path)
        return self

    def zero_init_residual(self) -> None:
        """Zero the gamma of each block's last BN so every block starts as the identity."""
        for block in self.blocks():
            nn.init.zeros_(block.last_bn().weight)
