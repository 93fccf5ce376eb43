"""The members of a few clusters, as images: what a contact sheet shows (`seerlike cluster --contact-sheets`).

Picking the clusters and their members, and finding the members' images in the data, is
here; drawing them is seerlike.plots.contact_sheets. Nothing here holds the corpus's labels
(docs/scale.md, "Steps that see the whole corpus"): the clusters are picked from the sizes
``seerlike cluster`` records in ``cluster_stats.json`` (or counted in one pass over the
label parts), their members drawn in one more pass holding ``per_cluster`` keys per picked
cluster, and their images found in one pass over the data.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from seerlike.eval.extract import decode_view, list_units
from seerlike.pseudo_labels import INDEX

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


def _label_parts(cluster_dir: Path) -> list[Path]:
    folder = cluster_dir / "labels" if (cluster_dir / "labels").is_dir() else cluster_dir
    if folder.is_file():
        return [folder]
    parts = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not parts:
        raise FileNotFoundError(f"no pseudo-labels in {folder}; produce them with `seerlike cluster`")
    return parts


def cluster_sizes(cluster_dir: str | os.PathLike) -> np.ndarray:
    """Members per cluster: the sizes ``cluster_stats.json`` records, else counted over the label parts.

    The recorded sizes are used when they add up to the rows ``labels_index.parquet`` lists
    (both written by the same `seerlike cluster` run); otherwise the parts are counted, one
    part's ``cluster`` column in memory at a time.
    """
    cluster_dir = Path(cluster_dir)
    stats, index = cluster_dir / "cluster_stats.json", cluster_dir / INDEX
    if stats.is_file() and index.is_file():
        recorded = np.asarray(json.loads(stats.read_text()).get("sizes") or [], np.int64)
        rows = int(pq.read_table(index, columns=["rows"])["rows"].to_numpy().sum())
        if recorded.size and recorded.sum() == rows:
            return recorded
    sizes = np.zeros(0, np.int64)
    for part in _label_parts(cluster_dir):
        counts = np.bincount(pq.read_table(part, columns=["cluster"])["cluster"].to_numpy(), minlength=sizes.size)
        counts[: sizes.size] += sizes
        sizes = counts
    return sizes


def draw_members(cluster_dir: str | os.PathLike, clusters: list[int], per_cluster: int,
                 seed: int = 0) -> tuple[dict[int, list[str]], set[str]]:
    """Up to ``per_cluster`` random member keys of each cluster in ``clusters``, in label-part order,
    and the feature units (``labels/features-{unit}.parquet``) they were drawn from.

    One pass over the label parts keeps, per cluster, the ``per_cluster`` rows with the
    smallest of a seeded uniform draw per candidate row (a uniform sample without
    replacement, the same for the same parts and seed); a cluster with fewer members keeps
    them all. Memory: one part plus ``len(clusters) x per_cluster`` keys.
    """
    wanted = np.asarray(sorted(set(clusters)), np.int64)
    rng = np.random.default_rng(seed)
    kept_cl = np.zeros(0, np.int64)
    kept_pri = np.zeros(0, np.float64)
    kept_pos = np.zeros(0, np.int64)  # row position over all parts: the order the members come out in
    kept_key: list[str] = []
    part_starts: list[tuple[int, str]] = []  # (first row position, unit) of each part
    start = 0
    for part in _label_parts(Path(cluster_dir)):
        part_starts.append((start, part.stem.removeprefix("features-")))
        t = pq.read_table(part, columns=["key", "cluster"])
        cl = t["cluster"].to_numpy()
        rows = np.flatnonzero(np.isin(cl, wanted))
        if rows.size:
            cand_cl = np.concatenate([kept_cl, cl[rows].astype(np.int64)])
            cand_pri = np.concatenate([kept_pri, rng.random(rows.size)])
            cand_pos = np.concatenate([kept_pos, start + rows])
            order = np.lexsort((cand_pri, cand_cl))  # by cluster, then by draw
            first = np.searchsorted(cand_cl[order], cand_cl[order], side="left")
            keep = order[np.arange(order.size) - first < per_cluster]
            new_keys = t["key"].take(rows[keep[keep >= kept_cl.size] - kept_cl.size]).to_pylist()
            old = keep[keep < kept_cl.size]
            kept_key = [kept_key[i] for i in old] + new_keys
            keep = np.concatenate([old, keep[keep >= kept_cl.size]])
            kept_cl, kept_pri, kept_pos = cand_cl[keep], cand_pri[keep], cand_pos[keep]
        start += t.num_rows
    members: dict[int, list[str]] = {int(c): [] for c in wanted}
    for i in np.argsort(kept_pos, kind="stable"):
        members[int(kept_cl[i])].append(kept_key[i])
    firsts = np.asarray([p for p, _ in part_starts], np.int64)
    units = {part_starts[int(j)][1] for j in np.searchsorted(firsts, kept_pos, side="right") - 1}
    return members, units


def cluster_members(cluster_dir: str | os.PathLike, data: str, *, clusters: int = 12, per_cluster: int = 12,
                    seed: int = 0, thumb: int = 64) -> dict[str, list[tuple[str, list[np.ndarray]]]]:
    """Random member images of the largest, smallest and random clusters (what a contact sheet shows).

    ``{"largest"|"smallest"|"random": [(title, [uint8 HxWx3 thumbnails])]}``. The members
    are drawn by ``draw_members``; their images are found by key in ``data`` (the source the
    features were extracted from): in a shard source only the shards they came from are
    read (at most ``clusters x per_cluster``), otherwise one pass stops as soon as every
    wanted key was seen.
    """
    sizes = cluster_sizes(cluster_dir)
    picked = pick_clusters(sizes, clusters, seed)
    members, member_units = draw_members(cluster_dir, [c for cs in picked.values() for c in cs], per_cluster, seed)
    wanted = {k for keys in members.values() for k in keys}
    units = list_units(data)
    if all(u.name.startswith("shard-") for u in units) and member_units <= {u.name for u in units}:
        # a shard source's units are its shards, as in the extraction: read only the members' shards
        units = [u for u in units if u.name in member_units]
    images: dict[str, np.ndarray] = {}
    for unit in units:
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
