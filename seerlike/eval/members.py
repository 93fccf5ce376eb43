"""The members of a few clusters, as images: what a contact sheet shows (`seerlike cluster --contact-sheets`).

Picking the clusters and finding their members' images in the data is here; drawing them
is seerlike.plots.contact_sheets.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from seerlike.eval.extract import decode_view, list_units
from seerlike.pseudo_labels import read_labels

log = logging.getLogger(__name__)


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


def cluster_members(cluster_dir: str | os.PathLike, data: str, *, clusters: int = 12, per_cluster: int = 12,
                    seed: int = 0, thumb: int = 64) -> dict[str, list[tuple[str, list[np.ndarray]]]]:
    """Random member images of the largest, smallest and random clusters (what a contact sheet shows).

    ``{"largest"|"smallest"|"random": [(title, [uint8 HxWx3 thumbnails])]}``. The images are
    found by key in one pass over ``data`` (the source the features were extracted from),
    stopping as soon as every wanted key was seen.
    """
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
    return {kind: [(f"cluster {c} (n={sizes[c]})", [images[k] for k in members[c] if k in images]) for c in cs]
            for kind, cs in picked.items() if cs}
