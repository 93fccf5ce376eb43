"""Frozen-feature evaluation of a backbone (`seerlike eval knn|linear|lowshot`): features, then a classifier.

The model is a checkpoint dir, a run dir (its newest complete checkpoint), an export dir or
``random:ARCH`` (the baseline every pretraining must beat). The train / val sets are labelled
image sources (a ``path,label`` CSV or a class-folder tree) or features directories written
by ``seerlike extract`` from labelled sources. Writing the result and drawing its confusion
matrix is the caller's (seerlike.api.evaluate).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from seerlike import storage
from seerlike.config import ConfigError
from seerlike.eval.extract import ExtractConfig, feature_fn, list_units, unit_features
from seerlike.eval.features import META, FeatureStore
from seerlike.eval.knn import KNNConfig, knn_eval
from seerlike.eval.linear import LinearConfig, LowShotConfig, linear_eval, lowshot_eval
from seerlike.progress import Progress

log = logging.getLogger(__name__)

KINDS = ("knn", "linear", "lowshot")
#: what ``--train`` / ``--val`` take, in short (the command's help and its preflight; errors give labelled_sources)
LABELLED_INPUTS = "class folders, a path,label CSV, a dataset ingested from such a CSV, or a features dir"


def labelled_sources(kind: str = "knn") -> str:
    """The labelled inputs `seerlike eval KIND` takes, one example command each (the end of its input errors)."""
    return (f"give labelled images as one of:\n"
            f"  - class folders (DIR/CLASS/IMAGE): seerlike eval {kind} --model M --train data/train --val data/val\n"
            f"  - a path,label CSV: seerlike eval {kind} --model M --train train.csv --val val.csv\n"
            f"  - a dataset ingested from a path,label CSV (each sample's .json keeps its label; an ingested folder "
            f"keeps no class): seerlike ingest train.csv --out ds/train && seerlike ingest val.csv --out ds/val && "
            f"seerlike eval {kind} --model M --train ds/train --val ds/val\n"
            f"  - features dirs extracted from one of these: seerlike extract --checkpoint M --data train.csv "
            f"--out feats/train && seerlike extract --checkpoint M --data val.csv --out feats/val && "
            f"seerlike eval {kind} --train feats/train --val feats/val")


def labelled_features(loaded, source: str, cfg: ExtractConfig, what: str,
                      progress: bool = False, kind: str = "knn") -> tuple[torch.Tensor, list[str]]:
    """Features and class names of every sample of a labelled source (or a features dir)."""
    if (Path(source) / META).exists():
        store = FeatureStore(source)
        if (store.meta.get("model"), store.meta.get("layer")) != (loaded.source, cfg.layer):
            raise ConfigError(f"--{what} features {source} come from {store.meta.get('model')} "
                              f"({store.meta.get('layer')}), not from {loaded.source} ({cfg.layer})")
        data = store.load()
        keys, labels, feats = data.keys, data.labels, data.features
    else:
        fn = feature_fn(loaded, cfg.layer)
        keys, labels, parts = [], [], []
        units = list_units(source, cfg.chunk_size)
        total = sum(u.size for u in units) if all(u.size is not None for u in units) else None
        with Progress(total, f"eval features --{what}", enabled=progress) as bar:
            for unit in units:
                k, lb, f = unit_features(fn, unit, size=cfg.image_size, resize=cfg.resize_side,
                                         batch_size=cfg.batch_size, device=torch.device("cpu"), on_batch=bar.update)
                keys += k
                labels += lb
                parts.append(f)
        if not parts:
            raise ConfigError(f"--{what} {source} holds no images")
        feats = np.concatenate(parts)
    missing = sum(lb is None for lb in labels)
    if missing:
        raise ConfigError(f"--{what} {source}: {missing} of {len(labels)} samples have no label; "
                          f"{labelled_sources(kind)}")
    return torch.from_numpy(np.asarray(feats, dtype=np.float32)), labels


def confusion_matrix(true: list[int], pred: list[int], num_classes: int) -> np.ndarray:
    """Counts ``cm[t, p]`` of validation samples of class ``t`` predicted as ``p``."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(true, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return cm


