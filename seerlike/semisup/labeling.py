"""A teacher labels unlabeled images: resumable work units, a confidence threshold, class balancing.

Noisy Student's first step (docs/semisup.md). The teacher is not noised: every image gets the
evaluation transform (``method.label_image_size`` / ``label_resize``) and the teacher's classifier in eval
mode. Work units are extraction's (one per shard, or ``chunk_size`` files of a folder / CSV;
:func:`seerlike.eval.extract.list_units`): rank r of W predicts units ``u % W == r`` into
``PARTS/unit.parquet`` (atomically; a rerun, with any number of ranks, skips finished units), then
rank 0 merges them, in unit order, into one parquet:

====================  =======================================================================
column                meaning
====================  =======================================================================
``key``               the sample key (what the data pipeline joins on)
``label``             int32: the teacher's top class
``confidence``        float32: its probability
``copies``            int32: how often class balancing counts the image (>= 1)
``weight``            float32: ``copies`` scaled to mean 1 over the file (the student's loss weight)
``probs``             list<float32>: the teacher's distribution (soft pseudo-labels only)
====================  =======================================================================

Rows are sorted by key, so the file depends only on the predictions and the settings. Selection
(:func:`select`): images below ``threshold`` are dropped (paper: 0.3); with ``per_class`` N > 0 a
class with more than N images keeps its N most confident (ties by key), a class with n < N keeps
all with N // n copies each and one more for N mod n of them drawn with ``seed``, so that every
class counts N images (Xie et al. 2020, section 3 "data filtering and balancing").

A small JSON beside the parquet (``.json``) records the teacher, the settings and per-class counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from seerlike import storage
from seerlike.config import ConfigError
from seerlike.progress import Progress

log = logging.getLogger(__name__)

PARTS_META = "meta.json"


@dataclass(kw_only=True)
class LabelSettings:
    """How the teacher's predictions become pseudo-labels (NoisyStudent.Config and the data config give them)."""

    threshold: float = 0.3
    """Drop images whose top-class probability is below this."""
    per_class: int = 0
    """Images per class after balancing; 0 = no balancing."""
    soft: bool = True
    """Keep the teacher's whole distribution (soft pseudo-labels)."""
    seed: int = 0
    """Seed of the duplicates drawn by class balancing."""
    image_size: int = 224
    """Centre crop the teacher sees."""
    resize: int = 256
    """Shorter side before the crop."""
    batch_size: int = 256
    """Images per teacher forward."""
    chunk_size: int = 4096
    """Files per work unit (folders, CSVs; shards are one unit each)."""

    def prediction_key(self) -> dict:
        """The settings the stored predictions depend on (threshold and balancing apply at the merge)."""
        return {"image_size": self.image_size, "resize": self.resize, "chunk_size": self.chunk_size}


# ---------------------------------------------------------------- where the file goes


def default_path(unlabeled: str, run_dir: str | os.PathLike, tag: str) -> Path:
    """``DATASET/pseudo_labels/TAG.parquet`` beside the manifest of a local ingested dataset, else
    ``RUN_DIR/pseudo_labels/TAG.parquet`` (folders, CSVs, shard patterns, s3:// data are not written into)."""
    from seerlike.data.sources import is_dataset

    local = unlabeled.removeprefix("file://")
    local_dataset = not storage.is_s3_url(unlabeled) and is_dataset(unlabeled)
    if local_dataset and os.path.isfile(os.path.join(local, "manifest.parquet")):
        return Path(os.path.abspath(local)) / "pseudo_labels" / f"{tag}.parquet"
    return Path(os.path.abspath(run_dir)) / "pseudo_labels" / f"{tag}.parquet"


def teacher_tag(source: str, step: int | None, settings: LabelSettings, *, predictions_only: bool = False) -> str:
    """A name for the pseudo-labels of one teacher checkpoint and one set of settings (``predictions_only``:
    of its predictions, which threshold and balancing do not change: their parts are shared)."""
    fields = settings.prediction_key() if predictions_only else asdict(settings)
    text = json.dumps({"teacher": source, "step": step, **fields}, sort_keys=True)
    return f"step{step if step is not None else 0}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------- selection


