"""Accuracy of a trained classifier (its own head, not a probe) on labeled images.

The model is any classifier source (`seerlike finetune` / `selftrain` run or checkpoint, an export
``--with-head``); a run that keeps a moving average is scored with it (what it exports). Images
get the evaluation transform (shorter side to ``resize``, centre crop ``image_size``). Class
names are matched by name when the model recorded them (``method.classes``), so a validation CSV
with the same class names scores correctly whatever order its rows are in.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from seerlike.config import ConfigError


def classifier_accuracy(model: str | os.PathLike, data: str | os.PathLike, *, image_size: int = 224,
                        resize: int | None = None, batch_size: int = 256,
                        device: torch.device = torch.device("cpu")) -> dict:
    """``{"top1": %, "top5": %, "n": images, "per_class": {name: %}}`` of ``model``'s head on ``data``."""
    from seerlike.checkpoints import load_backbone
    from seerlike.eval.extract import feature_fn, list_units, unit_features
    from seerlike.semisup.data import labeled_source

    loaded = load_backbone(str(model))
    if loaded.head is None:
        raise ConfigError(f"{model} has no classifier head; score its features with `seerlike eval linear` instead")
    names = labeled_source(str(data)).classes
    recorded = ((loaded.train_config or {}).get("method") or {}).get("classes") or []
    order = list(recorded) if recorded else names
    missing = sorted(set(names) - set(order))
    if missing:
        raise ConfigError(f"{data} has classes the model was not trained on: {missing[:5]}")
    if not recorded and loaded.head.out_features != len(names):
        raise ConfigError(f"{model} predicts {loaded.head.out_features} classes, {data} has {len(names)}")
    loaded.model.to(device)
    loaded.head.to(device)
    fn = feature_fn(loaded, "head")
    truth, preds = [], []
    for unit in list_units(str(data)):
        _, labels, logits = unit_features(fn, unit, size=image_size, resize=resize or image_size,
                                          batch_size=batch_size, device=device)
        truth += [order.index(label) for label in labels]
        preds.append(np.argsort(-logits, axis=1)[:, :5])
    if not truth:
        raise ConfigError(f"no readable image in {data}")
    truth_a, top = np.asarray(truth), np.concatenate(preds)
    hit1 = top[:, 0] == truth_a
    per_class = {order[c]: float(100 * hit1[truth_a == c].mean()) for c in sorted(set(truth))}
    return {"top1": float(100 * hit1.mean()), "top5": float(100 * (top == truth_a[:, None]).any(1).mean()),
            "n": len(truth), "per_class": per_class, "model": loaded.source, "step": loaded.step}
