"""The Python API: the same work as the commands, returning what a caller needs next.

    import seerlike
    ds = seerlike.ingest("photos/", out="data/photos")
    run = seerlike.pretrain(data=ds.dataset, out="runs/swav", recipe="tiny_swav",
                            overrides={"loop.max_steps": 100})
    feats = seerlike.extract(run.checkpoint, data=ds.dataset, out="feats/swav")
    knn = seerlike.evaluate("knn", run.checkpoint, train="labelled/train.csv", val="labelled/val.csv")
    exp = seerlike.export(run.checkpoint, out="exports/swav", formats=["torchvision", "onnx"])

Each function is what its command (`seerlike ingest | train | extract | eval | export | finetune |
selftrain`) runs; ``finetune`` and ``selftrain`` are the semi-supervised stages (docs/semisup.md).
Bad input raises :class:`seerlike.config.ConfigError` with the message the command prints
(the command exits with status 2), before anything is written. Paths in the results are
absolute. docs/api.md walks through a whole session.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seerlike import storage
from seerlike.config import ConfigError
from seerlike.preflight import check_train_inputs, with_absolute_paths

__all__ = ["ingest", "pretrain", "extract", "evaluate", "export", "finetune", "selftrain",
           "IngestResult", "PretrainResult", "ExtractResult", "EvalResult", "ExportResult", "SelfTrainResult"]

PathLike = str | os.PathLike


def _overrides(overrides: dict[str, Any] | Sequence[str] | None) -> list[str]:
    """``{"a.b": v}`` or ``["a.b=v"]`` -> ``["a.b=v"]`` (lists and dicts as JSON, which the parser reads)."""
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        return [f"{k}={json.dumps(v) if isinstance(v, (list, dict, tuple)) else v}" for k, v in overrides.items()]
    return list(overrides)


def _settings(cls: type, settings: dict[str, Any], what: str):
    """``cls`` from its defaults and ``settings`` (field -> value), with the config machinery's checks."""
    from seerlike import config as configlib

    data = configlib.to_dict(cls())
    for key, value in settings.items():
        if key not in data:
            raise ConfigError(f"{what}: unknown setting {key!r}; valid: {', '.join(sorted(data))}")
        data[key] = configlib.to_dict(value)
    return configlib.from_dict(cls, data)


# ---------------------------------------------------------------- ingest


@dataclass
class IngestResult:
    """An ingested dataset: WebDataset shards + a parquet manifest + a summary."""

    dataset: str
    """The dataset folder or s3:// prefix (pass it as ``data=`` to pretrain / extract)."""
    manifest: str
    """Its manifest.parquet: one row per input (key, shard, size, status, reason, ...)."""
    written: int
    """Images written into shards."""
    shards: int
    """Shard files written."""
    summary: dict = field(default_factory=dict)
    """The whole summary.json (seen, duplicate, rejected by reason, bytes, speed)."""


def ingest_config(sources: PathLike | Sequence[PathLike], out: PathLike, *, workers: int | None = None,
                  endpoint_url: str | None = None, progress: bool = True,
                  overrides: dict[str, Any] | Sequence[str] | None = None):
    """The validated IngestConfig of an :func:`ingest` call (`seerlike submit ingest` builds it too)."""
    from seerlike import config as configlib
    from sharding.config import IngestConfig

    items = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    inputs = tuple(storage.absolute(s) for s in items)
    if not inputs:
        raise ConfigError("no inputs given: pass folders, list files, s3://bucket/prefix or URLs before the overrides")
    cfg = configlib.apply_overrides(IngestConfig(inputs=inputs, out=storage.absolute(out)), _overrides(overrides))
    if workers is not None:
        cfg = configlib.apply_overrides(cfg, [f"workers={workers}"])
    if endpoint_url:
        cfg = cfg.replace(endpoint_url=endpoint_url)
    if not progress:
        cfg = cfg.replace(progress=False)
    missing = [s for s in cfg.inputs if "://" not in s and not os.path.exists(s)]
    if missing:
        raise ConfigError(f"input {missing[0]} does not exist" + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "")
                          + "; give folders, list files (.txt/.csv/.parquet), s3://bucket/prefix or http(s) URLs")
    return cfg


