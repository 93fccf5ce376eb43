"""Writing a trained backbone as torchvision / safetensors / TorchScript / ONNX files (`seerlike export`).

The sharded (DCP) checkpoint is consolidated into one full state dict on one process
(:func:`seerlike.checkpoints.load_backbone`); the trunk (``backbone.*`` keys) becomes a
standalone backbone whose parameter names are torchvision's.

Export directory (``--out DIR``; several formats can share one directory):

- ``backbone.pth`` (torchvision): a plain ``state_dict``. Without a classifier (the default
  for self-supervised trunks, which have none worth shipping) it loads with ``strict=True``
  into torchvision's model once its classifier is removed::

      m = torchvision.models.resnet50()
      m.fc = torch.nn.Identity()              # the trunk has no classifier
      m.load_state_dict(torch.load("backbone.pth"), strict=True)

  A ClusterFit (or any classifier) checkpoint exported with ``--with-head`` carries
  ``fc.weight``/``fc.bias`` of shape (K, dim) and loads into ``resnet50(num_classes=K)``
  with no edit (``export.json``'s ``build.num_classes`` is K). seerlike-only names (e.g.
  ``resnet10_cifar``) load the same way into ``seerlike.models.build(**build)``.
- ``backbone.safetensors``: the same tensors, plus the arch name in the file's metadata.
- ``backbone.torchscript.pt`` / ``backbone.onnx``: ``images (N, 3, H, W)`` -> ``features
  (N, out_dim)``, or ``logits (N, K)`` with a head; batch, height and width are dynamic (the
  trunks pool globally); checked against eager on export at two batch sizes and two image
  sizes (max abs difference recorded in ``export.json``). A trunk trained on the lightness
  alone (colorization) takes ``(N, 1, H, W)``; ``export.json``'s ``build.in_channels`` and the
  model card say so, and ``seerlike.models.build(**build)`` makes its first convolution.
- ``export.json``: arch, build kwargs, out_dim, input size and normalisation, files, checks,
  evaluations; ``config.yaml``: the resolved training config; ``MODEL_CARD.md``: recipe,
  config, data manifest hash, steps, evaluation results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from seerlike import storage
from seerlike.checkpoints import EXPORT_FILES as FILES
from seerlike.checkpoints import EXPORT_META as META
from seerlike.checkpoints import Loaded, is_checkpoint, load_backbone, torchvision_name
from seerlike.config import ConfigError
from seerlike.data.augment import IMAGENET_MEAN, IMAGENET_STD
from seerlike.progress import Progress

log = logging.getLogger(__name__)

FORMATS = tuple(FILES)
DEFAULT_IMAGE_SIZE = 224
"""Input side when neither --image-size nor a training config says otherwise."""


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


def probes(example: Tensor) -> list[Tensor]:
    """Inputs a graph is checked on: another batch size than the trace's, and another image size.

    A graph that baked in the traced batch or spatial size fails (or differs) on one of them.
    """
    side = example.shape[-1]
    other = torch.randn(3, example.shape[1], side + 16, side + 8, generator=torch.Generator().manual_seed(1))
    return [torch.cat([example, example.flip(0)]), other]


def write_torchscript(module: nn.Module, example: Tensor, path: Path) -> float:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream, still asked for
        traced = torch.jit.trace(module, example, check_trace=False)
        # through a Python file: saving to a path on a full disk aborts the whole process
        # (the C++ writer throws in its destructor); a file object raises OSError instead
        with open(path, "wb") as f:
            torch.jit.save(traced, f)
        loaded = torch.jit.load(str(path))
        return max(max_abs_diff(loaded(x), module(x)) for x in probes(example))


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


def write_onnx(module: nn.Module, example: Tensor, path: Path, output: str = "features") -> float:
    """``images (batch, 3, height, width)`` -> ``output (batch, D)``, every input axis dynamic (the trunks pool globally)."""
    # the TorchScript-based exporter: seconds instead of the dynamo exporter's ~20 s per model
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (example,), str(path), input_names=["images"], output_names=[output],
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, output: {0: "batch"}},
                          opset_version=17, dynamo=False)
        return max(max_abs_diff(onnx_run(path, x), module(x)) for x in probes(example))


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


def trained_input(train_cfg: dict | None) -> dict:
    """Input side and normalisation the backbone was trained with (its largest view; ImageNet's without a config)."""
    augment = ((train_cfg or {}).get("data") or {}).get("augment") or {}
    sizes = [v["size"] for v in augment.get("views") or [] if isinstance(v, dict) and isinstance(v.get("size"), int)]
    return {"size": max(sizes) if sizes else None, "mean": list(augment.get("mean") or IMAGENET_MEAN),
            "std": list(augment.get("std") or IMAGENET_STD)}


def _eval_line(name: str, result: dict) -> str:
    where = ", ".join(f"{k} {result[k]}" for k in ("layer", "image_size", "val") if result.get(k))
    metrics = result.get("metrics") or {}
    shown = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {json.dumps(v, sort_keys=True)}"
                      for k, v in metrics.items())
    return f"- {result.get('kind') or name}{f' ({where})' if where else ''}: {shown or '(no metrics)'}"


