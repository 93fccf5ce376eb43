"""Backbones: RegNet X/Y (up to SEER's 10B) and ResNet/ResNeXt, with torchvision's names.

The contract every backbone keeps:

- ``build(name, num_classes=None, zero_init_residual=False, drop_path=0.0, in_channels=3)``
  returns the module; ``.out_dim`` is the pooled width; ``.in_channels`` the image channels
  (1: lightness alone, as ``seerlike.methods.pretext_ops.lightness_input`` makes it);
  ``forward(x)`` gives pooled features (N, out_dim) when ``num_classes`` is None, else logits;
  ``forward_features(x)`` gives ``res2..res5`` and ``pool``; ``.blocks()`` and ``.stages()``
  list the modules to checkpoint / shard one by one.
- Parameter and buffer names and initialisation are torchvision's, so a trunk's state dict
  loads into the torchvision model of the same name with ``strict=True`` (plus ``fc.*``).
- ``complexity(name, resolution, num_classes)`` counts params / FLOPs / activations
  analytically per block, as pycls does; at 224 px it matches the published figures.
- ``seerlike.models.regnet.regnet(depth=, w0=, wa=, wm=, group_width=, ...)`` builds any
  custom RegNet (not re-exported here: ``seerlike.models.regnet`` stays the module).
"""

from __future__ import annotations

import difflib

from seerlike.config import ConfigError
from seerlike.models import regnet as _regnet
from seerlike.models import resnet as _resnet
from seerlike.models.backbone import FEATURE_KEYS, STAGE_KEYS, Backbone
from seerlike.models.regnet import RegNet, RegNetSpec
from seerlike.models.resnet import ResNet, ResNetSpec

__all__ = [
    "FEATURE_KEYS",
    "STAGE_KEYS",
    "Backbone",
    "RegNet",
    "RegNetSpec",
    "ResNet",
    "ResNetSpec",
    "build",
    "complexity",
    "names",
    "source",
    "spec",
]


def names() -> list[str]:
    """Every backbone name ``build`` accepts, RegNets first, then the ResNet family."""
    return [*_regnet.CONFIGS, *_resnet.CONFIGS]


def _check_name(name: str) -> None:
    if name not in _regnet.CONFIGS and name not in _resnet.CONFIGS:
        close = difflib.get_close_matches(name, names(), n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown backbone {name!r}; {hint}`seerlike model-info --list` shows all {len(names())} names")


def spec(name: str) -> RegNetSpec | ResNetSpec:
    """The architecture of a named backbone (widths, depths, groups)."""
    _check_name(name)
    if name in _regnet.CONFIGS:
        return _regnet.named_spec(name)
    return _resnet.CONFIGS[name][0]


def source(name: str) -> str:
    """Where a named config comes from (torchvision, pycls, SEER/VISSL, SwAV, ...).

    A source starting with ``"torchvision"`` means torchvision ships a model of this name with
    exactly this architecture and state-dict layout (the exporter relies on it).
    """
    _check_name(name)
    return _regnet.CONFIGS[name].source if name in _regnet.CONFIGS else _resnet.CONFIGS[name][1]


def build(name: str, num_classes: int | None = None, zero_init_residual: bool = False, drop_path: float = 0.0,
          in_channels: int = 3) -> Backbone:
    """Build a named backbone; a trunk (no ``fc``) unless ``num_classes`` is given.

    ``in_channels`` other than 3 replaces the first convolution (``Backbone.set_in_channels``).

    Build huge ones without allocating memory under ``with torch.device("meta"):``.
    """
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"num_classes={num_classes} must be a positive int, or None for a trunk")
    model = spec(name).build(num_classes).apply_options(zero_init_residual, drop_path)
    return model.set_in_channels(in_channels) if in_channels != 3 else model


def complexity(name: str, resolution: int = 224, num_classes: int | None = 1000) -> dict:
    """Analytic params / FLOPs (multiply-adds) / activations of a named backbone.

    Returns ``{"params", "flops", "acts", "stages": [...], "parts": [...]}`` where ``parts``
    has one entry per stem / block / head. ``num_classes=None`` (or 0) counts the trunk only.
    """
    if resolution < 1:
        raise ConfigError(f"resolution={resolution} must be a positive number of pixels")
    return spec(name).complexity(resolution, num_classes)