def select(keys: list[str], probs: np.ndarray, settings: LabelSettings) -> pa.Table:
    """The pseudo-label table (see the module docstring) of predictions ``probs`` (n, K) for ``keys``."""
    n, k = probs.shape
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
    keys = [keys[i] for i in order]
    probs = probs[order].astype(np.float32)
    label = probs.argmax(1).astype(np.int32)
    confidence = probs[np.arange(n), label]
    copies = (confidence >= settings.threshold).astype(np.int64)
    if settings.per_class:
        rng = np.random.default_rng(settings.seed)
        N = settings.per_class
        for c in range(k):
            rows = np.flatnonzero((label == c) & (copies > 0))  # in key order
            if len(rows) > N:  # the N most confident, ties by key
                best = rows[np.lexsort((rows, -confidence[rows]))[:N]]
                copies[rows] = 0
                copies[best] = 1
            elif 0 < len(rows) < N:  # everyone N // n times, N mod n of them once more
                q, r = divmod(N, len(rows))
                copies[rows] = q
                copies[rng.choice(rows, size=r, replace=False)] += 1
    kept = np.flatnonzero(copies > 0)
    weight = copies[kept] * (len(kept) / max(int(copies[kept].sum()), 1))
    columns = {
        "key": pa.array([keys[i] for i in kept], pa.string()),
        "label": pa.array(label[kept], pa.int32()),
        "confidence": pa.array(confidence[kept], pa.float32()),
        "copies": pa.array(copies[kept].astype(np.int32), pa.int32()),
        "weight": pa.array(weight.astype(np.float32), pa.float32()),
    }
    if settings.soft:
        columns["probs"] = pa.FixedSizeListArray.from_arrays(pa.array(probs[kept].reshape(-1), pa.float32()), k)
    return pa.table(columns)


# ---------------------------------------------------------------- prediction and merge


