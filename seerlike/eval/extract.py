"""`seerlike extract`: frozen-backbone features over a data set, one chunk per work unit.

Work units are fixed by the data alone: one unit per WebDataset shard, or one slice of
``--chunk-size`` rows of a ``path,label`` CSV / class-folder listing. Rank ``r`` of ``W``
takes the units ``u`` with ``u % W == r``, so every sample is extracted exactly once, and a
rerun (with any number of ranks) skips the units whose chunk is already complete.
Images get the evaluation transform (shorter side to ``resize``, centre crop ``size``,
ImageNet normalisation). ``res4`` / ``res5`` maps are spatially average-pooled; ``pool``
is the trunk's pooled output; ``head`` the classifier logits of a model that has one.
The file format is described in :mod:`seerlike.eval.features`.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import torch
from torch import Tensor

from seerlike import storage
from seerlike.config import ConfigError
from seerlike.eval import features as fstore
from seerlike.progress import Progress

log = logging.getLogger(__name__)

LAYERS = ("res2", "res3", "res4", "res5", "pool", "head")


# ---------------------------------------------------------------- work units


@dataclass(frozen=True)
class Sample:
    key: str
    data: bytes | None
    """Encoded image; None when it could not be read (``error`` says why)."""
    label: str | None
    error: str | None = None


@dataclass(frozen=True)
class Unit:
    """A fixed slice of the data set that becomes one feature chunk."""

    name: str
    read: Callable[[], Iterator[Sample]]
    size: int | None = None
    """Samples in the unit when known up front (progress bar)."""


def shard_label(meta: bytes | None) -> str | None:
    """The ``label`` in a shard sample's ``.json`` member (ingest copies a list file's label there), else None.

    The label travels in the shard with its image, so it is read (and retried) with it: a
    shard that cannot be read stops the extraction instead of leaving its samples unlabelled.
    A json member that does not parse raises ValueError (the sample is reported and skipped).
    """
    if meta is None:
        return None
    try:
        doc = json.loads(meta)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable .json member ({e})") from None
    label = doc.get("label") if isinstance(doc, dict) else None
    return None if label is None else str(label)


def list_units(data: str, chunk_size: int = 4096) -> list[Unit]:
    """The work units of ``data`` (any ``DataConfig.source``): one per shard, or ``chunk_size`` files each.

    Reading goes through the data pipeline's readers (S3 retries under ``storage.DEFAULT_RETRY``,
    resumable streams); a shard that still fails stops the extraction (a rerun resumes) rather
    than leave samples out. Labels come from class folders / the CSV's label column, or for
    shards from each sample's ``.json`` member (``shard_label``).
    """
    from seerlike.data import shards as sh
    from seerlike.data.sources import FileSource, resolve

    src = resolve(data)
    if isinstance(src, FileSource):
        def read(lo: int, hi: int) -> Iterator[Sample]:
            for rec in sh.raw_file_stream(src, list(range(lo, hi)), 0):
                label = src.classes[rec.label] if rec.label is not None else None
                yield Sample(rec.key, rec.data, label, rec.error)

        return [Unit(f"part-{lo // chunk_size:06d}", lambda lo=lo: read(lo, min(lo + chunk_size, len(src))),
                     min(chunk_size, len(src) - lo)) for lo in range(0, len(src), chunk_size)]

    retry = storage.DEFAULT_RETRY
    opts = sh.ShardReaderOptions(retries=retry.retries, backoff_s=retry.backoff_s, on_shard_error="fatal")

    def read_shard(url: str, count: int) -> Iterator[Sample]:
        for rec in sh.shard_records(url, count, 0, opts):
            try:
                label, error = shard_label(rec.meta), rec.error
            except ValueError as e:
                label, error = None, rec.error or f"{url}: {e}"
            yield Sample(rec.key, rec.data, label, error)

    names = [Path(u).name.removesuffix(".tar") for u in src.urls]
    if len(set(names)) != len(names):
        names = [f"{i:06d}-{n}" for i, n in enumerate(names)]
    return [Unit(f"shard-{n}", lambda u=u, c=c: read_shard(u, c), c) for n, u, c in zip(names, src.urls, src.counts)]


# ---------------------------------------------------------------- inference


def to_batch(views: list[np.ndarray]) -> Tensor:
    """uint8 (size, size, 3) centre views -> normalised float32 ``(N, 3, size, size)``."""
    from seerlike.data.augment import IMAGENET_MEAN, IMAGENET_STD

    x = torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def eval_batch(datas: list[bytes], size: int, resize: int) -> Tensor:
    """Encoded images -> the evaluation transform's normalised batch."""
    from seerlike.data.augment import center_view

    return to_batch([center_view(d, size, resize) for d in datas])


