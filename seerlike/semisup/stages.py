"""`seerlike finetune` and `seerlike selftrain`: their configs and what each rank runs.

Each stage is a training run of the normal engine (:func:`seerlike.engine.loop.train`: the
step, checkpoints, exact resume, stop signals), with one of the classifier methods:

- fine-tuning: ``finetune`` on the labeled data (``data.source``), the engine's own data pipeline;
- FixMatch: ``fixmatch`` with a labeled and an unlabeled stream (:func:`seerlike.semisup.data.build_mixed_data`);
- Noisy Student: per iteration, the teacher labels the unlabeled images
  (:func:`seerlike.semisup.labeling.label_unlabeled`), then a ``noisy_student`` student trains on
  both in ``RUN_DIR/iterK`` and teaches iteration K + 1. A rerun resumes the unfinished
  iteration: finished pseudo-label files are kept, finished students return at once.

The configs are a recipe + the command's inputs (made absolute, classes read from the labeled
data) + ``key=value`` overrides; ``--backbone-lr`` / ``--layer-decay`` add their
``optim.lr_multipliers`` entries (:func:`seerlike.methods.classifier.lr_multipliers`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from seerlike import config as configlib
from seerlike import storage
from seerlike.config import ConfigError

log = logging.getLogger(__name__)

METHODS = ("fixmatch", "noisy_student")
"""`seerlike selftrain --method` choices."""

DEFAULT_RECIPES = {"finetune": "finetune_tiny", "fixmatch": "fixmatch_tiny", "noisy_student": "noisy_student_tiny"}


@dataclasses.dataclass(frozen=True)
class LayerLR:
    """Trunk LR relative to the head and layer-wise decay (``--backbone-lr``, ``--layer-decay``); 1 and 1: unchanged."""

    backbone_lr: float = 1.0
    layer_decay: float = 1.0

    @classmethod
    def of(cls, backbone_lr: float | None, layer_decay: float | None) -> LayerLR:
        """From the optional ``--backbone-lr`` / ``--layer-decay`` values (None: unchanged)."""
        return cls(1.0 if backbone_lr is None else backbone_lr, 1.0 if layer_decay is None else layer_decay)


# ---------------------------------------------------------------- configs


def _absolute(spec: str | os.PathLike | None) -> str:
    spec = str(spec or "")
    return spec if not spec or spec.startswith("random:") else storage.absolute(spec)


def with_layer_lr(cfg, layer_lr: LayerLR):
    """``cfg`` with the trunk's ``optim.lr_multipliers`` entries for ``layer_lr`` (replacing any ``backbone*`` ones)."""
    if layer_lr == LayerLR():
        return cfg
    from seerlike import models
    from seerlike.methods.classifier import lr_multipliers

    with torch.device("meta"):
        backbone = models.build(cfg.model.name)
    entries = lr_multipliers(backbone, layer_lr.backbone_lr, layer_lr.layer_decay)
    kept = {k: v for k, v in cfg.optim.lr_multipliers.items() if k != "backbone" and not k.startswith("backbone.")}
    return configlib.apply_override(cfg, "optim.lr_multipliers", {**kept, **entries})


def _recipe(name: str, method: str):
    from seerlike import recipes
    from seerlike.engine.config import TrainConfig

    cfg = recipes.get(name)
    if not isinstance(cfg, TrainConfig) or cfg.method.name != method:
        raise ConfigError(f"recipe {name!r} is not a {method} recipe (its method.name must be {method}); "
                          f"e.g. {DEFAULT_RECIPES[method]}")
    return cfg


def _with_labeled(cfg, labeled: str, overrides: Sequence[str]):
    """The recipe + the labeled data and its classes + the user's overrides (which win)."""
    from seerlike.semisup.data import labeled_source

    if not labeled:
        raise ConfigError("no labeled images given: pass --data / --labeled (class folders or a path,label CSV; "
                          "in the semisup_tiny pipeline: --var labeled=...)")
    src = labeled_source(labeled, cfg.data.s3_endpoint_url)
    cfg = configlib.apply_override(cfg, "data.source", labeled)
    cfg = configlib.apply_override(cfg, "method.num_classes", len(src.classes))
    cfg = configlib.apply_override(cfg, "method.classes", list(src.classes))
    return configlib.apply_overrides(cfg, list(overrides))


def finetune_config(*, data: str, init: str = "", recipe: str | None = None, overrides: Sequence[str] = (),
                    layer_lr: LayerLR = LayerLR()):
    """The TrainConfig of `seerlike finetune`: ``data`` labeled (class folders or a path,label CSV), ``init`` the
    pretrained model."""
    cfg = _recipe(recipe or DEFAULT_RECIPES["finetune"], "finetune")
    if init:
        cfg = configlib.apply_override(cfg, "method.init", _absolute(init))
    cfg = _with_labeled(cfg, _absolute(data), overrides)
    return with_layer_lr(cfg, layer_lr)


