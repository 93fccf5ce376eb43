"""`seerlike export --checkpoint M --out DIR [--format ...]`: deployable files of a backbone (seerlike.api.export)."""

from __future__ import annotations

import argparse
import json

from seerlike.exporter import FORMATS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, run dir (newest complete checkpoint) or random:ARCH")
    p.add_argument("--format", default="torchvision",
                   help=f"comma-separated formats: {', '.join(FORMATS)} (or 'all')")
    p.add_argument("--out", required=True, help="export directory")
    p.add_argument("--with-head", action="store_true", help="include the checkpoint's classifier as fc.* (ClusterFit)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input side of the card and of the graph checks (default: the training view size, else 224)")
    p.add_argument("--eval", action="append", default=[], metavar="JSON", help="eval result JSON to put in the model card")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")


def preflight(args: argparse.Namespace) -> None:
    """The inputs, checked before a job is queued (`seerlike submit export`)."""
    from seerlike.preflight import check_model, check_path
    from seerlike.config import ConfigError

    check_model(args.checkpoint, "--checkpoint")
    formats = [f.strip() for f in args.format.split(",") if f.strip()] if args.format != "all" else list(FORMATS)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ConfigError(f"unknown export format(s) {bad}; choose from {', '.join(FORMATS)}")
    for f in args.eval:
        check_path(f, "--eval", "an eval_KIND.json written by `seerlike eval`")


def run(args: argparse.Namespace) -> int:
    from seerlike.api import export

    res = export(args.checkpoint, args.out, formats=args.format, with_head=args.with_head, image_size=args.image_size,
                 evals=args.eval, progress=not args.no_progress)
    print(json.dumps({"out": str(res.out), "arch": res.arch, "files": {k: v.name for k, v in res.files.items()},
                      "checks": res.checks}, indent=2))
    return 0
