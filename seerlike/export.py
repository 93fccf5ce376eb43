"""`seerlike export`: a trained backbone as torchvision / safetensors / TorchScript / ONNX files.

The sharded (DCP) checkpoint is consolidated into one full state dict on one process
(``seerlike.engine.checkpoint.load_model_state``); the trunk (``backbone.*`` keys) becomes
a standalone backbone whose parameter names are torchvision's.

Export directory (``--out DIR``; several formats can share one directory):

- ``backbone.pth`` (torchvision): a plain ``state_dict``. Without a classifier (the default
  for self-supervised trunks, which have none worth shipping) it loads with ``strict=True``
  into torchvision's model once its classifier is removed::

      m = torchvision.models.resnet50()
      m.fc = torch.nn.Identity()              # the trunk has no classifier
      m.load_state_dict(torch.load("backbone.pth"), strict=True)

  A ClusterFit (or any classifier) checkpoint exported with ``--with-head`` carries
  ``fc.weight``/``fc.bias`` of shape (K, dim) and loads into ``resnet50(num_classes=K)``
  with no edit. seerlike-only names (e.g. ``resnet10_cifar``) load the same way into
  ``seerlike.models.build(name)`` (the build arguments are in ``export.json``).
- ``backbone.safetensors``: the same tensors, plus the arch name in the file's metadata.
- ``backbone.torchscript.pt`` / ``backbone.onnx``: ``images (N, 3, H, W)`` ->
  ``features (N, out_dim)`` (or logits with a head), batch dimension dynamic; checked
  against eager on export (max abs difference recorded in ``export.json``).
- ``export.json``: arch, build kwargs, out_dim, input normalisation, files, checks.
- ``config.yaml``: the resolved training config; ``MODEL_CARD.md``: recipe, config, data
  manifest hash, steps, eval results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from seerlike import storage
from seerlike.config import ConfigError

log = logging.getLogger(__name__)

FORMATS = ("torchvision", "safetensors", "torchscript", "onnx")
FILES = {"torchvision": "backbone.pth", "safetensors": "backbone.safetensors",
         "torchscript": "backbone.torchscript.pt", "onnx": "backbone.onnx"}
META = "export.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "COMPLETE").exists()


def _is_export(path: Path) -> bool:
    return path.is_dir() and (path / META).exists()


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
    path = Path(path)
    if _is_checkpoint(path):
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


def _head_from(rest: dict[str, Tensor]) -> nn.Linear | None:
    """A classifier on pooled features, when the method state has one (ClusterFit ``head``)."""
    if "head.weight" not in rest:
        return None
    w = rest["head.weight"]
    head = nn.Linear(w.shape[1], w.shape[0], bias="head.bias" in rest)
    head.load_state_dict({k[len("head."):]: v for k, v in rest.items() if k.startswith("head.")})
    return head.eval()


def _torchvision_name(arch: str) -> bool:
    """Whether torchvision has a model of this name with the same architecture."""
    from seerlike import models

    return models.source(arch).startswith("torchvision")


def _build(arch: str) -> nn.Module:
    from seerlike import models

    return models.build(arch)


def _with_state(arch: str, state: dict[str, Tensor]) -> nn.Module:
    """The named trunk holding ``state`` (strict), built on the meta device: no second copy in memory."""
    with torch.device("meta"):
        model = _build(arch)
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
    trunk, rest = split_state(full)
    return Loaded(_with_state(arch, trunk), arch, str(ckpt), _head_from(rest), step_of(ckpt), train_cfg, rest)


def load_export(path: str | os.PathLike) -> Loaded:
    path = Path(path)
    meta = json.loads((path / META).read_text())
    arch = meta["arch"]
    if (path / FILES["safetensors"]).exists():
        from safetensors.torch import load_file

        state = load_file(str(path / FILES["safetensors"]))
    elif (path / FILES["torchvision"]).exists():
        state = torch.load(path / FILES["torchvision"], map_location="cpu", weights_only=True)
    else:
        raise ConfigError(f"export {path} has neither {FILES['safetensors']} nor {FILES['torchvision']} "
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


def load_backbone(spec: str | os.PathLike) -> Loaded:
    """A backbone from ``random:ARCH``, an export dir, a checkpoint dir or a run dir."""
    spec = str(spec)
    if spec.startswith("random:"):
        arch = spec.split(":", 1)[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # "random" is the same random init every time, so baselines reproduce
            return Loaded(_build(arch).eval(), arch, spec)
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"model {spec!r} not found; give a checkpoint dir, a run dir, an export dir or random:ARCH")
    if _is_export(path):
        return load_export(path)
    return load_checkpoint(path)


# ---------------------------------------------------------------- writing


class WithHead(nn.Module):
    """Trunk + classifier, for exporting a classifier as one graph (torchvision layout: ``fc``)."""

    def __init__(self, trunk: nn.Module, fc: nn.Linear):
        super().__init__()
        self.trunk, self.fc = trunk, fc

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.trunk(x))


def export_state(loaded: Loaded, with_head: bool) -> dict[str, Tensor]:
    """The torchvision-named state dict: trunk tensors (+ ``fc.*`` with a head)."""
    state = {k: v.detach().clone().contiguous() for k, v in loaded.model.state_dict().items()}
    if with_head:
        if loaded.head is None:
            raise ConfigError(f"{loaded.source} has no classifier head to export; drop --with-head")
        state.update({f"fc.{k}": v.detach().clone().contiguous() for k, v in loaded.head.state_dict().items()})
    return state


def _graph_module(loaded: Loaded, with_head: bool) -> nn.Module:
    return (WithHead(loaded.model, loaded.head) if with_head else loaded.model).eval()


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def write_torchscript(module: nn.Module, example: Tensor, path: Path) -> float:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream, still asked for
        traced = torch.jit.trace(module, example, check_trace=False)
        # through a Python file: saving to a path on a full disk aborts the whole process
        # (the C++ writer throws in its destructor); a file object raises OSError instead
        with open(path, "wb") as f:
            torch.jit.save(traced, f)
        loaded = torch.jit.load(str(path))
        # a different batch size than the trace: the graph must not have baked it in
        probe = torch.cat([example, example.flip(0)])
        return max_abs_diff(loaded(probe), module(probe))


def onnx_run(path: Path, x: Tensor) -> Tensor:
    """Run an exported ONNX graph with onnxruntime (or onnx's reference evaluator without it)."""
    try:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    except ImportError:
        import onnx
        from onnx.reference import ReferenceEvaluator

        ref = ReferenceEvaluator(onnx.load(str(path)))
        out = ref.run(None, {ref.input_names[0]: x.numpy()})[0]
    return torch.from_numpy(out)


def write_onnx(module: nn.Module, example: Tensor, path: Path) -> float:
    # the TorchScript-based exporter: seconds instead of the dynamo exporter's ~20 s per model
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (example,), str(path), input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, opset_version=17,
                          dynamo=False)
        probe = torch.cat([example, example.flip(0)])
        return max_abs_diff(onnx_run(path, probe), module(probe))