def selftrain_config(method: str, *, labeled: str, unlabeled: str, init: str = "", teacher: str = "",
                     recipe: str | None = None, overrides: Sequence[str] = (), layer_lr: LayerLR = LayerLR()):
    """The TrainConfig of `seerlike selftrain --method METHOD` (for Noisy Student: of its first iteration)."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    cfg = _recipe(recipe or DEFAULT_RECIPES[method], method)
    cfg = configlib.apply_override(cfg, "method.unlabeled", _absolute(unlabeled))
    if init:
        cfg = configlib.apply_override(cfg, "method.init", _absolute(init))
    if teacher:
        if method != "noisy_student":
            raise ConfigError("--teacher is Noisy Student's (FixMatch starts from --init and needs no teacher)")
        cfg = configlib.apply_override(cfg, "method.teacher", _absolute(teacher))
    cfg = _with_labeled(cfg, _absolute(labeled), overrides)
    if method == "noisy_student" and not cfg.method.teacher:
        raise ConfigError("Noisy Student needs a teacher: --teacher (a `seerlike finetune` run, or an export "
                          "--with-head)")
    if not cfg.method.unlabeled:
        raise ConfigError(f"{method} needs unlabeled images: --unlabeled")
    return with_layer_lr(cfg, layer_lr)


def check_inputs(cfg) -> None:
    """The stage's inputs exist: labeled and unlabeled data, the pretrained model, the teacher (and its classes)."""
    from seerlike.preflight import check_data, check_model

    check_data(cfg.data.source, "--data/--labeled (data.source)", cfg.data.s3_endpoint_url)
    if getattr(cfg.method, "unlabeled", ""):
        check_data(cfg.method.unlabeled, "--unlabeled (method.unlabeled)", cfg.data.s3_endpoint_url)
    if cfg.method.init:
        check_model(cfg.method.init, "--init (method.init)")
    teacher = getattr(cfg.method, "teacher", "")
    if teacher:
        check_model(teacher, "--teacher (method.teacher)")
        if cfg.method.name == "noisy_student":
            check_students_grow(cfg)
        classes = _recorded_classes(teacher)
        if classes and cfg.method.classes and classes != list(cfg.method.classes):
            raise ConfigError(f"teacher {teacher} was trained on classes {classes[:5]}... but the labeled data has "
                              f"{list(cfg.method.classes)[:5]}...; pseudo-labels would name the wrong classes")


def _recorded_classes(spec: str) -> list[str] | None:
    """The class names a classifier run / export recorded in its config.yaml (None when it has none)."""
    import yaml

    path = Path(spec)
    for candidate in (path / "config.yaml", path.parent.parent / "config.yaml"):
        if candidate.is_file():
            saved = yaml.safe_load(candidate.read_text()) or {}
            classes = (saved.get("method") or {}).get("classes") if isinstance(saved, dict) else None
            return list(classes) if classes else None
    return None


# ---------------------------------------------------------------- runs (every rank)


def run(cfg, run_dir: str | os.PathLike, *, layer_lr: LayerLR = LayerLR(), progress: bool = True) -> int:
    """Train the stage of ``cfg`` in ``run_dir`` on the ranks of the environment; 0 or the requeue status."""
    from seerlike.engine.loop import train
    from seerlike.eval.knn_monitor import knn_scorer

    if cfg.method.name == "finetune":
        return train(cfg, run_dir, scorer=knn_scorer(cfg.eval))
    import torch.distributed as dist

    from seerlike.engine.dist import init_distributed, setup_logging, teardown

    owns_group = not dist.is_initialized()
    info = init_distributed()
    if owns_group:
        setup_logging(info.rank)
    if cfg.loop.num_threads:
        torch.set_num_threads(cfg.loop.num_threads)
    try:
        if cfg.method.name == "fixmatch":
            return _train_mixed(cfg, Path(run_dir), info)
        return _noisy_student(cfg, Path(run_dir), info, layer_lr, progress)
    finally:
        if owns_group:
            teardown()


def _train_mixed(cfg, run_dir: Path, info) -> int:
    from seerlike.engine.loop import train
    from seerlike.eval.knn_monitor import knn_scorer
    from seerlike.semisup.data import build_mixed_data

    data = build_mixed_data(cfg, rank=info.rank, world_size=info.world_size, device=info.device)
    return train(cfg, run_dir, data=data, scorer=knn_scorer(cfg.eval))


def iteration_dir(run_dir: str | os.PathLike, k: int) -> Path:
    """The student run of Noisy Student iteration ``k`` (1-based)."""
    return Path(run_dir) / f"iter{k}"


def label_settings(cfg):
    """The labelling settings of a Noisy Student config (the teacher sees a centre crop, no noise)."""
    from seerlike.semisup.labeling import LabelSettings

    m = cfg.method
    return LabelSettings(threshold=m.threshold, per_class=m.per_class, soft=m.soft, seed=cfg.loop.seed,
                         image_size=m.label_image_size, resize=m.label_resize)


def teacher_identity(spec: str) -> tuple[str, int | None]:
    """(the checkpoint or export a teacher spec resolves to, its step), without loading its weights."""
    from seerlike.checkpoints import is_export, resolve_checkpoint
    from seerlike.engine.checkpoint import step_of

    path = Path(os.path.abspath(spec))
    if is_export(path):
        return str(path), json.loads((path / "export.json").read_text()).get("step")
    ckpt = resolve_checkpoint(path)
    return str(ckpt), step_of(ckpt)


