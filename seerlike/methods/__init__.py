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
from seerlike.methods.colorization import Colorization
from seerlike.methods.deepcluster_v2 import DeepClusterV2
from seerlike.methods.dino import DINO
from seerlike.methods.distill import Distill
from seerlike.methods.jigsaw import Jigsaw
from seerlike.methods.moco_v2 import MoCoV2
from seerlike.methods.moco_v3 import MoCoV3
from seerlike.methods.multitask import MultiTask
from seerlike.methods.npid import NPID
from seerlike.methods.pirl import PIRL
from seerlike.methods.relative_position import RelativePosition
from seerlike.methods.rotnet import RotNet
from seerlike.methods.sela import SeLa
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
    "rotnet": RotNet,
    "jigsaw": Jigsaw,
    "relative_position": RelativePosition,
    "colorization": Colorization,
    "deepcluster_v2": DeepClusterV2,
    "sela": SeLa,
    "npid": NPID,
    "pirl": PIRL,
    "multitask": MultiTask,
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


def build(cfg: MethodConfig, backbone: nn.Module, *, num_samples: int | None = None) -> nn.Module:
    """The method ``cfg.name`` around ``backbone`` (on CPU, fp32).

    ``num_samples``, the size of the training data, is passed on (``num_samples=``) to methods that
    declare ``needs_indices`` (their memory holds every sample) and required for them only.
    """
    cls = method_class(cfg.name)
    if not isinstance(cfg, cls.Config):
        raise ConfigError(f"method.name={cfg.name!r} needs a {cls.__name__}.Config, got {type(cfg).__qualname__}")
    if not getattr(cls, "needs_indices", False):
        return cls(cfg, backbone)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"method {cfg.name!r} keeps a memory of every training sample and needs the size of the "
                          f"training data (num_samples), got {num_samples!r}")
    return cls(cfg, backbone, num_samples=num_samples)


def pretraining_methods() -> list[str]:
    """Names of the methods that learn from unlabeled images alone (what the quickstart can run)."""
    return [name for name, cls in METHODS.items() if cls.stage == "pretrain"]
