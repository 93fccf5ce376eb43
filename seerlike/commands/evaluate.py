"""`seerlike eval knn|linear|lowshot --model M --train T --val V`: frozen-feature evaluation (seerlike.api.evaluate).

Prints the result and writes ``OUT/eval_{kind}.json`` and ``OUT/confusion_{kind}.png``.
"""

from __future__ import annotations

import argparse
import json

from seerlike.eval.evaluate import KINDS, LABELLED_INPUTS
from seerlike.eval.extract import LAYERS
from seerlike.eval.knn import KNNConfig
from seerlike.eval.linear import LinearConfig, LowShotConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=KINDS, help="kNN on frozen features, a linear probe, or low-shot linear probes")
    p.add_argument("--model", help="checkpoint dir, run dir, export dir, or random:ARCH (not needed when "
                   "--train and --val are features dirs)")
    p.add_argument("--train", required=True, help=f"labelled training images: {LABELLED_INPUTS}")
    p.add_argument("--val", required=True, help=f"labelled validation images: {LABELLED_INPUTS}")
    p.add_argument("--out", help="where to write eval_KIND.json and confusion_KIND.png (default: MODEL/eval)")
    p.add_argument("--layer", default="pool", choices=LAYERS, help="feature layer (default %(default)s)")
    p.add_argument("--image-size", type=int, default=224, help="centre-crop side (default %(default)s)")
    p.add_argument("--resize", type=int, default=None, help="shorter side before the centre crop (default size/0.875)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward (default %(default)s)")
    p.add_argument("--k", type=int, default=KNNConfig.k, help="kNN neighbours")
    p.add_argument("--temperature", type=float, default=KNNConfig.temperature, help="kNN vote temperature")
    p.add_argument("--epochs", type=int, default=None, help="linear probe epochs (default 100, low-shot 200)")
    p.add_argument("--lr", type=float, default=LinearConfig.lr, help="linear probe learning rate")
    p.add_argument("--shots", default="1,5,10", help="low-shot examples per class")
    p.add_argument("--draws", type=int, default=LowShotConfig.draws, help="low-shot subsets per shot count")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe and the low-shot draws")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")


def _shots(text: str) -> tuple[int, ...]:
    from seerlike.config import ConfigError

    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--shots {text!r}: expected comma-separated integers, e.g. 1,5,10") from None


def preflight(args: argparse.Namespace) -> None:
    """The inputs, checked before a job is queued (`seerlike submit eval`)."""
    from seerlike.preflight import check_model, check_path

    if args.model:
        check_model(args.model, "--model")
    check_path(args.train, "--train", LABELLED_INPUTS)
    check_path(args.val, "--val", LABELLED_INPUTS)
    _shots(args.shots)


def run(args: argparse.Namespace) -> int:
    from seerlike.api import evaluate

    res = evaluate(args.kind, args.model, train=args.train, val=args.val, out=args.out, layer=args.layer,
                   image_size=args.image_size, resize=args.resize, batch_size=args.batch_size, k=args.k,
                   temperature=args.temperature, epochs=args.epochs, lr=args.lr, shots=_shots(args.shots),
                   draws=args.draws, seed=args.seed, progress=not args.no_progress)
    print(json.dumps({k: res.result[k] for k in ("kind", "arch", "model", "layer", "num_train", "num_val", "metrics")},
                     indent=2))
    print(f"wrote {res.files[0]} and {res.files[1]}")
    return 0