def ingest(sources: PathLike | Sequence[PathLike], out: PathLike, *, workers: int | None = None,
           endpoint_url: str | None = None, progress: bool = True,
           overrides: dict[str, Any] | Sequence[str] | None = None) -> IngestResult:
    """Ingest images (folders, list files, s3:// prefixes, URLs; one or a list) into ``out``.

    ``overrides`` sets IngestConfig keys (``{"resize_short_side": 384}``); rerunning resumes.
    Equivalent to ``seerlike ingest SOURCES... --out OUT``.
    """
    from sharding.ingest import ingest as run_ingest
    from sharding.manifest import MANIFEST

    cfg = ingest_config(sources, out, workers=workers, endpoint_url=endpoint_url, progress=progress,
                        overrides=overrides)
    summary = run_ingest(cfg)
    dataset = summary["dataset"]
    return IngestResult(dataset=dataset, manifest=storage.join(dataset, MANIFEST), written=summary["written"],
                        shards=summary["shards"], summary=summary)


# ---------------------------------------------------------------- pretrain


def train_config(recipe: str | None, run_dir: PathLike, overrides: Sequence[str] = ()):
    """The validated TrainConfig of a run: a recipe (or RUN_DIR/config.yaml without one) + ``key=value`` overrides."""
    from seerlike import config as configlib
    from seerlike import recipes
    from seerlike.engine.config import TrainConfig

    saved = os.path.join(run_dir, "config.yaml")
    if recipe:
        cfg = recipes.get(recipe)
        if not isinstance(cfg, TrainConfig):
            raise configlib.ConfigError(f"recipe {recipe!r} is not a training recipe ({type(cfg).__name__})")
    elif os.path.exists(saved):
        cfg = configlib.load(saved, TrainConfig)
    else:
        raise configlib.ConfigError(f"give --recipe NAME (no {saved} to continue from)")
    return configlib.apply_overrides(cfg, list(overrides))


def _child_argv(recipe: str | None, run_dir: PathLike, overrides: list[str]) -> list[str]:
    """The command each local rank runs (the launcher sets RANK and friends)."""
    argv = [sys.executable, "-m", "seerlike", "train", "--run-dir", str(run_dir)]
    if recipe:
        argv += ["--recipe", recipe]
    return argv + list(overrides)


@dataclass
class PretrainResult:
    """What a training run left behind."""

    run_dir: Path
    """The run folder (config.yaml, metrics.jsonl, checkpoints/)."""
    checkpoint: Path | None
    """The newest complete checkpoint (feed it to extract / evaluate / export), or None."""
    step: int
    """Optimizer steps the run has completed."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The last metrics row (loss, lr, images/s, ...)."""
    config: Any = None
    """The resolved TrainConfig the run used."""
    stopped: bool = False
    """A stop signal ended the run early (it resumes from its checkpoint when called again)."""


def pretrain(data: PathLike | None = None, out: PathLike = "runs/pretrain", *,
             recipe: str | None = None, overrides: dict[str, Any] | Sequence[str] | None = None,
             nproc: int = 1) -> PretrainResult:
    """Train (or continue) the run in ``out``: a recipe (`seerlike config --list`), the images, overrides.

    Without ``recipe`` the run continues from ``out/config.yaml``. ``nproc > 1`` starts that
    many local ranks, as ``seerlike train --nproc``. Equivalent to ``seerlike train``.
    The configuration and the inputs (data, pseudo-labels, a distillation teacher) are checked
    before the run folder is created.
    """
    if nproc < 1:
        raise ConfigError(f"nproc must be >= 1, got {nproc}")
    extra = ([f"data.source={storage.absolute(data)}"] if data is not None else []) + _overrides(overrides)
    out = Path(os.path.abspath(out))
    cfg = with_absolute_paths(train_config(recipe, out, extra))  # fails on bad input before anything starts
    if int(os.environ.get("RANK", "0")) == 0:
        check_train_inputs(cfg)
    if nproc > 1 and "RANK" not in os.environ:
        from seerlike.commands.ranks import launch

        rc = launch(_child_argv(recipe, out, extra), nproc)
    else:
        from seerlike.engine.loop import train
        from seerlike.eval.knn_monitor import knn_scorer

        rc = train(cfg, out, scorer=knn_scorer(cfg.eval))
    return _run_result(out, cfg, rc)


