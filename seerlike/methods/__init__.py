"""Self-supervised methods and follow-up stages: ``METHODS`` maps ``method.name`` to the class.

Every class meets the contract of :mod:`seerlike.methods.base`; adding a method is its file,
its recipes, one line here and its tests (docs/methods.md).
"""

from __future__ import annotations

from torch import nn

from seerlike.config import ConfigError
from seerlike.methods.barlow_twins import BarlowTwins
from seerlike.methods.base import Method, MethodConfig
from seerlike.methods.byol import BYOL
from seerlike.methods.classifier import Finetune
from seerlike.methods.clusterfit import ClusterFit
from seerlike.methods.dino import DINO
from seerlike.methods.distill import Distill
from seerlike.methods.fixmatch import FixMatch
from seerlike.methods.moco_v2 import MoCoV2
from seerlike.methods.moco_v3 import MoCoV3
from seerlike.methods.noisy_student import NoisyStudent
from seerlike.methods.simclr import SimCLR
from seerlike.methods.simsiam import SimSiam
from seerlike.methods.swav import SwAV
from seerlike.methods.vicreg import VICReg

METHODS: dict[str, type[Method]] = {
    "swav": SwAV,
    "byol": BYOL,
    "clusterfit": ClusterFit,
    "distill": Distill,
    "simclr": SimCLR,
    "moco_v2": MoCoV2,
    "moco_v3": MoCoV3,
    "dino": DINO,
    "simsiam": SimSiam,
    "barlow_twins": BarlowTwins,
    "vicreg": VICReg,
    "finetune": Finetune,
    "fixmatch": FixMatch,
    "noisy_student": NoisyStudent,
}
MethodConfig.registry = METHODS


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; an unknown name fails listing the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None


def build(cfg: MethodConfig, backbone: nn.Module) -> nn.Module:
    """The method ``cfg.name`` around ``backbone`` (on CPU, fp32)."""
    cls = method_class(cfg.name)
    if not isinstance(cfg, cls.Config):
        raise ConfigError(f"method.name={cfg.name!r} needs a {cls.__name__}.Config, got {type(cfg).__qualname__}")
    return cls(cfg, backbone)


def pretraining_methods() -> list[str]:
    """Names of the methods that learn from unlabeled images alone (what the quickstart can run)."""
    return [name for name, cls in METHODS.items() if cls.stage == "pretrain"]