def student_arch(cfg, k: int) -> str:
    """The backbone of Noisy Student iteration ``k``'s student (1-based): ``method.students[k-1]`` or ``model.name``."""
    return cfg.method.students[k - 1] if cfg.method.students else cfg.model.name


def trunk_parameters(arch: str) -> int:
    """Parameters of the backbone ``arch`` as built (on the meta device: no memory, no init)."""
    from seerlike import models

    with torch.device("meta"):
        return sum(p.numel() for p in models.build(arch).parameters())


def check_students_grow(cfg) -> None:
    """Noisy Student's rule (Xie et al. 2020, section 2): every iteration's student has at least as many trunk
    parameters as its teacher (the first teacher ``method.teacher``, then the previous student); a ConfigError
    naming both otherwise, unless ``method.allow_smaller_student``."""
    m = cfg.method
    if m.allow_smaller_student:
        return
    teacher_arch, whose = _init_arch(m.teacher), f"the teacher {m.teacher}"
    for k in range(1, m.iterations + 1):
        arch = student_arch(cfg, k)
        theirs, ours = trunk_parameters(teacher_arch), trunk_parameters(arch)
        if ours < theirs:
            raise ConfigError(
                f"Noisy Student iteration {k}: the student {arch} ({ours:,} parameters) is smaller than its teacher "
                f"{teacher_arch} ({theirs:,} parameters; {whose}); the method's students are equal or larger "
                "(docs/semisup.md, 'Noisy Student'). Name a backbone at least as large in method.students "
                "(or model.name), or set method.allow_smaller_student=true to train the smaller one anyway")
        teacher_arch, whose = arch, f"iteration {k}'s student"


def student_config(cfg, k: int, teacher: str, pseudo_labels: str, layer_lr: LayerLR):
    """Iteration ``k``'s student: its backbone, teacher and pseudo-labels; the pretrained init when it fits."""
    m = cfg.method
    arch = student_arch(cfg, k)
    changes = {"model.name": arch, "method.teacher": teacher, "method.pseudo_labels": pseudo_labels}
    init_arch = _init_arch(m.init) if m.init else None
    if m.init and init_arch != arch:
        log.warning("iteration %d: the student %s starts from random init (method.init %s is a %s)", k, arch,
                    m.init, init_arch)
        changes["method.init"] = ""
    for key, value in changes.items():
        cfg = configlib.apply_override(cfg, key, value)
    return with_layer_lr(cfg, layer_lr)


def _init_arch(spec: str) -> str:
    from seerlike.checkpoints import arch_of_config, is_export, parse_random, resolve_checkpoint

    if spec.startswith("random:"):
        return parse_random(spec)[0]
    import yaml

    path = Path(spec)
    if is_export(path):
        return json.loads((path / "export.json").read_text())["arch"]
    ckpt = resolve_checkpoint(path)
    cfg_path = ckpt / "config.yaml" if (ckpt / "config.yaml").is_file() else ckpt.parent.parent / "config.yaml"
    return arch_of_config(yaml.safe_load(cfg_path.read_text()))


def _noisy_student(cfg, run_dir: Path, info, layer_lr: LayerLR, progress: bool) -> int:
    import torch.distributed as dist

    from seerlike.engine.loop import train
    from seerlike.eval.knn_monitor import knn_scorer
    from seerlike.semisup.data import build_mixed_data
    from seerlike.semisup.labeling import default_path, label_unlabeled, teacher_tag

    check_students_grow(cfg)  # before any labelling: every iteration's student is known from the config
    barrier = dist.barrier if info.world_size > 1 else None
    teacher = cfg.method.teacher
    settings = label_settings(cfg)
    for k in range(1, cfg.method.iterations + 1):
        source, step = teacher_identity(teacher)
        out = default_path(cfg.method.unlabeled, run_dir, teacher_tag(source, step, settings))
        parts = out.with_name(teacher_tag(source, step, settings, predictions_only=True) + ".parts")
        log.info("Noisy Student iteration %d of %d: teacher %s (step %s) labels %s -> %s", k, cfg.method.iterations,
                 source, step, cfg.method.unlabeled, out)
        label_unlabeled(teacher, cfg.method.unlabeled, out, settings, rank=info.rank, world_size=info.world_size,
                        device=info.device, barrier=barrier, progress=progress and cfg.loop.progress, parts=parts)
        student = student_config(cfg, k, teacher, str(out), layer_lr)
        data = build_mixed_data(student, rank=info.rank, world_size=info.world_size, device=info.device)
        rc = train(student, iteration_dir(run_dir, k), data=data, scorer=knn_scorer(student.eval))
        if rc != 0:
            return rc
        teacher = str(iteration_dir(run_dir, k))
    return 0


def final_model(cfg, run_dir: str | os.PathLike) -> Path:
    """The run folder that holds a stage's final model (Noisy Student: its last iteration's student)."""
    if cfg.method.name == "noisy_student":
        return iteration_dir(run_dir, cfg.method.iterations)
    return Path(run_dir)