def feature_fn(loaded, layer: str, precision: str = "fp32") -> Callable[[Tensor], Tensor]:
    """images -> (N, D) features of ``layer`` (spatial maps average-pooled).

    A trunk that takes the lightness alone (``in_channels`` 1: colorization) gets the images'
    lightness, as it was trained on (``seerlike.methods.pretext_ops.lightness_input``).
    """
    fn = _layer_fn(loaded, layer)
    if getattr(loaded.model, "in_channels", 3) == 1:
        fn = _on_lightness(fn)
    if precision == "fp32":
        return fn

    def autocast_fn(x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return fn(x)

    return autocast_fn


def _on_lightness(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    from seerlike.data.augment import IMAGENET_MEAN, IMAGENET_STD
    from seerlike.methods.pretext_ops import lightness_input, srgb_to_lab, unnormalise

    return lambda x: fn(lightness_input(srgb_to_lab(unnormalise(x, IMAGENET_MEAN, IMAGENET_STD))))


def _layer_fn(loaded, layer: str) -> Callable[[Tensor], Tensor]:
    model = loaded.model
    if layer == "head":
        if loaded.head is None:
            raise ConfigError(f"{loaded.source} has no classifier head; use --layer pool/res5/res4")
        return lambda x: loaded.head(model(x))
    if layer == "pool":
        return model
    if layer not in LAYERS:
        raise ConfigError(f"unknown layer {layer!r}; choose from {', '.join(LAYERS)}")
    return lambda x: model.forward_features(x, until=layer)[layer].mean(dim=(2, 3))


def _batches(samples: Iterator[Sample], n: int) -> Iterator[list[Sample]]:
    batch = []
    for s in samples:
        batch.append(s)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def decode_view(sample: Sample, size: int, resize: int) -> np.ndarray | None:
    """The uint8 centre view of a sample, or None (logged) when it cannot be read or decoded."""
    from seerlike.data.augment import CorruptSample, center_view

    if sample.error is not None or sample.data is None:
        log.warning("skipping sample %s: %s", sample.key, sample.error or "no image")
        return None
    try:
        return center_view(sample.data, size, resize)
    except CorruptSample as e:
        log.warning("skipping sample %s: %s", sample.key, e)
        return None


@torch.no_grad()
def unit_features(fn, unit: Unit, *, size: int, resize: int, batch_size: int, device: torch.device,
                  pool: ThreadPoolExecutor | None = None, on_batch: Callable[[int], None] | None = None
                  ) -> tuple[list[str], list[str | None], np.ndarray]:
    """Keys, labels and float32 features of every decodable sample of a unit, in unit order.

    Images are decoded in ``pool`` (one task per image); the next batch decodes while the
    current one runs through the network. Undecodable images are logged and left out.
    """
    if pool is None:
        with ThreadPoolExecutor(2) as own:
            return unit_features(fn, unit, size=size, resize=resize, batch_size=batch_size, device=device,
                                 pool=own, on_batch=on_batch)
    keys, labels, feats = [], [], []

    def submit(batch):
        return batch, [pool.submit(decode_view, s, size, resize) for s in batch]

    batches = _batches(unit.read(), batch_size)
    pending = submit(next(batches, []))
    while pending[0]:
        batch, futures = pending
        views = [f.result() for f in futures]
        pending = submit(next(batches, []))
        ok = [i for i, v in enumerate(views) if v is not None]
        if ok:
            x = to_batch([views[i] for i in ok]).to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            feats.append(fn(x).float().cpu().numpy())
            keys += [batch[i].key for i in ok]
            labels += [batch[i].label for i in ok]
        if on_batch:
            on_batch(len(batch))
    dim = feats[0].shape[1] if feats else 0
    return keys, labels, (np.concatenate(feats) if feats else np.zeros((0, dim), np.float32))


# ---------------------------------------------------------------- extraction


@dataclass(kw_only=True)
class ExtractConfig:
    layer: str = "res5"
    """Feature: res4 / res5 (average-pooled maps), pool, or head (classifier logits)."""
    image_size: int = 224
    """Centre-crop side fed to the network."""
    resize: int | None = None
    """Shorter side before the crop; None = image_size / 0.875 (the ImageNet eval ratio)."""
    batch_size: int = 128
    """Images per forward."""
    chunk_size: int = 4096
    """Rows per chunk for CSV / folder sources (shards are one chunk each)."""
    dtype: str = "float32"
    """Stored dtype: float32 or float16."""
    workers: int = 4
    """Decoding threads."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Forward under bf16 autocast (features are stored as float32/float16 either way)."""

    def __post_init__(self) -> None:
        if self.layer not in LAYERS:
            raise ValueError(f"layer must be one of {', '.join(LAYERS)}, got {self.layer!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be float32 or float16, got {self.dtype!r}")
        if self.image_size < 8 or self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError("image_size >= 8, batch_size >= 1 and chunk_size >= 1 are required")

    @property
    def resize_side(self) -> int:
        return self.resize or round(self.image_size / 0.875)


def extract(model: str, data: str, out: str | os.PathLike, cfg: ExtractConfig, *, rank: int = 0, world_size: int = 1,
            device: torch.device = torch.device("cpu"), barrier: Callable[[], None] | None = None,
            progress: bool = True, loaded=None) -> dict | None:
    """Extract this rank's units into ``out``; rank 0 finalises after ``barrier``. Returns meta on rank 0."""
    from seerlike.checkpoints import load_backbone

    out = Path(os.path.abspath(out))
    data = storage.absolute(data)
    loaded = loaded or load_backbone(model)
    loaded.model.to(device)
    if loaded.head is not None:
        loaded.head.to(device)
    fn = feature_fn(loaded, cfg.layer, cfg.precision)
    units = list_units(data, cfg.chunk_size)
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise ConfigError(f"{data}: two shards share a name; cannot key chunks by shard name")
    meta = {"layer": cfg.layer, "model": loaded.source, "arch": loaded.arch, "step": loaded.step, "data": str(data),
            "image_size": cfg.image_size, "resize": cfg.resize_side, "dtype": cfg.dtype, "num_units": len(units)}
    if (out / fstore.META).exists():
        old = json.loads((out / fstore.META).read_text())
        diff = {k: (old.get(k), v) for k, v in meta.items() if k in ("layer", "arch", "model", "data", "image_size") and old.get(k) != v}
        if diff:
            raise ConfigError(f"{out} holds features from a different extraction ({diff}); use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not (out / fstore.META).exists():
        fstore.write_meta(out, meta)
    mine = [u for i, u in enumerate(units) if i % world_size == rank]
    todo = [u for u in mine if not fstore.chunk_done(out, u.name)]
    log.info("rank %d: %d of its %d units to extract (%d already done)", rank, len(todo), len(mine), len(mine) - len(todo))
    total = sum(u.size for u in todo) if all(u.size is not None for u in todo) else None
    dim = None
    with ThreadPoolExecutor(max(cfg.workers, 1)) as pool, \
            Progress(total, f"extract {cfg.layer}", enabled=progress and rank == 0) as bar:
        for unit in todo:
            keys, labels, feats = unit_features(fn, unit, size=cfg.image_size, resize=cfg.resize_side,
                                                batch_size=cfg.batch_size, device=device, pool=pool,
                                                on_batch=bar.update)
            dim = feats.shape[1] if len(keys) else dim
            fstore.write_chunk(out, unit.name, keys, feats.astype(cfg.dtype), labels)
    (barrier or (lambda: None))()
    if rank != 0:
        return None
    missing = [n for n in names if not fstore.chunk_done(out, n)]
    if missing:
        raise RuntimeError(f"{len(missing)} chunks missing after extraction (e.g. {missing[:3]}); rerun to resume")
    if dim is None:
        dim = int(np.load(fstore.chunk_paths(out, names[0])[0], mmap_mode="r").shape[1])
    result = fstore.finalize(out, {**meta, "dim": dim})
    if result["duplicate_keys"]:
        raise RuntimeError(f"duplicate sample keys in {data}: features cannot be keyed by sample key")
    return result
