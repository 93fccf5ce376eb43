"""`seerlike extract --checkpoint M --data D --out DIR`: frozen-backbone features (seerlike.api.extract)."""

from __future__ import annotations

import argparse
import json

from seerlike.eval.extract import LAYERS, ExtractConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, run dir, export dir or random:ARCH")
    p.add_argument("--data", required=True, help="dataset dir / shard pattern / s3 prefix, or a path,label CSV / image folder")
    p.add_argument("--layer", default=ExtractConfig.layer, choices=LAYERS,
                   help="res2-res5: average-pooled stage maps; pool: the trunk output; head: classifier logits "
                   "(default %(default)s)")
    p.add_argument("--out", required=True, help="features directory (rerun to resume)")
    p.add_argument("--image-size", type=int, default=ExtractConfig.image_size,
                   help="centre-crop side fed to the network (default %(default)s)")
    p.add_argument("--resize", type=int, default=None, help="shorter side before the centre crop (default size/0.875)")
    p.add_argument("--batch-size", type=int, default=ExtractConfig.batch_size,
                   help="images per forward (default %(default)s)")
    p.add_argument("--chunk-size", type=int, default=ExtractConfig.chunk_size,
                   help="rows per chunk of a CSV / folder source; a shard is one chunk (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored feature dtype")
    p.add_argument("--workers", type=int, default=ExtractConfig.workers, help="decoding threads per rank")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="forward under bf16 autocast")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")


def settings(args: argparse.Namespace) -> dict:
    return {"layer": args.layer, "image_size": args.image_size, "resize": args.resize, "batch_size": args.batch_size,
            "chunk_size": args.chunk_size, "dtype": args.dtype, "workers": args.workers, "precision": args.precision}


def build_config(args: argparse.Namespace) -> ExtractConfig:
    from seerlike.api import _settings

    return _settings(ExtractConfig, settings(args), "extract")


def preflight(args: argparse.Namespace) -> None:
    """The settings and the inputs, checked before a job is queued (`seerlike submit extract`)."""
    from seerlike.preflight import check_data, check_model

    build_config(args)
    check_model(args.checkpoint, "--checkpoint")
    check_data(args.data, "--data")


def run(args: argparse.Namespace) -> int:
    from seerlike.api import extract

    result = extract(args.checkpoint, args.data, args.out, progress=not args.no_progress, **settings(args))
    if result is not None:
        print(json.dumps({"layer": result.layer, "dim": result.dim, "num_samples": result.num_samples,
                          "arch": result.meta["arch"], "model": result.meta["model"], "out": str(result.out),
                          "chunks": len(result.meta["chunks"])}, indent=2))
    return 0
