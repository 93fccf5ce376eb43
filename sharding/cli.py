"""`seerlike ingest INPUT... --out DIR_OR_S3 [--workers N] [key=value ...]`."""

from __future__ import annotations

import argparse
import json
import os
import re

from sharding.config import IngestConfig

_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "items",
        nargs="+",
        metavar="INPUT_OR_KEY=VALUE",
        help="folders, list files (.txt/.csv/.parquet), s3://bucket/prefix, http(s) URLs; "
        "then IngestConfig overrides such as resize_short_side=384 chunk_size=5000",
    )
    parser.add_argument("--out", required=True, help="dataset folder or s3://bucket/prefix")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default 1)")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    # Inputs and key=value overrides may sit on either side of --out/--workers.
    parser.parse_args = parser.parse_intermixed_args  # type: ignore[method-assign]


def split_items(items: list[str]) -> tuple[list[str], list[str]]:
    """Inputs vs key=value overrides (an existing path containing '=' stays an input)."""
    inputs, overrides = [], []
    for item in items:
        if _OVERRIDE.match(item) and not os.path.exists(item):
            overrides.append(item)
        else:
            inputs.append(item)
    return inputs, overrides


def build_config(args: argparse.Namespace) -> IngestConfig:
    """The validated IngestConfig of the command line (inputs must exist; URLs are checked when read)."""
    from seerlike.api import ingest_config

    inputs, overrides = split_items(args.items)
    return ingest_config(inputs, args.out, workers=args.workers, endpoint_url=args.endpoint_url,
                         progress=not args.no_progress, overrides=overrides)


def format_summary(s: dict) -> str:
    lines = [
        f"dataset   {s['dataset']}",
        f"seen      {s['seen']}",
        f"written   {s['written']}  ({s['kept_original']} original bytes kept, {s['reencoded']} re-encoded) in {s['shards']} shards",
        f"duplicate {s['duplicate']}",
        f"rejected  {s['rejected']}",
    ]
    lines += [f"  {r:<20}{n}" for r, n in s["rejected_by_reason"].items() if n]
    lines.append(f"bytes     {s['bytes_in']:,} in -> {s['bytes_written']:,} written")
    if s.get("run_images_per_s"):
        lines.append(
            f"speed     {s['run_images_per_s']} images/s with {s['workers']} workers "
            f"({s['images_per_s_per_worker']} per worker, {s['images_per_cpu_s']} per CPU second)"
        )
    if "run_seconds" in s:
        lines.append(
            f"time      plan {s['plan_seconds']}s, chunks {s['run_seconds']}s "
            f"({s['run_chunks']} of {s['chunks']} chunks, {s['run_images']} images), merge {s['merge_seconds']}s"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from seerlike.api import ingest

    inputs, overrides = split_items(args.items)
    result = ingest(inputs, args.out, workers=args.workers, endpoint_url=args.endpoint_url,
                    progress=not args.no_progress, overrides=overrides)
    print(json.dumps(result.summary, indent=1) if args.json else format_summary(result.summary))
    return 0