def _source(path: str | os.PathLike) -> str:
    return storage.absolute(path)


def evaluate(kind: str, model: str | os.PathLike | None, train: str | os.PathLike, val: str | os.PathLike, *,
             extract_cfg: ExtractConfig, knn: KNNConfig | None = None, linear: LinearConfig | None = None,
             lowshot: LowShotConfig | None = None, progress: bool = True) -> dict:
    """Run one evaluation; the result holds the metrics, what was evaluated and the confusion matrix."""
    from seerlike.checkpoints import Loaded, load_backbone

    if kind not in KINDS:
        raise ConfigError(f"unknown evaluation {kind!r}; choose from {', '.join(KINDS)}")
    train, val = _source(train), _source(val)
    stores = [FeatureStore(p) for p in (train, val) if (Path(p) / META).exists()]
    if model is None:  # precomputed features only: both must come from the same model and layer
        if len(stores) != 2:
            raise ConfigError("give --model, or features dirs (from `seerlike extract`) as both --train and --val")
        a, b = (s.meta for s in stores)
        if (a.get("model"), a.get("layer")) != (b.get("model"), b.get("layer")):
            raise ConfigError(f"--train features come from {a.get('model')} ({a.get('layer')}) but --val features "
                              f"from {b.get('model')} ({b.get('layer')})")
        loaded = Loaded(None, a.get("arch"), a.get("model"), step=a.get("step"))
        extract_cfg = ExtractConfig(**{**extract_cfg.__dict__, "layer": a.get("layer"), "image_size": a.get("image_size")})
    else:
        loaded = load_backbone(model)
    for what, src in (("train", train), ("val", val)):
        if "://" not in src and not Path(src).exists():
            raise ConfigError(f"--{what} {src} does not exist; {labelled_sources(kind)}")
    torch.set_grad_enabled(False)
    try:
        tx, tnames = labelled_features(loaded, train, extract_cfg, "train", progress=progress, kind=kind)
        vx, vnames = labelled_features(loaded, val, extract_cfg, "val", progress=progress, kind=kind)
    finally:
        torch.set_grad_enabled(True)
    classes = sorted(set(tnames))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(vnames) - set(classes))
    if unknown:
        raise ConfigError(f"--val has classes absent from --train: {unknown[:5]}")
    ty = torch.tensor([index[n] for n in tnames])
    vy = torch.tensor([index[n] for n in vnames])
    if kind == "knn":
        cfg = knn or KNNConfig()
        with Progress(len(vy), "kNN queries", unit="img", enabled=progress) as bar:
            metrics, pred = knn_eval(tx, ty, vx, vy, len(classes), cfg, on_chunk=bar.update)
    elif kind == "linear":
        cfg = linear or LinearConfig()
        with Progress(cfg.epochs, "linear probe", unit="epoch", enabled=progress) as bar:
            metrics, pred = linear_eval(tx, ty, vx, vy, len(classes), cfg, on_epoch=bar.update)
    else:
        cfg = lowshot or LowShotConfig()
        with Progress(len(cfg.shots) * cfg.draws, "low-shot probes", unit="probe", enabled=progress) as bar:
            metrics, pred = lowshot_eval(tx, ty, vx, vy, len(classes), cfg, on_probe=bar.update)
    return {
        "kind": kind, "model": loaded.source, "arch": loaded.arch, "step": loaded.step, "layer": extract_cfg.layer,
        "train": train, "val": val, "num_train": len(ty), "num_val": len(vy), "num_classes": len(classes),
        "metrics": metrics, "config": asdict(cfg), "image_size": extract_cfg.image_size, "classes": classes,
        "confusion": confusion_matrix(vy.tolist(), pred.tolist(), len(classes)).tolist(),
    }