def model_card(meta: dict, train_cfg: dict | None) -> str:
    """MODEL_CARD.md from export.json's content and the training config."""
    import yaml

    cfg = train_cfg or {}
    arch = meta["arch"]
    method = (cfg.get("method") or {}).get("name")
    recipe = cfg.get("recipe") or (f"method {method}, backbone {arch}" if method else "(no training config)")
    inp = meta["input"]
    k = meta["build"].get("num_classes")
    channels = meta["build"].get("in_channels", 3)
    tv = f"torchvision.models.{arch}({f'num_classes={k}' if k else ''})"
    load = (f"`m = {tv}; m.load_state_dict(torch.load('backbone.pth'), strict=True)`" if k else
            f"`m = {tv}; m.fc = torch.nn.Identity(); m.load_state_dict(torch.load('backbone.pth'), strict=True)`")
    if not meta.get("torchvision_compatible"):
        kwargs = f"{f', num_classes={k}' if k else ''}{f', in_channels={channels}' if channels != 3 else ''}"
        load = (f"`m = seerlike.models.build('{arch}'{kwargs}); m.load_state_dict(torch.load('backbone.pth'), strict=True)` "
                f"({'not a torchvision architecture' if channels == 3 else f'{channels} input channel(s)'})")
    if channels == 1:
        what = ("lightness float (N, 1, H, W): CIE L* of the sRGB image as (L* - 50) / 100 "
                "(`seerlike.methods.pretext_ops.lightness_input`)")
    else:
        what = f"RGB float (N, 3, H, W), normalised with mean {list(inp['mean'])}, std {list(inp['std'])}"
    classifier = f"fc {tuple(meta['fc_shape'])} ({k} classes)" if meta.get("fc_shape") else "none (trunk only)"
    lines = [
        f"# {arch} — seerlike export", "",
        f"- backbone: `{arch}` ({meta['num_params']:,} parameters, pooled features of width {meta['out_dim']})",
        f"- classifier: {classifier}",
        f"- load: {load}",
        f"- source: `{meta['source']}`",
        f"- recipe: {recipe}",
        f"- training steps: {meta['step'] if meta.get('step') is not None else '(unknown)'}",
        f"- data manifest: {meta.get('data_manifest_hash') or '(not available)'}",
        f"- input: {what}; {inp['size']} px {inp['size_from']}; other sizes run too (the trunk pools globally)", "",
        "## Files", "",
        *[f"- `{f}` ({fmt}){'; max |export - eager| = %.2e' % meta['checks'][fmt] if fmt in meta.get('checks', {}) else ''}"
          for fmt, f in meta["files"].items()],
        *([f"", f"Training curves (loss, LR, throughput): `{meta['curves']}`"] if meta.get("curves") else []),
        "", "## Evaluation", "",
    ]
    evals = meta.get("evals") or {}
    if evals:
        lines += [_eval_line(name, result) for name, result in evals.items()]
    else:
        lines.append("- none recorded (`seerlike eval ... --model` this export dir records its result here)")
    lines += ["", "## Resolved training config", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip() if cfg else "# none", "```", ""]
    return "\n".join(lines)


def _eval_summary(result: dict) -> dict:
    return {k: result.get(k) for k in ("kind", "metrics", "layer", "image_size", "train", "val", "model")}


def record_eval(export_dir: str | os.PathLike, result: dict) -> None:
    """Add an evaluation of the export in ``export_dir`` to its export.json and MODEL_CARD.md."""
    import yaml

    export_dir = Path(export_dir)
    meta = json.loads((export_dir / META).read_text())
    meta.setdefault("evals", {})[f"eval_{result['kind']}"] = _eval_summary(result)
    cfg_path = export_dir / "config.yaml"
    train_cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else None
    storage.write_bytes(export_dir / "MODEL_CARD.md", model_card(meta, train_cfg).encode())
    storage.write_bytes(export_dir / META, (json.dumps(meta, indent=2) + "\n").encode())


def _found_evals(loaded: Loaded) -> dict[str, dict]:
    """Results `seerlike eval` wrote for this very checkpoint: in its run dir's or its own ``eval/``."""
    source = Path(loaded.source)
    if not is_checkpoint(source):
        return {}
    run_dir = source.parent.parent  # RUN_DIR/checkpoints/step_N
    found = {}
    for d in (source / "eval", run_dir / "eval"):
        for f in sorted(d.glob("eval_*.json")) if d.is_dir() else []:
            result = json.loads(f.read_text())
            if result.get("model") == loaded.source:
                found[f.stem] = result
    return found


