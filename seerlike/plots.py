"""Pictures a person looks at: cluster contact sheets, training curves, confusion matrices.

Drawing only: every function is given what to draw (numbers, images, a run's metrics file)
and writes PNGs with matplotlib's Agg backend (no display needed) or Pillow. Finding the
images or computing the numbers is done by the callers' modules.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------- training curves


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The JSON lines of a run's ``metrics.jsonl`` (a run dir or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics at {path}; a training run writes RUN_DIR/metrics.jsonl")
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def training_curves(metrics: str | os.PathLike, out_png: str | os.PathLike,
                    keys: Sequence[str] = ("loss", "lr", "images_per_s")) -> Path:
    """One panel per metric (loss, learning rate, throughput) against the step."""
    rows = [r for r in read_metrics(metrics) if "step" in r]
    present = [k for k in keys if any(k in r for r in rows)]
    if not present:
        raise ValueError(f"none of {list(keys)} appear in {metrics}")
    plt = _plt()
    fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.4), squeeze=False)
    titles = {"loss": "loss", "lr": "learning rate", "images_per_s": "throughput (images/s)"}
    for ax, key in zip(axes[0], present):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        xs, ys = zip(*pts)
        ax.plot(xs, ys, lw=1.2)
        ax.set_title(titles.get(key, key))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100, format="png")  # not from the name: callers may pass a temp file
    plt.close(fig)
    return out_png


# ---------------------------------------------------------------- confusion matrix


def confusion_png(cm: np.ndarray, class_names: Sequence[str], out_png: str | os.PathLike, title: str = "") -> Path:
    """Row-normalised confusion matrix (rows: true class), counts written in small classes sets."""
    plt = _plt()
    n = len(class_names)
    side = max(4.0, min(0.45 * n + 2, 30))
    fig, ax = plt.subplots(figsize=(side, side))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100, format="png")  # not from the name: callers may pass a temp file
    plt.close(fig)
    return out_png


# ---------------------------------------------------------------- cluster contact sheets


def contact_sheet(rows: list[tuple[str, list[np.ndarray]]], out_png: str | os.PathLike, thumb: int = 64) -> Path:
    """A grid: one row per (title, images); images are uint8 HxWx3 arrays."""
    from PIL import Image, ImageDraw

    cols = max((len(imgs) for _, imgs in rows), default=1)
    label_w = 150
    sheet = Image.new("RGB", (label_w + cols * (thumb + 2), len(rows) * (thumb + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (title, imgs) in enumerate(rows):
        y = r * (thumb + 2)
        draw.text((4, y + thumb // 2 - 6), title, fill="black")
        for c, arr in enumerate(imgs):
            im = Image.fromarray(arr).resize((thumb, thumb), Image.BILINEAR)
            sheet.paste(im, (label_w + c * (thumb + 2), y))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png, format="PNG")
    return out_png


def contact_sheets(groups: dict[str, list[tuple[str, list[np.ndarray]]]], out_dir: str | os.PathLike,
                   thumb: int = 64) -> list[Path]:
    """One ``NAME.png`` per group of titled image rows (seerlike.eval.members.cluster_members gives them)."""
    return [contact_sheet(rows, Path(out_dir) / f"{name}.png", thumb) for name, rows in groups.items() if rows]


def loss_curves(runs: list[tuple[str, str | os.PathLike]], out_png: str | os.PathLike) -> Path:
    """One panel per training run (title, run dir): its loss against the step."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.4), squeeze=False)
    for ax, (title, run) in zip(axes[0], runs):
        rows = [r for r in read_metrics(run) if "loss" in r]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
        ax.set_title(f"{title} loss")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90, format="png")
    plt.close(fig)
    return out_png


def knn_curves(curves: list[tuple[str, list[tuple[float, float]]]], out_png: str | os.PathLike) -> Path:
    """One panel per training stage (title, [(wall minutes, kNN top-1 %)]): the kNN monitor's readings."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.4), squeeze=False, sharey=True)
    for ax, (title, points) in zip(axes[0], curves):
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", ms=3, lw=1.2)
        else:
            ax.text(0.5, 0.5, "no kNN monitor readings", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("wall-clock minutes of the stage")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("kNN top-1 (%)")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90, format="png")
    plt.close(fig)
    return out_png
