"""`seerlike config`: print a recipe's resolved config, or the config reference."""

from __future__ import annotations

import argparse

from seerlike import config, recipes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="recipe name (see --list)")
    p.add_argument("--list", action="store_true", help="list the recipes")
    p.add_argument("--format", choices=["yaml", "json"], default="yaml")
    p.add_argument("--reference", action="store_true", help="print every key with its type, default and doc")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.1")


def run(args: argparse.Namespace) -> int:
    if args.list or not args.recipe:
        for name in sorted(recipes.RECIPES):
            print(name)
        return 0
    cfg = config.apply_overrides(recipes.get(args.recipe), args.overrides)
    if args.reference:
        for key, tp, default, doc in config.reference(type(cfg)):
            print(f"{key:45s} {tp:28s} {default:20s} {doc}")
        return 0
    print(config.dumps(cfg, args.format), end="")
    return 0