def export(source: str | os.PathLike, out: str | os.PathLike, formats: list[str], *, with_head: bool = False,
           image_size: int | None = None, eval_files: list[str] | None = None, tolerance: float = 1e-4,
           progress: bool = True) -> dict:
    """Write ``formats`` of ``source`` into ``out``; returns the export.json content.

    ``image_size`` (the example input of the graph formats and the card's input size) defaults
    to the largest training view of the source's config, else 224.
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ConfigError(f"unknown export format(s) {bad}; choose from {', '.join(FORMATS)}")
    if image_size is not None and image_size < 8:
        raise ConfigError(f"--image-size must be >= 8, got {image_size}")
    evals_given = {}
    for f in eval_files or []:
        try:
            evals_given[Path(f).stem] = json.loads(Path(f).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--eval {f}: cannot read an evaluation result ({e})") from None
    loaded = load_backbone(source)  # fails on a bad source before anything is written
    if str(source).startswith("random:"):
        log.warning("exporting a randomly initialised %s", loaded.arch)
    state = export_state(loaded, with_head)
    out = Path(os.path.abspath(out))
    if (out / META).exists():
        old = json.loads((out / META).read_text())
        if old.get("arch") != loaded.arch:
            raise ConfigError(f"{out} already holds an export of {old.get('arch')}; use another --out for {loaded.arch}")
    else:
        old = {}
    with storage.reporting_disk_full(out):
        out.mkdir(parents=True, exist_ok=True)
    if old and old.get("source") != loaded.source:
        # files of another checkpoint must not sit beside these under one export.json
        for fmt, name in (old.get("files") or {}).items():
            if fmt not in formats and (out / name).exists():
                log.warning("removing %s: it holds %s, not %s", out / name, old.get("source"), loaded.source)
                (out / name).unlink()
        old = {"arch": old.get("arch")}
    trained = trained_input(loaded.train_config)
    size = image_size or trained["size"] or DEFAULT_IMAGE_SIZE
    size_from = ("as given (--image-size)" if image_size else "as trained (its largest training view)" if trained["size"]
                 else "by default (no training config)")
    k = int(state["fc.weight"].shape[0]) if with_head else None
    channels = int(getattr(loaded.model, "in_channels", 3))
    build = {"name": loaded.arch, "num_classes": k, **({"in_channels": channels} if channels != 3 else {})}
    meta = {
        "arch": loaded.arch, "build": build,
        "torchvision_compatible": torchvision_name(loaded.arch) and channels == 3,
        "out_dim": int(loaded.model.out_dim), "num_params": sum(p.numel() for p in loaded.model.parameters()),
        "fc_shape": list(state["fc.weight"].shape) if with_head else None,
        "outputs": "logits" if with_head else "features",
        "load": ("model = torchvision.models.<arch>(num_classes=K) or seerlike.models.build(arch, num_classes=K); "
                 "model.load_state_dict(state, strict=True)") if with_head else
                ("model = seerlike.models.build(arch) or torchvision.models.<arch>(); model.fc = nn.Identity(); "
                 "model.load_state_dict(state, strict=True)"),
        "source": loaded.source, "step": loaded.step,
        "input": {"size": size, "size_from": size_from, "mean": trained["mean"], "std": trained["std"]},
        "data_manifest_hash": data_manifest_hash(loaded.train_config),
        "files": dict(old.get("files") or {}), "checks": dict(old.get("checks") or {}),
    }
    example = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    graph = _graph_module(loaded, with_head)
    bar = Progress(len(formats), f"export {loaded.arch}", unit="file", enabled=progress)
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
                meta["checks"][fmt] = write_onnx(graph, example, tmp, output=meta["outputs"])
            if meta["checks"].get(fmt, 0.0) > tolerance:
                raise RuntimeError(f"{fmt} export differs from eager by {meta['checks'][fmt]:.3g} (> {tolerance}); not trusted")
        meta["files"][fmt] = FILES[fmt]
        log.info("wrote %s", path)
        bar.update()
    bar.close()
    if loaded.train_config:
        import yaml

        storage.write_bytes(out / "config.yaml", yaml.safe_dump(loaded.train_config, sort_keys=False).encode())
    run_dir = Path(loaded.source).parent.parent  # RUN_DIR/checkpoints/step_N
    if is_checkpoint(Path(loaded.source)) and (run_dir / "metrics.jsonl").exists():
        from seerlike.plots import training_curves

        with storage.atomic_write(out / "training_curves.png") as tmp:
            training_curves(run_dir, tmp)
        meta["curves"] = "training_curves.png"
    evals = {**(old.get("evals") or {}), **{n: _eval_summary(r) for n, r in {**_found_evals(loaded), **evals_given}.items()}}
    if evals:
        meta["evals"] = evals
    storage.write_bytes(out / "MODEL_CARD.md", model_card(meta, loaded.train_config).encode())
    storage.write_bytes(out / META, (json.dumps(meta, indent=2) + "\n").encode())  # last: it marks an export
    return meta
