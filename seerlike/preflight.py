"""Checks that a command's inputs exist, run before anything is written or a job is queued.

They are cheap (a stat, a folder listing, one S3 listing request) and say which input is
missing and what was expected, so a stage fails in the terminal that started it rather than
in the queue. The API calls them before it creates an output folder; `seerlike submit` calls
the commands' ``preflight(args)``, built on them, before it queues a job.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from seerlike import config as configlib
from seerlike import storage
from seerlike.config import ConfigError

if TYPE_CHECKING:
    from seerlike.engine.config import TrainConfig


def check_model(spec: str | os.PathLike, flag: str) -> None:
    """A model to read: ``random:ARCH`` with a known ARCH, or an existing checkpoint / run / export dir."""
    spec = str(spec)
    if spec.startswith("random:"):
        from seerlike import models
        from seerlike.checkpoints import parse_random

        arch, _ = parse_random(spec)
        if arch not in models.names():
            raise ConfigError(f"{flag} {spec}: unknown backbone {arch!r}; see `seerlike model-info --list`")
        return
    if not os.path.exists(spec):
        raise ConfigError(f"{flag} {spec} does not exist; give a checkpoint dir, a run dir, an export dir or random:ARCH")


def check_data(source: str | os.PathLike, flag: str, endpoint_url: str | None = None) -> None:
    """Images to read: a folder, a ``path,label`` CSV, shards (local or s3://) or an ingested dataset."""
    source = str(source)
    if not source:
        raise ConfigError(f"no data given: pass {flag} (a folder, a path,label CSV, shards or an ingested dataset)")
    if storage.is_s3_url(source):
        prefix = source.split("{", 1)[0]
        if next(iter(storage.list_files(prefix, endpoint_url=endpoint_url, page_size=1)), None) is None:
            raise ConfigError(f"{flag} {source}: nothing stored under {prefix}")
        return
    if source.endswith(".tar") or "{" in source:
        from seerlike.data.sources import expand_braces

        missing = [u for u in expand_braces(source) if not os.path.exists(u.removeprefix("file://"))]
        if missing:
            raise ConfigError(f"{flag} {source}: shard {missing[0]} does not exist ({len(missing)} missing)")
        return
    from seerlike.data.sources import resolve

    try:
        resolve(source, endpoint_url)  # lists the folder / reads the CSV or the manifest
    except ConfigError as e:
        raise ConfigError(f"{flag}: {e}") from None


def check_path(path: str | os.PathLike, flag: str, what: str) -> None:
    """A local file or folder that must exist (URLs are left to the stage)."""
    path = str(path)
    if path and "://" not in path and not os.path.exists(path):
        raise ConfigError(f"{flag} {path} does not exist; expected {what}")


#: Config keys that name local paths (the inputs, and where checkpoints go): stored absolute, so the
#: run continues from any directory.
PATH_KEYS = ("data.source", "data.labels", "method.teacher", "checkpoint.dir", "eval.train", "eval.val")


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the relative local paths among PATH_KEYS made absolute (URLs and ``random:`` kept)."""
    changes = []
    for key in PATH_KEYS:
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name, None)
        if isinstance(value, str) and value and not value.startswith("random:") and storage.absolute(value) != value:
            changes.append(f"{key}={storage.absolute(value)}")
    return configlib.apply_overrides(cfg, changes) if changes else cfg


def check_train_inputs(cfg: TrainConfig) -> None:
    """A training run's inputs exist: the images, ClusterFit's pseudo-labels, a distillation teacher."""
    check_data(cfg.data.source, "--data (data.source)", cfg.data.s3_endpoint_url)
    check_path(cfg.data.labels, "data.labels", "a `seerlike cluster` output dir or a labels parquet")
    for key in ("train", "val"):  # the kNN monitor's labeled split
        check_path(getattr(cfg.eval, key), f"eval.{key}", "a path,label CSV or a class-folder tree")
    teacher = getattr(cfg.method, "teacher", "")
    if teacher:
        check_model(teacher, "--teacher (method.teacher)")
