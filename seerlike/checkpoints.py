"""Reading trained backbones back: from a checkpoint dir, a run dir, an export dir or ``random:ARCH``.

Everything downstream of training (extraction, evaluation, distillation teachers, export)
loads its model through :func:`load_backbone`, which returns the trunk in eval mode, the
classifier head when the source has one, and where it all came from. Sources are recorded as
absolute paths, so features, evaluations and exports made from a relative path can be consumed
from any directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from seerlike.config import ConfigError

#: The file that marks an export dir (written last by `seerlike export`) and the weight files in it.
EXPORT_META = "export.json"
EXPORT_FILES = {"torchvision": "backbone.pth", "safetensors": "backbone.safetensors",
                "torchscript": "backbone.torchscript.pt", "onnx": "backbone.onnx"}


@dataclass
class Loaded:
    """A backbone ready for inference plus where it came from."""

    model: nn.Module
    """The trunk (``forward`` -> pooled features, ``forward_features`` -> dict), in eval mode."""
    arch: str
    """``seerlike.models`` name."""
    source: str
    """What was loaded (checkpoint dir, export dir, ``random:ARCH``)."""
    head: nn.Linear | None = None
    """A classifier on the pooled features when the source has one (ClusterFit ``head`` / export ``fc``)."""
    step: int | None = None
    """Training step of the checkpoint."""
    train_config: dict | None = None
    """The resolved training config (as a dict) when the source has one."""
    method_state: dict = field(default_factory=dict)
    """Non-trunk tensors of the checkpoint's model state (heads, prototypes, ...)."""


# ---------------------------------------------------------------- reading sources


def is_checkpoint(path: Path) -> bool:
    """A complete engine checkpoint (the COMPLETE marker is written last)."""
    return path.is_dir() and (path / "COMPLETE").exists()


def is_export(path: Path) -> bool:
    """An export dir (export.json is written last)."""
    return path.is_dir() and (path / EXPORT_META).exists()


def arch_of_config(cfg: dict) -> str:
    """The backbone name inside a resolved training config dict."""
    model = cfg.get("model")
    if isinstance(model, dict):
        for key in ("name", "arch"):
            if isinstance(model.get(key), str):
                return model[key]
    if isinstance(model, str):
        return model
    raise ConfigError("cannot find the backbone name (model.name) in the checkpoint's config.yaml")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A complete checkpoint dir from a checkpoint dir or a run dir (its newest complete one)."""
    path = Path(os.path.abspath(path))
    if is_checkpoint(path):
        return path
    if path.is_dir() and (path / "checkpoints").is_dir():
        from seerlike.engine.checkpoint import latest

        ckpt = latest(path)
        if ckpt is None:
            raise ConfigError(f"run dir {path} has no complete checkpoint yet")
        return Path(ckpt)
    raise ConfigError(f"{path} is neither a complete checkpoint (a dir with COMPLETE) nor a run dir with checkpoints/")


def split_state(full: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(trunk state with the ``backbone.`` prefix removed, everything else)."""
    trunk = {k[len("backbone."):]: v for k, v in full.items() if k.startswith("backbone.")}
    rest = {k: v for k, v in full.items() if not k.startswith("backbone.")}
    if not trunk:
        raise ConfigError("the checkpoint's model state has no backbone.* keys; is it a seerlike method checkpoint?")
    return trunk, rest