def _run_result(out: Path, cfg: Any, rc: int) -> PretrainResult:
    """What the training run in ``out`` left behind, once it returned ``rc``."""
    from seerlike.engine import checkpoint
    from seerlike.engine.loop import REQUEUE_EXIT_CODE

    if rc not in (0, REQUEUE_EXIT_CODE):
        raise RuntimeError(f"training in {out} failed with exit status {rc}; see its log")
    latest = checkpoint.latest(out)
    rows = []
    if (out / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = next((r for r in reversed(rows) if "loss" in r), rows[-1] if rows else {})
    return PretrainResult(run_dir=out, checkpoint=Path(latest) if latest else None,
                          step=checkpoint.step_of(latest) if latest else 0, metrics=last, config=cfg,
                          stopped=rc == REQUEUE_EXIT_CODE)


# ---------------------------------------------------------------- extract


@dataclass
class ExtractResult:
    """A features directory (read it with ``seerlike.eval.features.FeatureStore(out).load()``)."""

    out: Path
    """The features directory (meta.json, one parquet index + .npy matrix per chunk)."""
    layer: str
    """Which features: res4 / res5 / pool / head."""
    dim: int
    """Feature width."""
    num_samples: int
    """Samples extracted (undecodable images are logged and left out)."""
    meta: dict = field(default_factory=dict)
    """The whole meta.json (model, arch, step, data, image size, chunks)."""


def extract(model: PathLike, data: PathLike, out: PathLike, *, progress: bool = True,
            **settings: Any) -> ExtractResult | None:
    """Features of every sample of ``data`` from ``model`` (checkpoint, run dir, export dir or ``random:ARCH``).

    ``settings`` are ExtractConfig fields (``layer="res5"``, ``image_size=224``, ``batch_size``,
    ...; `seerlike config --reference` lists them). Under torchrun or Slurm every rank calls it
    and rank 0 gets the result (the others None). Rerunning resumes. Equivalent to
    ``seerlike extract``.
    """
    import torch.distributed as dist

    from seerlike.engine.dist import init_distributed, teardown
    from seerlike.eval.extract import ExtractConfig
    from seerlike.eval.extract import extract as run_extract

    cfg = _settings(ExtractConfig, settings, "extract")
    owns_group = not dist.is_initialized()
    info = init_distributed()
    try:
        meta = run_extract(str(model), str(data), out, cfg, rank=info.rank, world_size=info.world_size,
                           device=info.device, barrier=dist.barrier if info.world_size > 1 else None,
                           progress=progress)
    finally:
        if owns_group:
            teardown()
    if meta is None:
        return None
    return ExtractResult(out=Path(os.path.abspath(out)), layer=meta["layer"], dim=meta["dim"],
                         num_samples=meta["num_samples"], meta=meta)


# ---------------------------------------------------------------- evaluate


@dataclass
class EvalResult:
    """One evaluation: its metrics and the files it wrote."""

    kind: str
    """knn / linear / lowshot."""
    metrics: dict
    """knn, linear: ``{"top1": %, "top5": %}``; lowshot: ``{"Nshot": {"top1", "top1_std", "top5"}}``."""
    out: Path
    """Where the files went."""
    files: list[Path] = field(default_factory=list)
    """``eval_KIND.json`` (everything, with the confusion matrix) and ``confusion_KIND.png``."""
    result: dict = field(default_factory=dict)
    """The whole record: model, arch, step, layer, data, class names, config, confusion matrix."""


def evaluate(kind: str, model: PathLike | None = None, *, train: PathLike, val: PathLike,
             out: PathLike | None = None, layer: str = "pool", image_size: int = 224, resize: int | None = None,
             batch_size: int = 256, k: int | None = None, temperature: float | None = None,
             epochs: int | None = None, lr: float | None = None, shots: Sequence[int] = (1, 5, 10),
             draws: int | None = None, seed: int = 0, progress: bool = True) -> EvalResult:
    """kNN / linear / low-shot evaluation of ``model``'s frozen features, ``train`` -> ``val``.

    ``train`` / ``val``: labelled images (class folders, a ``path,label`` CSV or a dataset ingested
    from one) or features dirs from :func:`extract` (then ``model`` may be None). Writes
    ``eval_KIND.json`` and ``confusion_KIND.png`` into ``out`` (default MODEL/eval); an export
    dir's model card records the result. Equivalent to ``seerlike eval KIND``.
    """
    import numpy as np

    from seerlike.checkpoints import is_export
    from seerlike.eval.evaluate import evaluate as run_eval
    from seerlike.eval.extract import ExtractConfig
    from seerlike.eval.knn import KNNConfig
    from seerlike.eval.linear import LinearConfig, LowShotConfig
    from seerlike.plots import confusion_png

    try:
        extract_cfg = ExtractConfig(layer=layer, image_size=image_size, resize=resize, batch_size=batch_size)
        knn = KNNConfig(**{n: v for n, v in (("k", k), ("temperature", temperature)) if v is not None})
        linear = LinearConfig(epochs=epochs or LinearConfig.epochs, lr=lr or LinearConfig.lr, seed=seed)
        probe = LowShotConfig().probe
        lowshot = LowShotConfig(shots=tuple(int(s) for s in shots), draws=draws or LowShotConfig.draws, seed=seed,
                                probe=dataclasses.replace(probe, epochs=epochs or probe.epochs, lr=lr or probe.lr,
                                                          seed=seed))
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    if out is None:
        if model is None or str(model).startswith("random:"):
            raise ConfigError("give --out (there is no model directory to write the results into)")
        out = Path(model) / "eval"
    out = Path(os.path.abspath(out))
    result = run_eval(kind, model, train, val, extract_cfg=extract_cfg, knn=knn, linear=linear, lowshot=lowshot,
                      progress=progress)
    with storage.reporting_disk_full(out):
        out.mkdir(parents=True, exist_ok=True)
    png = out / f"confusion_{kind}.png"
    with storage.atomic_write(png) as tmp:
        confusion_png(np.asarray(result["confusion"]), result["classes"], tmp,
                      title=f"{kind} {result['arch']} ({result['layer']})")
    result["confusion_png"] = str(png)
    path = out / f"eval_{kind}.json"
    storage.write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())
    if model is not None and is_export(Path(result["model"])):
        from seerlike.exporter import record_eval

        record_eval(result["model"], result)
    return EvalResult(kind=kind, metrics=result["metrics"], out=out, files=[path, png], result=result)