def data_manifest_hash(train_cfg: dict | None) -> str | None:
    """sha256 of the training data's manifest.parquet (ingested datasets), or of the CSV/list file."""
    if not train_cfg:
        return None
    data = train_cfg.get("data") or {}
    source = data.get("source") if isinstance(data, dict) else None
    if not isinstance(source, str) or source.startswith("s3://"):
        return None
    p = Path(source)
    for cand in (p / "manifest.parquet", p if p.is_file() else None):
        if cand is not None and cand.exists():
            h = hashlib.sha256()
            with open(cand, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            return f"sha256:{h.hexdigest()} ({cand.name})"
    return None


def model_card(loaded: Loaded, meta: dict, evals: dict[str, Any]) -> str:
    import yaml

    cfg = loaded.train_config or {}
    method = (cfg.get("method") or {}).get("name")
    recipe = cfg.get("recipe") or (f"method {method}, backbone {loaded.arch}" if method else "(no training config)")
    lines = [
        f"# {loaded.arch} — seerlike export", "",
        f"- backbone: `{loaded.arch}` ({meta['num_params']:,} parameters, pooled features of width {meta['out_dim']})",
        f"- classifier: {'fc ' + str(tuple(meta['fc_shape'])) if meta.get('fc_shape') else 'none (trunk only; set model.fc = nn.Identity() in torchvision)'}",
        f"- source: `{loaded.source}`",
        f"- recipe: {recipe}",
        f"- training steps: {loaded.step if loaded.step is not None else '(unknown)'}",
        f"- data manifest: {meta.get('data_manifest_hash') or '(not available)'}",
        f"- input: RGB float, normalised with mean {list(IMAGENET_MEAN)}, std {list(IMAGENET_STD)}", "",
        "## Files", "",
        *[f"- `{f}` ({fmt}){'; max |export - eager| = %.2e' % meta['checks'][fmt] if fmt in meta.get('checks', {}) else ''}"
          for fmt, f in meta["files"].items()],
        *([f"", f"Training curves (loss, LR, throughput): `{meta['curves']}`"] if meta.get("curves") else []),
        "", "## Evaluation", "",
    ]
    if evals:
        for name, result in evals.items():
            where = ", ".join(f"{k} {result[k]}" for k in ("layer", "val") if result.get(k))
            lines.append(f"- {name}{f' ({where})' if where else ''}: `{json.dumps(result.get('metrics', result), sort_keys=True)}`")
    else:
        lines.append("- none recorded (run `seerlike eval ... --out DIR` and pass `--eval DIR/eval_*.json`)")
    lines += ["", "## Resolved training config", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip() if cfg else "# none", "```", ""]
    return "\n".join(lines)


def export(source: str | os.PathLike, out: str | os.PathLike, formats: list[str], *, with_head: bool = False,
           image_size: int = 224, eval_files: list[str] | None = None, tolerance: float = 1e-4) -> dict:
    """Write ``formats`` of ``source`` into ``out``; returns the export.json content."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ConfigError(f"unknown export format(s) {bad}; choose from {', '.join(FORMATS)}")
    loaded = load_backbone(source)
    if str(source).startswith("random:"):
        log.warning("exporting a randomly initialised %s", loaded.arch)
    out = Path(out)
    with storage.reporting_disk_full(out):
        out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((out / META).read_text()) if (out / META).exists() else {}
    if meta and meta.get("arch") != loaded.arch:
        raise ConfigError(f"{out} already holds an export of {meta.get('arch')}; use another --out for {loaded.arch}")
    state = export_state(loaded, with_head)
    meta.update({
        "arch": loaded.arch, "build": {"name": loaded.arch, "num_classes": None},
        "torchvision_compatible": _torchvision_name(loaded.arch),
        "out_dim": int(loaded.model.out_dim), "num_params": sum(p.numel() for p in loaded.model.parameters()),
        "fc_shape": list(state["fc.weight"].shape) if with_head else None,
        "load": ("model = seerlike.models.build(arch) or torchvision.models.<arch>(); model.fc = nn.Identity(); "
                 "model.load_state_dict(state, strict=True)") if not with_head else
                ("model = torchvision.models.<arch>(num_classes=K) or seerlike.models.build(arch, num_classes=K); "
                 "model.load_state_dict(state, strict=True)"),
        "source": loaded.source, "step": loaded.step, "input": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "size": image_size},
        "data_manifest_hash": data_manifest_hash(loaded.train_config),
    })
    meta.setdefault("files", {})
    meta.setdefault("checks", {})
    example = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    graph = _graph_module(loaded, with_head)
    for fmt in formats:
        path = out / FILES[fmt]
        # every file is written beside its destination and renamed when complete (and, for the
        # graph formats, checked): a full disk or a failed check leaves no partial file behind
        with storage.atomic_write(path) as tmp:
            if fmt == "torchvision":
                with open(tmp, "wb") as f:  # a file object: a full disk surfaces as OSError
                    torch.save(state, f)
            elif fmt == "safetensors":
                from safetensors.torch import save

                # serialised in memory, written by Python: the Rust writer reports a full disk
                # only as text
                tmp.write_bytes(save(state, metadata={"arch": loaded.arch, "format": "seerlike-backbone"}))
            elif fmt == "torchscript":
                meta["checks"][fmt] = write_torchscript(graph, example, tmp)
            elif fmt == "onnx":
                meta["checks"][fmt] = write_onnx(graph, example, tmp)
            if meta["checks"].get(fmt, 0.0) > tolerance:
                raise RuntimeError(f"{fmt} export differs from eager by {meta['checks'][fmt]:.3g} (> {tolerance}); not trusted")
        meta["files"][fmt] = FILES[fmt]
        log.info("wrote %s", path)
    if loaded.train_config:
        import yaml

        storage.write_bytes(out / "config.yaml", yaml.safe_dump(loaded.train_config, sort_keys=False).encode())
    run_dir = Path(loaded.source).parent.parent  # RUN_DIR/checkpoints/step_N
    if _is_checkpoint(Path(loaded.source)) and (run_dir / "metrics.jsonl").exists():
        from seerlike.plots import training_curves

        with storage.atomic_write(out / "training_curves.png") as tmp:
            training_curves(run_dir, tmp)
        meta["curves"] = "training_curves.png"
    evals = {}
    # results `seerlike eval` wrote by default beside this very checkpoint (MODEL/eval) are picked up too
    found = [p for d in (Path(loaded.source) / "eval", run_dir / "eval") if d.is_dir() for p in sorted(d.glob("eval_*.json"))]
    for f in found:
        result = json.loads(f.read_text())
        if result.get("model") == loaded.source:
            evals[f.stem] = result
    for f in eval_files or []:
        evals[Path(f).stem] = json.loads(Path(f).read_text())
    if evals:
        meta["evals"] = {k: {"metrics": v.get("metrics"), "kind": v.get("kind"), "val": v.get("val"),
                             "layer": v.get("layer")} for k, v in evals.items()}
    storage.write_bytes(out / "MODEL_CARD.md", model_card(loaded, meta, meta.get("evals", {})).encode())
    storage.write_bytes(out / META, (json.dumps(meta, indent=2) + "\n").encode())  # last: it marks an export
    return meta


# ---------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, run dir (newest complete checkpoint) or random:ARCH")
    p.add_argument("--format", default="torchvision",
                   help=f"comma-separated formats: {', '.join(FORMATS)} (or 'all')")
    p.add_argument("--out", required=True, help="export directory")
    p.add_argument("--with-head", action="store_true", help="include the checkpoint's classifier as fc.* (ClusterFit)")
    p.add_argument("--image-size", type=int, default=224, help="example input size for tracing and checks")
    p.add_argument("--eval", action="append", default=[], metavar="JSON", help="eval result JSON to put in the model card")


def run(args: argparse.Namespace) -> int:
    formats = list(FORMATS) if args.format == "all" else [f.strip() for f in args.format.split(",") if f.strip()]
    meta = export(args.checkpoint, args.out, formats, with_head=args.with_head, image_size=args.image_size,
                  eval_files=args.eval)
    print(json.dumps({"out": str(args.out), "arch": meta["arch"], "files": meta["files"], "checks": meta["checks"]}, indent=2))
    return 0