def _write_part(path: Path, keys: list[str], probs: np.ndarray) -> None:
    k = probs.shape[1] if probs.ndim == 2 else 0
    table = pa.table({"key": pa.array(keys, pa.string()),
                      "probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1), pa.float32()), k)})
    with storage.atomic_write(path) as tmp:
        pq.write_table(table, tmp)


def _read_parts(parts: Path, names: list[str]) -> tuple[list[str], np.ndarray]:
    keys, probs = [], []
    for name in names:
        t = pq.read_table(parts / f"{name}.parquet")
        keys += t["key"].to_pylist()
        col = t["probs"].combine_chunks()
        probs.append(col.values.to_numpy(zero_copy_only=False).reshape(len(t), col.type.list_size))
    return keys, (np.concatenate(probs) if probs else np.zeros((0, 0), np.float32))


def _check_parts_meta(parts: Path, meta: dict, rank: int) -> None:
    """The parts folder must hold predictions of this teacher and these settings (else a new tag is needed)."""
    path = parts / PARTS_META
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if diff:
            raise ConfigError(f"{parts} holds predictions of another teacher or other settings ({diff}); "
                              "remove it or write the pseudo-labels elsewhere")
    elif rank == 0:
        storage.write_bytes(path, (json.dumps(meta, indent=1) + "\n").encode())


def label_unlabeled(teacher: str, unlabeled: str, out: str | os.PathLike, settings: LabelSettings, *,
                    rank: int = 0, world_size: int = 1, device: torch.device = torch.device("cpu"),
                    barrier: Callable[[], None] | None = None, progress: bool = True,
                    parts: str | os.PathLike | None = None,
                    after_unit: Callable[[str], None] | None = None) -> dict | None:
    """Write the pseudo-labels of ``unlabeled`` by ``teacher`` to ``out`` (see the module docstring).

    Every rank calls it; rank 0 returns the summary (also written to ``out`` with suffix
    ``.json``), the others None. When ``out`` exists already it is kept (the labels of an
    earlier run of this iteration). ``parts`` is the folder of per-unit predictions (default
    ``OUT_STEM.parts`` beside ``out``; predictions of the same teacher at other thresholds can
    share one). ``after_unit(name)`` runs after each unit is written (tests).
    """
    from seerlike.checkpoints import load_backbone
    from seerlike.eval.extract import feature_fn, list_units, unit_features

    out = Path(os.path.abspath(out))
    summary_path = out.with_suffix(".json")
    if out.exists() and summary_path.exists():
        log.info("pseudo-labels %s exist: kept", out)
        (barrier or (lambda: None))()
        return json.loads(summary_path.read_text()) if rank == 0 else None
    loaded = load_backbone(teacher)
    if loaded.head is None:
        raise ConfigError(f"teacher {teacher} has no classifier head: use a `seerlike finetune` run (or an export "
                          "--with-head) as the teacher")
    loaded.model.to(device)
    loaded.head.to(device)
    fn = feature_fn(loaded, "head")
    units = list_units(unlabeled, settings.chunk_size)
    names = [u.name for u in units]
    parts = Path(os.path.abspath(parts)) if parts else out.with_name(out.stem + ".parts")
    with storage.reporting_disk_full(parts):
        parts.mkdir(parents=True, exist_ok=True)
    meta = {"teacher": loaded.source, "step": loaded.step, "data": storage.absolute(unlabeled),
            **settings.prediction_key()}
    _check_parts_meta(parts, meta, rank)
    mine = [u for i, u in enumerate(units) if i % world_size == rank]
    todo = [u for u in mine if not (parts / f"{u.name}.parquet").exists()]
    log.info("rank %d: labelling %d of its %d units of %s (%d done before)", rank, len(todo), len(mine), unlabeled,
             len(mine) - len(todo))
    total = sum(u.size for u in todo) if all(u.size is not None for u in todo) else None
    with ThreadPoolExecutor(2) as pool, Progress(total, "pseudo-labels", enabled=progress and rank == 0) as bar:
        for unit in todo:
            keys, _, logits = unit_features(fn, unit, size=settings.image_size, resize=settings.resize,
                                            batch_size=settings.batch_size, device=device, pool=pool,
                                            on_batch=bar.update)
            probs = torch.softmax(torch.from_numpy(logits).double(), dim=1).float().numpy() if len(keys) else logits
            _write_part(parts / f"{unit.name}.parquet", keys, probs)
            if after_unit is not None:
                after_unit(unit.name)
    (barrier or (lambda: None))()
    if rank != 0:
        return None
    missing = [n for n in names if not (parts / f"{n}.parquet").exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} pseudo-label units missing after labelling (e.g. {missing[:3]}); "
                           "rerun to resume")
    keys, probs = _read_parts(parts, names)
    if len(set(keys)) != len(keys):
        raise ConfigError(f"duplicate sample keys in {unlabeled}: pseudo-labels are joined by key")
    if not keys:
        raise ConfigError(f"the teacher could not read any image of {unlabeled}")
    table = select(keys, probs, settings)
    with storage.atomic_write(out) as tmp:
        pq.write_table(table, tmp)
    counts = np.bincount(table["label"].to_numpy(), weights=table["copies"].to_numpy(), minlength=probs.shape[1])
    summary = {"path": str(out), "teacher": loaded.source, "teacher_step": loaded.step, "data": meta["data"],
               "settings": asdict(settings), "predicted": len(keys), "kept": len(table),
               "counted": int(counts.sum()), "per_class": [int(c) for c in counts],
               "mean_confidence": float(np.mean(table["confidence"].to_numpy())) if len(table) else 0.0}
    storage.write_bytes(summary_path, (json.dumps(summary, indent=1) + "\n").encode())  # last: marks the file done
    log.info("pseudo-labels: %d of %d images kept (threshold %.2f), %d counted after balancing -> %s",
             len(table), len(keys), settings.threshold, summary["counted"], out)
    return summary


# ---------------------------------------------------------------- reading back


class PseudoLabels:
    """A pseudo-label parquet in memory: ``row_of[key]``, and each row's weighted target distribution."""

    def __init__(self, path: str | os.PathLike, num_classes: int):
        t = pq.read_table(path)
        missing = {"key", "label", "weight"} - set(t.column_names)
        if missing:
            raise ConfigError(f"{path} is not a pseudo-label file (no {sorted(missing)} column)")
        self.path, self.num_classes = str(path), num_classes
        self.keys: list[str] = t["key"].to_pylist()
        self.row_of = {k: i for i, k in enumerate(self.keys)}
        self.label = torch.from_numpy(t["label"].to_numpy().astype(np.int64))
        self.weight = torch.from_numpy(t["weight"].to_numpy().astype(np.float32))
        self.probs = None
        if "probs" in t.column_names:
            col = t["probs"].combine_chunks()
            if col.type.list_size != num_classes:
                raise ConfigError(f"{path} holds {col.type.list_size}-class pseudo-labels; the student has "
                                  f"{num_classes} classes (method.num_classes)")
            self.probs = torch.from_numpy(col.values.to_numpy(zero_copy_only=False).reshape(len(t), num_classes).copy())
        if len(self.label) and int(self.label.max()) >= num_classes:
            raise ConfigError(f"{path} has labels up to {int(self.label.max())}; the student has {num_classes} classes")

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device) -> PseudoLabels:
        self.label, self.weight = self.label.to(device), self.weight.to(device)
        if self.probs is not None:
            self.probs = self.probs.to(device)
        return self

    def targets(self, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), K) float: each row's distribution (soft) or one-hot label (hard) times its weight."""
        rows = rows.to(self.weight.device)
        dist = self.probs[rows] if self.probs is not None else \
            torch.nn.functional.one_hot(self.label[rows], self.num_classes).float()
        return dist * self.weight[rows, None]