# ---------------------------------------------------------------- export


@dataclass
class ExportResult:
    """An export dir: weight files, export.json, MODEL_CARD.md, config.yaml."""

    out: Path
    """The export directory (load it back with ``seerlike.checkpoints.load_backbone(out)``)."""
    files: dict[str, Path] = field(default_factory=dict)
    """Format -> file (torchvision backbone.pth, safetensors, torchscript, onnx)."""
    arch: str = ""
    """Backbone name (torchvision's where it has one)."""
    checks: dict[str, float] = field(default_factory=dict)
    """Graph formats: max |export - eager| on probe inputs."""
    meta: dict = field(default_factory=dict)
    """The whole export.json (build kwargs, input size and normalisation, evaluations)."""


def export(model: PathLike, out: PathLike, *, formats: str | Sequence[str] = ("torchvision",),
           with_head: bool = False, image_size: int | None = None, evals: Sequence[PathLike] = (),
           progress: bool = True) -> ExportResult:
    """Write ``model`` (checkpoint, run dir or ``random:ARCH``) in ``formats`` into ``out``.

    ``formats``: any of torchvision, safetensors, torchscript, onnx (a list, a comma-separated
    string or ``"all"``). ``with_head`` adds the classifier (ClusterFit) as ``fc``.
    ``image_size`` defaults to the size the model was trained at. ``evals``: eval_*.json files
    to put in the model card (those in the run's eval/ folder are found by themselves).
    Equivalent to ``seerlike export``.
    """
    from seerlike.exporter import FORMATS
    from seerlike.exporter import export as run_export

    if isinstance(formats, str):
        formats = list(FORMATS) if formats == "all" else [f.strip() for f in formats.split(",") if f.strip()]
    meta = run_export(str(model), out, list(formats), with_head=with_head, image_size=image_size,
                      eval_files=[str(e) for e in evals], progress=progress)
    out = Path(os.path.abspath(out))
    return ExportResult(out=out, files={fmt: out / name for fmt, name in meta["files"].items()}, arch=meta["arch"],
                        checks=dict(meta["checks"]), meta=meta)


# ---------------------------------------------------------------- semi-supervised stages


@dataclass
class SelfTrainResult(PretrainResult):
    """A semi-supervised run: ``run_dir`` / ``checkpoint`` hold its final model (Noisy Student: the last student)."""

    method: str = ""
    """fixmatch or noisy_student."""
    iterations: list[Path] = field(default_factory=list)
    """Noisy Student: each iteration's student run (the teacher of the next)."""
    pseudo_labels: list[Path] = field(default_factory=list)
    """Noisy Student: each iteration's pseudo-label parquet."""


def _lr_argv(backbone_lr: float | None, layer_decay: float | None) -> list[str]:
    return ((["--backbone-lr", str(backbone_lr)] if backbone_lr is not None else [])
            + (["--layer-decay", str(layer_decay)] if layer_decay is not None else []))


def _stage_ranks(argv: list[str], nproc: int, run_local) -> int:
    """``run_local()`` in this process, or ``seerlike ARGV`` on ``nproc`` local ranks."""
    if nproc < 1:
        raise ConfigError(f"nproc must be >= 1, got {nproc}")
    if nproc > 1 and "RANK" not in os.environ:
        from seerlike.commands.ranks import launch

        return launch([sys.executable, "-m", "seerlike", *argv], nproc)
    return run_local()


