"""Helpers of the kNN monitor tests: a labeled CIFAR-dev subset as a CSV, random per-rank training data."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import torch


class RankData:
    """Random 16 px views, different on every rank (so BatchNorm statistics differ per rank)."""

    def __init__(self, rank: int):
        self.rank, self.i = rank, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(1000 * self.i + self.rank)
            self.i += 1
            yield SimpleNamespace(views=[torch.randn(4, 3, 16, 16, generator=g) * (1 + self.rank) for _ in range(2)])

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def labeled_csv(cifar_dir: Path, split: str, per_class: int, out: Path) -> str:
    """The first ``per_class`` images of every class of a CIFAR-dev split, as a path,label CSV."""
    seen: dict[str, int] = {}
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for r in csv.DictReader(open(cifar_dir / f"{split}.csv")):
            if seen.get(r["label"], 0) < per_class:
                seen[r["label"]] = seen.get(r["label"], 0) + 1
                w.writerow([str(cifar_dir / r["path"]), r["label"]])
    return str(out)
