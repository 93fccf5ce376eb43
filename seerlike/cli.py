"""`seerlike <subcommand>`: a thin dispatcher.

Each subcommand lives in the module that owns the work and exposes
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their
subcommand runs, so ``seerlike --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from seerlike import __version__
from seerlike.config import ConfigError
from seerlike.storage import DiskFullError

COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("seerlike.quickstart", "the whole pipeline on real images, one machine"),
    "config": ("seerlike.recipes.cli", "print a recipe's resolved config (with overrides)"),
    "model-info": ("seerlike.models.info", "params, FLOPs, activations and stages of a backbone"),
    "ingest": ("sharding.cli", "ingest images into WebDataset shards + a parquet manifest"),
    "ingest-stats": ("sharding.stats", "inspect an ingested dataset (manifest, summary, shards)"),
    "train": ("seerlike.commands.train", "pretrain with any method (SwAV, BYOL, ...), retrain (ClusterFit)"),
    "extract": ("seerlike.commands.extract", "frozen-backbone features of a data set (shards, dataset, folder or CSV)"),
    "cluster": ("seerlike.commands.cluster", "faiss k-means on features -> pseudo-labels"),
    "distill": ("seerlike.commands.distill", "distill a teacher into a student backbone"),
    "finetune": ("seerlike.commands.finetune", "fine-tune a pretrained backbone on labeled images"),
    "selftrain": ("seerlike.commands.selftrain", "semi-supervised training: FixMatch or Noisy Student"),
    "eval": ("seerlike.commands.evaluate", "kNN / linear / low-shot evaluation"),
    "export": ("seerlike.commands.export", "export a backbone (torchvision, safetensors, torchscript, onnx)"),
    "submit": ("launchers.submit", "submit a stage to Slurm or the local executor"),
    "jobs": ("launchers.jobs", "status / cancel / tail of submitted jobs"),
    "pipeline": ("launchers.pipeline", "run a multi-stage pipeline as dependent jobs"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="seerlike", description="Self-supervised pretraining on uncurated images.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    parser.add_argument("--version", action="version", version=f"seerlike {__version__}")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        print(f"seerlike {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from: {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[name][0])
    cmd = argparse.ArgumentParser(prog=f"seerlike {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd)
    args = cmd.parse_args(argv[1:])
    if not logging.getLogger().handlers:
        from seerlike.logs import setup_logging

        setup_logging()
    try:
        return int(module.run(args) or 0)
    except ConfigError as e:
        print(f"seerlike {name}: config error: {e}", file=sys.stderr)
        return 2
    except DiskFullError as e:  # one line naming the file and the fix, not a traceback
        print(f"seerlike {name}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
