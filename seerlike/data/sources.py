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

import bisect
import csv
import logging
import os
import re
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from seerlike import storage
from seerlike.config import ConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class FileSource:
    """Image files; ``labels[i]`` indexes ``classes`` (all None when the source has no labels)."""

    paths: list[str]
    keys: list[str]
    labels: list[int | None]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class ShardSource:
    """Tar shards (local paths or s3:// URLs) and the number of samples in each."""

    urls: list[str]
    counts: list[int]

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


class ManifestLabels(Mapping):
    """``key -> class index`` from an ingest manifest's ``label`` column, one shard's rows at a time.

    A key's shard is found by binary search over the shard index's key ranges; its rows come
    from the manifest's row groups holding the shard's row range (``sharding.manifest.ShardRows``).
    A reader going shard by shard reads each row group about once and holds a few shards'
    labels, not the corpus's (docs/scale.md).
    """

    def __init__(self, dataset: str, index, classes: list[str], labelled: int, endpoint_url: str | None = None):
        from sharding.manifest import ShardRows

        order = sorted(range(index.num_rows), key=index["first_key"].to_pylist().__getitem__)
        index = index.take(order)
        self._lo, self._hi = index["first_key"].to_pylist(), index["last_key"].to_pylist()
        self._count = labelled  # written samples with a label (the class scan counted them)
        self._rows = ShardRows(dataset, index, ["key", "label", "status"], endpoint_url=endpoint_url)
        self._class = {c: i for i, c in enumerate(classes)}
        self._cache: OrderedDict[int, dict[str, int]] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": OrderedDict()}

    def _shard(self, i: int) -> dict[str, int]:
        got = self._cache.get(i)
        if got is None:
            d = self._rows.rows(i).to_pydict()
            got = {k: self._class[l] for k, l, st in zip(d["key"], d["label"], d["status"]) if st == "written" and l}
            self._cache[i] = got
            if len(self._cache) > 4:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(i)
        return got

    def get(self, key, default=None):
        i = bisect.bisect_right(self._lo, key) - 1
        if i < 0 or key > self._hi[i]:
            return default
        return self._shard(i).get(key, default)

    def __getitem__(self, key: str) -> int:
        got = self.get(key)
        if got is None:
            raise KeyError(key)
        return got

    def __contains__(self, key) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        for i in range(len(self._lo)):
            yield from self._shard(i)


def manifest_labels(dataset: str, endpoint_url: str | None = None) -> tuple[Mapping[str, int], list[str]] | None:
    """``({key: class index}, classes)`` from the manifest's ``label`` column; None without labels.

    For evaluation sets (kNN, linear probe). With a shard index (every ingest since it
    exists) the mapping is a ``ManifestLabels`` reading a shard's rows when one of its keys
    is asked for; the classes come from one streaming pass over the label column. Without
    one, a dict of every labelled sample.
    """
    import pyarrow.compute as pc

    from sharding.manifest import iter_manifest, read_shard_index

    classes: set[str] = set()
    labelled = 0
    try:
        for batch in iter_manifest(dataset, ["label", "status"], endpoint_url=endpoint_url):
            labels = batch.filter(pc.equal(batch.column("status"), "written")).column("label").drop_null()
            labels = labels.filter(pc.not_equal(labels, ""))
            labelled += len(labels)
            classes.update(pc.unique(labels).to_pylist())
    except (storage.StorageError, FileNotFoundError):
        raise  # a manifest that cannot be read (even after the retries) is not a manifest without labels
    except Exception as e:  # noqa: BLE001 - an older manifest without a label column: no labels
        log.info("no labels in the manifest of %s (%s)", dataset, e)
        return None
    if not classes:
        return None
    ordered = sorted(classes)
    index = read_shard_index(dataset, endpoint_url=endpoint_url)
    if index is not None and index.num_rows:
        return ManifestLabels(dataset, index, ordered, labelled, endpoint_url), ordered
    names: dict[str, str] = {}
    for batch in iter_manifest(dataset, ["key", "label", "status"], endpoint_url=endpoint_url):
        d = batch.to_pydict()
        names.update((k, l) for k, l, st in zip(d["key"], d["label"], d["status"]) if st == "written" and l)
    position = {c: i for i, c in enumerate(ordered)}
    return {k: position[l] for k, l in names.items()}, ordered


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
