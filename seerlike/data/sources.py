"""What a ``DataConfig.source`` names: a list of image files or a list of tar shards.

- an image folder (class subfolders give labels) or a ``path,label`` CSV -> ``FileSource``
- a brace pattern of tars (``/d/shards/{000000..000099}.tar``, ``s3://b/p/{0..9}.tar``), a
  single ``.tar``, or an ingest dataset folder / ``s3://`` prefix (``manifest.parquet`` +
  ``shards/``) -> ``ShardSource`` with the number of samples in every shard.

Sample counts per shard let every rank agree on the epoch length without reading data:
they come from the ingest manifest when there is one, otherwise from a scan of the tar
headers (cheap locally; one full read per shard on S3, logged).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

from seerlike import storage
from seerlike.config import ConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class FileSource:
    """Image files; ``labels[i]`` indexes ``classes`` (all None when the source has no labels).

    A sample's global index (``Batch.indices``) is its position ``i`` in ``paths`` (the sorted
    folder listing, or the CSV's row order).
    """

    paths: list[str]
    keys: list[str]
    labels: list[int | None]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class ShardSource:
    """Tar shards (local paths or s3:// URLs) and the number of samples in each.

    A sample's global index (``Batch.indices``) is ``starts[s]`` plus its position in shard
    ``s``: the samples numbered in the order of ``urls`` (the manifest's shard-name order or the
    brace pattern's), then in tar order.
    """

    urls: list[str]
    counts: list[int]
    starts: list[int] = field(init=False, repr=False)
    """Global index of the first sample of each shard."""

    def __post_init__(self) -> None:
        self.starts = list(accumulate([0, *self.counts[:-1]])) if self.counts else []

    def __len__(self) -> int:
        return sum(self.counts)


# ---------------------------------------------------------------- brace patterns


def expand_braces(pattern: str) -> list[str]:
    """``a{00..03}b{x,y}`` -> every combination, zero-padding kept, in order."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [x for item in items for x in expand_braces(head + item + tail)]


# ---------------------------------------------------------------- file sources


def _label_table(names: list[str | None]) -> tuple[list[int | None], list[str]]:
    classes = sorted({n for n in names if n is not None})
    index = {c: i for i, c in enumerate(classes)}
    return [index[n] if n is not None else None for n in names], classes


def list_folder(root: str) -> FileSource:
    rootp = Path(root)
    files = sorted(p for p in rootp.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"data source {root!r}: no images ({', '.join(IMAGE_SUFFIXES)}) found under the folder")
    rel = [p.relative_to(rootp) for p in files]
    labelled = all(len(r.parts) == 2 for r in rel)
    labels, classes = _label_table([r.parts[0] if labelled else None for r in rel])
    keys = [str(r.with_suffix("")) for r in rel]
    return FileSource([str(p) for p in files], keys, labels, classes)


def list_csv(path: str) -> FileSource:
    base = Path(path).parent
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise ConfigError(f"data source {path!r}: a CSV source needs a header with a 'path' column "
                              f"(and optionally 'label'), got {reader.fieldnames}")
        rows = list(reader)
    if not rows:
        raise ConfigError(f"data source {path!r}: the CSV lists no images")
    paths = [r["path"] if os.path.isabs(r["path"]) else str(base / r["path"]) for r in rows]
    keys = [str(Path(r["path"]).with_suffix("")) for r in rows]
    dup = [k for k, n in Counter(keys).items() if n > 1]
    if dup:
        raise ConfigError(f"data source {path!r}: duplicate paths, e.g. {dup[:3]}")
    labels, classes = _label_table([r.get("label") or None for r in rows])
    return FileSource(paths, keys, labels, classes)


# ---------------------------------------------------------------- shard sources


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's member naming: ``dir/KEY.ext.more`` -> (``dir/KEY``, ``ext.more``)."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def count_tar(url: str, endpoint_url: str | None = None) -> int:
    """Samples (distinct consecutive keys) in a tar, from its headers only where it can seek."""
    import tarfile

    if storage.is_s3_url(url):
        from seerlike.data.s3stream import open_shard

        log.info("counting samples of %s by reading it (no manifest)", url)
        f = open_shard(url, endpoint_url=endpoint_url)
        mode = "r|"
    else:
        f = open(url.removeprefix("file://"), "rb")
        mode = "r:"
    n, last = 0, None
    with f, tarfile.open(fileobj=f, mode=mode) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _ = split_key(member.name)
            if key != last:
                n, last = n + 1, key
    return n


def manifest_counts(dataset: str, endpoint_url: str | None = None) -> dict[str, int]:
    """``{shard url: samples written}`` of an ingest dataset, in shard-name order.

    The URLs are those of ``sharding.manifest.shard_urls``: the dataset root joined with the
    dataset-relative shard names of its shard index (or, without one, of its manifest's
    rows with status ``written``).
    """
    from sharding.manifest import dataset_root, shard_counts

    try:
        counts = shard_counts(dataset, endpoint_url=endpoint_url)
    except Exception as e:  # noqa: BLE001 - missing or unreadable: say which dataset
        raise ConfigError(f"data source {dataset!r}: cannot read its manifest.parquet: {type(e).__name__}: {e}") from None
    if not counts:
        raise ConfigError(f"data source {dataset!r}: the manifest lists no written samples")
    root = dataset_root(dataset)
    return {storage.join_within(root, s, what=f"shard {s!r} of the manifest of {dataset}"): n for s, n in counts}


def is_dataset(source: str) -> bool:
    """An ingest dataset folder / prefix (as opposed to a tar or a brace pattern of tars)."""
    return not source.endswith(".tar") and "{" not in source


def list_shards(source: str, endpoint_url: str | None = None) -> ShardSource:
    if is_dataset(source):
        counts = manifest_counts(source, endpoint_url)
        return ShardSource(list(counts), list(counts.values()))
    urls = expand_braces(source)
    counts = [count_tar(u, endpoint_url) for u in urls]
    return ShardSource(urls, counts)


def resolve(source: str, endpoint_url: str | None = None) -> FileSource | ShardSource:
    """Turn ``DataConfig.source`` into a file list or a shard list; a bad source says why."""
    if not source:
        raise ConfigError("data source is empty; set data.source (a folder, a CSV, shards or a dataset)")
    if storage.is_s3_url(source) or source.endswith(".tar") or "{" in source:
        if not storage.is_s3_url(source):
            for u in expand_braces(source)[:1]:
                if not os.path.exists(u.removeprefix("file://")):
                    raise ConfigError(f"data source {source!r}: shard {u} does not exist")
        return list_shards(source, endpoint_url)
    local = source.removeprefix("file://")
    if os.path.isfile(local) and local.endswith(".csv"):
        return list_csv(local)
    if os.path.isdir(local):
        if os.path.exists(os.path.join(local, "manifest.parquet")):
            return list_shards(local, endpoint_url)
        return list_folder(local)
    raise ConfigError(f"data source {source!r} does not exist (expected an image folder, a path,label CSV, "
                      "a tar brace pattern, or an ingest dataset folder / s3:// prefix)")
