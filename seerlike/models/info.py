"""`seerlike model-info`: params, FLOPs, activations and stages of a backbone, or the list of names."""

from __future__ import annotations

import argparse
import json

from seerlike.config import ConfigError
from seerlike.models import complexity, names, source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="backbone name (see --list)")
    parser.add_argument("--list", action="store_true", help="list every backbone with params and GFLOPs")
    parser.add_argument("--resolution", type=int, default=224, help="square input size in pixels (default 224)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier width; 0 counts the trunk only (default 1000)")
    parser.add_argument("--blocks", action="store_true", help="also print every block's params / FLOPs / activations")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    if args.num_classes < 0:
        raise ConfigError(f"--num-classes {args.num_classes} must be >= 0 (0 = trunk only)")
    if args.resolution < 1:
        raise ConfigError(f"--resolution {args.resolution} must be a positive number of pixels")
    if args.list:
        _list(args)
        return 0
    if not args.name:
        raise ConfigError("give a backbone NAME or --list")
    cx = with_stage_totals(complexity(args.name, args.resolution, args.num_classes))
    if args.json:
        info = {"name": args.name, "source": source(args.name), "resolution": args.resolution, "num_classes": args.num_classes}
        print(json.dumps({**info, **cx}, indent=2))
        return 0
    _describe(args, cx)
    return 0


def with_stage_totals(cx: dict) -> dict:
    """Add each stage's summed params / flops / acts and output size (parts run stem, blocks..., head)."""
    blocks = cx["parts"][1:-1]
    i = 0
    for stage in cx["stages"]:
        mine = blocks[i : i + stage["depth"]]
        i += stage["depth"]
        for key in ("params", "flops", "acts"):
            stage[key] = sum(p[key] for p in mine)
        stage["out_hw"] = mine[-1]["out_hw"]
    return cx


def _list(args: argparse.Namespace) -> None:
    rows = []
    for name in names():
        cx = complexity(name, args.resolution, args.num_classes)
        rows.append({"name": name, "params": cx["params"], "gflops": round(cx["flops"] / 1e9, 3), "source": source(name)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{len(rows)} backbones at {args.resolution} px, {args.num_classes or 'no'} classes")
    print(f"{'name':<22} {'params':>15} {'GFLOPs':>10}  source")
    for r in rows:
        print(f"{r['name']:<22} {r['params']:>15,} {r['gflops']:>10.3f}  {r['source']}")


def _describe(args: argparse.Namespace, cx: dict) -> None:
    print(f"{args.name} ({source(args.name)}) at {args.resolution} px, {args.num_classes or 'no'} classes")
    print(f"  params       {cx['params']:>18,}")
    print(f"  FLOPs        {cx['flops']:>18,}  ({cx['flops'] / 1e9:.3f} G multiply-adds)")
    print(f"  activations  {cx['acts']:>18,}")
    print()
    head = ("stage", "depth", "width", "bot_w", "group_w", "groups", "stride", "out", "params", "GFLOPs", "acts")
    print("{:<6} {:>5} {:>6} {:>6} {:>7} {:>6} {:>6} {:>9} {:>13} {:>8} {:>11}".format(*head))
    for s in cx["stages"]:
        out = "x".join(map(str, s["out_hw"]))
        print(
            f"{s['stage']:<6} {s['depth']:>5} {s['width']:>6} {s['bottleneck_width']:>6} {s['group_width']:>7} "
            f"{s['groups']:>6} {s['stride']:>6} {out:>9} {s['params']:>13,} {s['flops'] / 1e9:>8.3f} {s['acts']:>11,}"
        )
    if args.blocks:
        print()
        print(f"{'part':<36} {'out':>9} {'params':>13} {'FLOPs':>16} {'acts':>11}")
        for p in cx["parts"]:
            out = "x".join(map(str, p["out_hw"]))
            print(f"{p['name']:<36} {out:>9} {p['params']:>13,} {p['flops']:>16,} {p['acts']:>11,}")
