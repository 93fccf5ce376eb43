"""`seerlike eval knn|linear|lowshot --model M --train T --val V`: frozen-feature evaluation.

``M`` is a checkpoint dir, a run dir (its newest complete checkpoint), an export dir or
``random:ARCH`` (the baseline every pretraining must beat). ``T`` / ``V`` are labelled
image sources (a ``path,label`` CSV or a class-folder tree) or features directories
written by ``seerlike extract`` from labelled sources. Prints the result and writes
``OUT/eval_{kind}.json`` and ``OUT/confusion_{kind}.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from seerlike.config import ConfigError
from seerlike.eval.extract import LAYERS, ExtractConfig, feature_fn, list_units, unit_features
from seerlike.eval.features import META, FeatureStore
from seerlike.eval.knn import KNNConfig, knn_eval
from seerlike.eval.linear import LinearConfig, LowShotConfig, linear_eval, lowshot_eval

log = logging.getLogger(__name__)

KINDS = ("knn", "linear", "lowshot")


def labelled_features(loaded, source: str, cfg: ExtractConfig, what: str) -> tuple[torch.Tensor, list[str]]:
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
        for unit in list_units(source, cfg.chunk_size):
            k, lb, f = unit_features(fn, unit, size=cfg.image_size, resize=cfg.resize_side,
                                     batch_size=cfg.batch_size, device=torch.device("cpu"))
            keys += k
            labels += lb
            parts.append(f)
        feats = np.concatenate(parts)
    missing = sum(lb is None for lb in labels)
    if missing:
        raise ConfigError(f"--{what} {source}: {missing} of {len(labels)} samples have no label; "
                          "give a path,label CSV or a class-folder tree")
    return torch.from_numpy(np.asarray(feats, dtype=np.float32)), labels


def evaluate(kind: str, model: str | None, train: str, val: str, *, extract_cfg: ExtractConfig,
             knn: KNNConfig | None = None, linear: LinearConfig | None = None, lowshot: LowShotConfig | None = None,
             out: str | Path | None = None) -> dict:
    """Run one evaluation; writes the JSON and the confusion matrix when ``out`` is given."""
    from seerlike.export import Loaded, load_backbone
    from seerlike.plots import confusion_matrix, confusion_png

    if kind not in KINDS:
        raise ConfigError(f"unknown evaluation {kind!r}; choose from {', '.join(KINDS)}")
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
    torch.set_grad_enabled(False)
    try:
        tx, tnames = labelled_features(loaded, train, extract_cfg, "train")
        vx, vnames = labelled_features(loaded, val, extract_cfg, "val")
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
        metrics, pred = knn_eval(tx, ty, vx, vy, len(classes), cfg)
    elif kind == "linear":
        cfg = linear or LinearConfig()
        metrics, pred = linear_eval(tx, ty, vx, vy, len(classes), cfg)
    else:
        cfg = lowshot or LowShotConfig()
        metrics, pred = lowshot_eval(tx, ty, vx, vy, len(classes), cfg)
    result = {
        "kind": kind, "model": loaded.source, "arch": loaded.arch, "step": loaded.step, "layer": extract_cfg.layer,
        "train": str(train), "val": str(val), "num_train": len(ty), "num_val": len(vy), "num_classes": len(classes),
        "metrics": metrics, "config": asdict(cfg), "image_size": extract_cfg.image_size, "classes": classes,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        cm = confusion_matrix(vy.tolist(), pred.tolist(), len(classes))
        result["confusion_png"] = str(confusion_png(cm, classes, out / f"confusion_{kind}.png",
                                                    title=f"{kind} {loaded.arch} ({extract_cfg.layer})"))
        (out / f"eval_{kind}.json").write_text(json.dumps({**result, "confusion": cm.tolist()}, indent=2) + "\n")
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--model", help="checkpoint dir, run dir, export dir, or random:ARCH (not needed when "
                   "--train and --val are features dirs)")
    p.add_argument("--train", required=True, help="labelled training images (path,label CSV or class folders) or features dir")
    p.add_argument("--val", required=True, help="labelled validation images or features dir")
    p.add_argument("--out", help="where to write eval_KIND.json and confusion_KIND.png (default: MODEL/eval)")
    p.add_argument("--layer", default="pool", choices=LAYERS)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--resize", type=int, default=None, help="shorter side before the centre crop (default size/0.875)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--k", type=int, default=KNNConfig.k, help="kNN neighbours")
    p.add_argument("--temperature", type=float, default=KNNConfig.temperature, help="kNN vote temperature")
    p.add_argument("--epochs", type=int, default=None, help="linear probe epochs (default 100, low-shot 200)")
    p.add_argument("--lr", type=float, default=LinearConfig.lr, help="linear probe learning rate")
    p.add_argument("--shots", default="1,5,10", help="low-shot examples per class")
    p.add_argument("--draws", type=int, default=LowShotConfig.draws, help="low-shot subsets per shot count")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    try:
        extract_cfg = ExtractConfig(layer=args.layer, image_size=args.image_size, resize=args.resize,
                                    batch_size=args.batch_size)
        knn = KNNConfig(k=args.k, temperature=args.temperature)
        linear = LinearConfig(epochs=args.epochs or LinearConfig.epochs, lr=args.lr, seed=args.seed)
        shots = tuple(int(s) for s in args.shots.split(",") if s.strip())
        probe = LowShotConfig().probe
        lowshot = LowShotConfig(shots=shots, draws=args.draws, seed=args.seed,
                                probe=LinearConfig(epochs=args.epochs or probe.epochs, batch_size=probe.batch_size,
                                                   lr=args.lr, weight_decay=probe.weight_decay, seed=args.seed))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = args.out
    if out is None:
        if not args.model or args.model.startswith("random:"):
            raise ConfigError("give --out (there is no model directory to write the results into)")
        out = Path(args.model) / "eval"
    result = evaluate(args.kind, args.model, args.train, args.val, extract_cfg=extract_cfg, knn=knn, linear=linear,
                      lowshot=lowshot, out=out)
    print(json.dumps({k: result[k] for k in ("kind", "arch", "model", "layer", "num_train", "num_val", "metrics")}, indent=2))
    print(f"wrote {Path(out) / f'eval_{args.kind}.json'} and {result['confusion_png']}")
    return 0