def evaluated_state(full: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state to evaluate: a method's moving average (``ema.backbone.*``, ``ema.head.*``: FixMatch)
    in place of its online trunk and head when it keeps one, else ``full`` itself."""
    ema = {k[len("ema."):]: v for k, v in full.items() if k.startswith("ema.backbone.")}
    if not ema:
        return full
    ema.update({k[len("ema."):]: v for k, v in full.items() if k.startswith("ema.head.")})
    return {**{k: v for k, v in full.items() if not k.startswith(("backbone.", "head.", "ema."))}, **ema}


def _head_from(rest: dict[str, Tensor]) -> nn.Linear | None:
    """A classifier on pooled features, when the method state has one (ClusterFit ``head``)."""
    if "head.weight" not in rest:
        return None
    w = rest["head.weight"]
    head = nn.Linear(w.shape[1], w.shape[0], bias="head.bias" in rest)
    head.load_state_dict({k[len("head."):]: v for k, v in rest.items() if k.startswith("head.")})
    return head.eval()


def torchvision_name(arch: str) -> bool:
    """Whether torchvision has a model of this name with the same architecture."""
    from seerlike import models

    return models.source(arch).startswith("torchvision")


def _build(arch: str) -> nn.Module:
    from seerlike import models

    return models.build(arch)


def _with_state(arch: str, state: dict[str, Tensor]) -> nn.Module:
    """The named trunk holding ``state`` (strict), built on the meta device: no second copy in memory.

    A trunk trained on other inputs than RGB (colorization's lightness) has a first convolution
    with other input channels; its shape in ``state`` says how many.
    """
    with torch.device("meta"):
        model = _build(arch)
    stem = state.get(f"{getattr(model, 'stem_conv_name', '')}.weight")
    if isinstance(stem, Tensor) and stem.ndim == 4 and stem.shape[1] != model.in_channels:
        model.set_in_channels(int(stem.shape[1]))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_checkpoint(path: str | os.PathLike) -> Loaded:
    import yaml

    from seerlike.engine.checkpoint import load_model_state, step_of

    ckpt = resolve_checkpoint(path)
    full = load_model_state(ckpt)  # verifies the checkpoint's files (config.yaml too) before reading any of them
    cfg_path = ckpt / "config.yaml"
    if not cfg_path.exists():
        cfg_path = ckpt.parent.parent / "config.yaml"
    if not cfg_path.exists():
        raise ConfigError(f"no config.yaml in {ckpt} or its run dir; cannot tell which backbone it holds")
    train_cfg = yaml.safe_load(cfg_path.read_text())
    arch = arch_of_config(train_cfg)
    trunk, rest = split_state(evaluated_state(full))
    return Loaded(_with_state(arch, trunk), arch, str(ckpt), _head_from(rest), step_of(ckpt), train_cfg, rest)


def load_export(path: str | os.PathLike) -> Loaded:
    path = Path(os.path.abspath(path))
    meta = json.loads((path / EXPORT_META).read_text())
    arch = meta["arch"]
    if (path / EXPORT_FILES["safetensors"]).exists():
        from safetensors.torch import load_file

        state = load_file(str(path / EXPORT_FILES["safetensors"]))
    elif (path / EXPORT_FILES["torchvision"]).exists():
        state = torch.load(path / EXPORT_FILES["torchvision"], map_location="cpu", weights_only=True)
    else:
        raise ConfigError(f"export {path} has neither {EXPORT_FILES['safetensors']} nor {EXPORT_FILES['torchvision']} "
                          "(TorchScript/ONNX exports are for deployment; re-export with --format safetensors)")
    fc = {k[3:]: state.pop(k) for k in list(state) if k.startswith("fc.")}
    model = _with_state(arch, state)
    head = None
    if fc:
        head = nn.Linear(fc["weight"].shape[1], fc["weight"].shape[0], bias="bias" in fc)
        head.load_state_dict(fc)
        head.eval()
    cfg = None
    if (path / "config.yaml").exists():
        import yaml

        cfg = yaml.safe_load((path / "config.yaml").read_text())
    return Loaded(model, arch, str(path), head, meta.get("step"), cfg)


RANDOM_FORM = "random:ARCH or random:ARCH:in_channels=1 (a trunk that takes the lightness alone, as colorization's)"


def parse_random(spec: str) -> tuple[str, int]:
    """``(arch, in_channels)`` of a ``random:ARCH[:in_channels=C]`` spec; C is 3 (RGB) or 1 (lightness)."""
    arch, *opts = spec.removeprefix("random:").split(":")
    channels = 3
    for opt in opts:
        key, eq, value = opt.partition("=")
        if key != "in_channels" or not eq or value not in ("1", "3"):
            raise ConfigError(f"model {spec!r}: unknown option {opt!r}; give {RANDOM_FORM}")
        channels = int(value)
    if not arch:
        raise ConfigError(f"model {spec!r} names no backbone; give {RANDOM_FORM}")
    return arch, channels


def random_spec(arch: str, in_channels: int = 3) -> str:
    """The ``random:`` spec of ``arch`` taking ``in_channels`` channels (the inverse of :func:`parse_random`)."""
    return f"random:{arch}" + (f":in_channels={in_channels}" if in_channels != 3 else "")


def load_backbone(spec: str | os.PathLike) -> Loaded:
    """A backbone from ``random:ARCH[:in_channels=C]``, an export dir, a checkpoint dir or a run dir."""
    spec = str(spec)
    if spec.startswith("random:"):
        arch, channels = parse_random(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # "random" is the same random init every time, so baselines reproduce
            model = _build(arch)
            # the lightness stem is drawn after the rest: every other weight equals the RGB random init's
            return Loaded((model.set_in_channels(channels) if channels != 3 else model).eval(), arch, spec)
    path = Path(os.path.abspath(spec))
    if not path.exists():
        raise ConfigError(f"model {spec!r} not found; give a checkpoint dir, a run dir, an export dir or random:ARCH")
    if is_export(path):
        return load_export(path)
    return load_checkpoint(path)