def finetune(data: PathLike, out: PathLike = "runs/finetune", *, init: PathLike | str = "",
             recipe: str | None = None, overrides: dict[str, Any] | Sequence[str] | None = None,
             backbone_lr: float | None = None, layer_decay: float | None = None, nproc: int = 1) -> PretrainResult:
    """Fine-tune ``init`` (a checkpoint, run or export dir, or ``random:ARCH``) on labeled ``data``.

    ``data``: class folders or a ``path,label`` CSV (its classes set ``method.num_classes``).
    ``backbone_lr`` scales the trunk's LR against the head's; ``layer_decay`` < 1 lowers it block by
    block towards the stem (both become ``optim.lr_multipliers``). Rerunning continues the run.
    Equivalent to ``seerlike finetune``; the recipe defaults to ``finetune_tiny``.
    """
    from seerlike.semisup import stages

    out = Path(os.path.abspath(out))
    extra = _overrides(overrides)
    cfg = stages.finetune_config(data=str(data), init=str(init), recipe=recipe, overrides=extra,
                                 layer_lr=stages.LayerLR.of(backbone_lr, layer_decay))
    if int(os.environ.get("RANK", "0")) == 0:
        stages.check_inputs(cfg)
    argv = ["finetune", "--data", str(data), "--run-dir", str(out), *(["--init", str(init)] if init else []),
            *(["--recipe", recipe] if recipe else []), *_lr_argv(backbone_lr, layer_decay), *extra]
    rc = _stage_ranks(argv, nproc, lambda: stages.run(cfg, out))
    return _run_result(out, cfg, rc)


def selftrain(method: str, labeled: PathLike, unlabeled: PathLike, out: PathLike = "runs/selftrain", *,
              init: PathLike | str = "", teacher: PathLike | str = "", recipe: str | None = None,
              overrides: dict[str, Any] | Sequence[str] | None = None, backbone_lr: float | None = None,
              layer_decay: float | None = None, nproc: int = 1, progress: bool = True) -> SelfTrainResult:
    """Semi-supervised training on ``labeled`` + ``unlabeled`` images: ``method`` fixmatch or noisy_student.

    FixMatch starts from ``init`` (a pretrained model); Noisy Student needs a ``teacher`` (a
    fine-tuned classifier, e.g. :func:`finetune`'s run) and starts each student from ``init`` when the
    architectures match. ``overrides`` set any key (``method.iterations``, ``method.students``,
    ``method.threshold``, ...). Rerunning continues where it stopped. Equivalent to
    ``seerlike selftrain --method METHOD``; the recipe defaults to ``METHOD_tiny``.
    """
    from seerlike.semisup import stages

    out = Path(os.path.abspath(out))
    extra = _overrides(overrides)
    layer_lr = stages.LayerLR.of(backbone_lr, layer_decay)
    cfg = stages.selftrain_config(method, labeled=str(labeled), unlabeled=str(unlabeled), init=str(init),
                                  teacher=str(teacher), recipe=recipe, overrides=extra, layer_lr=layer_lr)
    if int(os.environ.get("RANK", "0")) == 0:
        stages.check_inputs(cfg)
    argv = ["selftrain", "--method", method, "--labeled", str(labeled), "--unlabeled", str(unlabeled),
            "--run-dir", str(out), *(["--init", str(init)] if init else []),
            *(["--teacher", str(teacher)] if teacher else []), *(["--recipe", recipe] if recipe else []),
            *_lr_argv(backbone_lr, layer_decay), *extra]
    rc = _stage_ranks(argv, nproc, lambda: stages.run(cfg, out, layer_lr=layer_lr, progress=progress))
    final = _run_result(stages.final_model(cfg, out), cfg, rc)
    iterations, labels = [], []
    if method == "noisy_student":
        iterations = [stages.iteration_dir(out, k) for k in range(1, cfg.method.iterations + 1)
                      if stages.iteration_dir(out, k).is_dir()]
        labels = [Path(c.method.pseudo_labels) for c in (_saved_config(d) for d in iterations) if c is not None]
    return SelfTrainResult(**{f.name: getattr(final, f.name) for f in dataclasses.fields(PretrainResult)},
                           method=method, iterations=iterations, pseudo_labels=labels)


def _saved_config(run_dir: Path):
    from seerlike import config as configlib
    from seerlike.engine.config import TrainConfig

    path = run_dir / "config.yaml"
    return configlib.load(path, TrainConfig) if path.is_file() else None
