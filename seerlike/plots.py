"""Pictures a person looks at: cluster contact sheets, training curves, confusion matrices.

matplotlib with the Agg backend (no display needed); every function writes one PNG.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)


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


def confusion_matrix(true: Sequence[int], pred: Sequence[int], num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(true), np.asarray(pred)), 1)
    return cm


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
    fig.savefig(out_png, dpi=100)
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
    sheet.save(out_png)
    return out_png


def pick_clusters(sizes: np.ndarray, n: int, seed: int = 0) -> dict[str, list[int]]:
    """About n/3 largest, n/3 smallest non-empty and n/3 random other non-empty clusters."""
    nonempty = np.flatnonzero(sizes > 0)
    order = nonempty[np.argsort(-sizes[nonempty], kind="stable")]
    third = max(n // 3, 1)
    largest = order[:third].tolist()
    smallest = [c for c in order[::-1][:third].tolist() if c not in largest]
    rest = [c for c in order.tolist() if c not in largest and c not in smallest]
    rng = np.random.default_rng(seed)
    rand = rng.choice(rest, size=min(max(n - len(largest) - len(smallest), 0), len(rest)), replace=False).tolist() if rest else []
    return {"largest": largest, "smallest": smallest, "random": sorted(rand)}


def cluster_contact_sheets(cluster_dir: str | os.PathLike, data: str, out_dir: str | os.PathLike, *,
                           clusters: int = 12, per_cluster: int = 12, seed: int = 0, thumb: int = 64) -> list[Path]:
    """``largest.png``, ``smallest.png``, ``random.png``: random members of the picked clusters.

    The images are found by key in one pass over ``data`` (the source the features were
    extracted from), stopping as soon as every wanted key was seen.
    """
    from seerlike.eval.cluster import read_labels
    from seerlike.eval.extract import decode_view, list_units

    labels = read_labels(cluster_dir)
    cl = labels["cluster"].to_numpy()
    keys = labels["key"].to_pylist()
    sizes = np.bincount(cl)
    picked = pick_clusters(sizes, clusters, seed)
    rng = np.random.default_rng(seed)
    wanted: dict[str, int] = {}
    members: dict[int, list[str]] = {}
    for c in {c for cs in picked.values() for c in cs}:
        idx = np.flatnonzero(cl == c)
        chosen = [keys[i] for i in rng.choice(idx, size=min(per_cluster, idx.size), replace=False)]
        members[c] = chosen
        wanted.update({k: c for k in chosen})
    images: dict[str, np.ndarray] = {}
    for unit in list_units(data):
        for s in unit.read():
            if s.key in wanted and s.key not in images:
                view = decode_view(s, thumb, thumb)
                if view is not None:
                    images[s.key] = view
        if len(images) == len(wanted):
            break
    if len(images) < len(wanted):
        log.warning("%d of %d cluster members not found in %s", len(wanted) - len(images), len(wanted), data)
    out = []
    for kind, cs in picked.items():
        if not cs:
            continue
        rows = [(f"cluster {c} (n={sizes[c]})", [images[k] for k in members[c] if k in images]) for c in cs]
        out.append(contact_sheet(rows, Path(out_dir) / f"{kind}.png", thumb))
    return out
