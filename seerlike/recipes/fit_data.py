"""Fit a tiny recipe to the images and the time budget: views, working resolution, batch (docs/fit_data.md).

The ``tiny_*`` recipes were tuned on 32 px CIFAR images: 24 px views cut at a scale range of
the image's area, kNN and k-means features on whole images. On other images this module keeps
the recipe and chooses the absolute sizes from what the data give and what the budget buys:

1. **native side**: the 25% quantile of the images' shorter sides (three images in four have at
   least this many pixels), from the ingest manifest or from a sample of headers;
2. **views**: the recipe's own size, grown in steps of 8 px only while the stage's budget still
   trains on ``MIN_IMAGES`` images (steps x global batch) by the step-cost model ``StepCost``,
   and no larger than the smallest crop of a native image (at these budgets steps are worth
   more than pixels: docs/fit_data.md, "Why steps first"); every view group scaled together, scale
   ranges unchanged;
3. **working resolution R** (the ingest's shorter side; kNN, k-means and export on whole images
   at R): the smallest multiple of 8 at which the smallest crop of the first view group is cut
   at no fewer pixels than the view (never upsampled), capped at the native side;
4. **batch**: the recipe's, unless the data are too few for two batches per rank per epoch;
   **shards** of at most ``SHARD_SAMPLES`` images, at least one per rank.

On 32 px images the rule returns the recipes' own settings (24 px views, R 32) whatever the
budget. Pure functions of (statistics, budget, recipe); the callers (`seerlike quickstart`,
``seerlike train --fit-data``) turn a :class:`Fit` into explicit ``key=value`` overrides, so the
chosen values are in the run's config.yaml.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from seerlike.config import ConfigError, to_dict

MIN_IMAGES = 160_000
"""Images (steps x global batch, each with all its views) a stage's budget must train on before its views grow
past the recipe's: 1,250 steps of the tiny recipes' global batch 128 (docs/fit_data.md, "Why steps first, and why 160,000 images")."""
VIEW_STEP = 8
"""Views grow from the recipe's size in steps of this many pixels; resolutions are multiples of it."""
NATIVE_QUANTILE = 0.25
"""Quantile of the images' shorter sides taken as the data's native side."""
SHARD_SAMPLES = 200
"""Images per ingest shard (exact reading needs a shard per rank; 200 keeps ~400 images on 2 ranks)."""
HEADER_SAMPLE = 256
"""Images whose headers are read when the data are not ingested yet (a seeded sample of the listing)."""
MANIFEST_SAMPLE = 100_000
"""Manifest rows whose sizes are read (the first ones; the ingest shuffles each chunk)."""


@dataclass(frozen=True, kw_only=True)
class StepCost:
    """Seconds per optimizer step on the 2-core CPU path (2 ranks x 1 thread, bf16, channels_last).

    ``fixed_s + pixel_s x flops(model) / flops(resnet10_cifar) x batch x sum(count x size^2)``:
    the per-rank view pixels of a step, weighted by the backbone's FLOPs per pixel. ``tiny_swav``
    on 64 px images at 24, 32, 48 and 64 px views cost 3.1e-6 CPU seconds per view pixel per
    rank with no measurable fixed part (docs/fit_data.md, "Step cost"); wall seconds on the idle
    2-core VM are about 1.15x that. The stages still time their own first steps
    (``loop.time_budget_s``): this only ranks resolutions.
    """

    fixed_s: float = 0.02
    """Per-step cost that does not grow with the views (optimizer, all-reduce, heads, Sinkhorn)."""
    pixel_s: float = 3.6e-6
    """Wall seconds per view pixel per rank through resnet10_cifar (forward, backward, decode, crops)."""

    def step_s(self, cfg: Any, view_sizes: list[int], batch_size: int) -> float:
        pixels = sum(v.count * s * s for v, s in zip(cfg.data.augment.views, view_sizes))
        return self.fixed_s + self.pixel_s * flops_ratio(cfg.model.name) * batch_size * pixels


def flops_ratio(model: str) -> float:
    """FLOPs per pixel of ``model`` over resnet10_cifar's (both at 32 px; small-stem nets scale with pixels)."""
    from seerlike.models import spec

    return spec(model).complexity(32, None)["flops"] / spec("resnet10_cifar").complexity(32, None)["flops"]


# ---------------------------------------------------------------- what the data give


@dataclass(frozen=True)
class DataStats:
    """How many images, and the shorter side of (a sample of) them."""

    count: int
    """Images in the data (manifest: written; a folder or list: listed)."""
    short_sides: tuple[int, ...]
    """Shorter side of each measured image, ascending."""
    where: str
    """What was read: the manifest, or how many headers of how many files."""

    def __post_init__(self) -> None:
        if not self.short_sides:
            raise ConfigError(f"{self.where}: no image size could be read; the rule reads an image folder, "
                              "a list file (txt, csv, parquet) or an ingested dataset")

    @property
    def native_side(self) -> int:
        """The ``NATIVE_QUANTILE`` of the shorter sides (nearest rank)."""
        return self.short_sides[max(0, math.ceil(NATIVE_QUANTILE * len(self.short_sides)) - 1)]

    def describe(self) -> str:
        s = self.short_sides
        return (f"{self.count} images; shorter side min {s[0]}, 25% {self.native_side}, "
                f"median {s[len(s) // 2]}, max {s[-1]} px ({self.where})")


def stats_from_sizes(count: int, sizes: list[tuple[int, int]], where: str) -> DataStats:
    return DataStats(count, tuple(sorted(min(w, h) for w, h in sizes if w > 0 and h > 0)), where)


def stats_from_manifest(dataset: str, endpoint_url: str | None = None) -> DataStats:
    """From an ingested dataset: stored sizes of written rows (the first ``MANIFEST_SAMPLE``), count from summary.json."""
    from sharding.manifest import iter_manifest, read_summary

    sizes: list[tuple[int, int]] = []
    seen = 0
    for batch in iter_manifest(dataset, ["status", "width", "height"], endpoint_url=endpoint_url):
        d = batch.to_pydict()
        for st, w, h in zip(d["status"], d["width"], d["height"]):
            if st == "written" and w and h:
                seen += 1
                if len(sizes) < MANIFEST_SAMPLE:
                    sizes.append((w, h))
        if len(sizes) >= MANIFEST_SAMPLE:
            break
    try:
        count = int(read_summary(dataset, endpoint_url=endpoint_url)["written"])
    except Exception:  # noqa: BLE001 - no summary: the rows read are the count
        count = seen
    return stats_from_sizes(count, sizes, f"manifest of {dataset}")


def _header_size(ref: str, endpoint_url: str | None) -> tuple[int, int] | None:
    """(width, height) from the image's header; None when it is not a readable image."""
    import io

    from PIL import Image

    from seerlike import storage

    try:
        if storage.is_s3_url(ref) or storage.is_http_url(ref):
            from sharding.config import IngestConfig
            from sharding.sources import fetch

            with Image.open(io.BytesIO(fetch(ref, IngestConfig(endpoint_url=endpoint_url or "")))) as im:
                return im.size
        with Image.open(ref) as im:  # lazy: reads the header only
            return im.size
    except Exception:  # noqa: BLE001 - unreadable files are the ingest's business, not the rule's
        return None


def stats_from_images(inputs: str, sample: int = HEADER_SAMPLE, seed: int = 0,
                      endpoint_url: str | None = None) -> DataStats:
    """Before ingest: the listing of ``inputs`` (what `seerlike ingest` would read) and the headers of a seeded sample."""
    from sharding.config import IngestConfig
    from sharding.sources import check_inputs, iter_sources

    cfg = IngestConfig(inputs=(inputs,), endpoint_url=endpoint_url or "")
    check_inputs(cfg)
    refs = [s.ref for s in iter_sources(cfg)]
    if not refs:
        raise ConfigError(f"{inputs}: no images listed (extensions {', '.join(cfg.extensions)})")
    picked = sorted(random.Random(seed).sample(range(len(refs)), min(sample, len(refs))))
    sizes = [s for s in (_header_size(refs[i], endpoint_url) for i in picked) if s is not None]
    return stats_from_sizes(len(refs), sizes, f"headers of {len(sizes)} of {len(refs)} files in {inputs}")


def data_stats(source: str, endpoint_url: str | None = None) -> DataStats:
    """An ingested dataset (folder or s3:// prefix with manifest.parquet) by its manifest, anything else by headers."""
    from seerlike import storage

    if storage.is_s3_url(source):
        if storage.exists(storage.join(source, "manifest.parquet"), endpoint_url=endpoint_url):
            return stats_from_manifest(source, endpoint_url)
        return stats_from_images(source, endpoint_url=endpoint_url)
    local = source.removeprefix("file://")
    if os.path.isfile(os.path.join(local, "manifest.parquet")):
        return stats_from_manifest(local)
    return stats_from_images(local)


# ---------------------------------------------------------------- the rule


@dataclass(frozen=True, kw_only=True)
class Fit:
    """What the rule chose for one training stage, and why."""

    native_side: int
    """The data's native shorter side (see ``DataStats.native_side``)."""
    resolution: int
    """Working resolution: the ingest's shorter side, kNN / k-means / export image size."""
    view_sizes: tuple[int, ...]
    """Side of each view group of the recipe, in its order."""
    batch_size: int
    """Images per rank per step."""
    shard_samples: int
    """Images per ingest shard."""
    step_s: float
    """Predicted seconds per step at these views (``StepCost``)."""
    steps: int
    """Predicted steps in the budget."""
    images: int
    """Predicted images trained on (steps x batch x ranks)."""
    reasons: tuple[str, ...] = field(default=())
    """One line per decision, in words (printed, and in the quickstart's report)."""

    def to_json(self) -> dict:
        return asdict(self)


def _scaled_views(cfg: Any, first: int) -> list[int]:
    """Every view group's size with the first one at ``first`` (DINO's local crops stay half the global ones)."""
    base = cfg.data.augment.views[0].size
    return [max(1, round(v.size * first / base)) for v in cfg.data.augment.views]


def _batch(cfg: Any, count: int, ranks: int) -> int:
    per_rank = count // ranks
    if per_rank < 4:
        raise ConfigError(f"{count} images are too few to train on {ranks} rank(s): "
                          f"give at least {4 * ranks} (two batches of 2 per rank)")
    return min(cfg.data.batch_size, per_rank // 2)


def smallest_crop(cfg: Any) -> float:
    """Side of the smallest crop of the recipe's first view group, as a fraction of the image's side."""
    return math.sqrt(cfg.data.augment.views[0].scale[0])


def choose(stats: DataStats, cfg: Any, *, budget_s: float, ranks: int = 2, max_resolution: int | None = None,
           cost: StepCost = StepCost()) -> Fit:
    """The views, working resolution and batch of recipe ``cfg`` for these data and ``budget_s`` seconds of steps.

    ``max_resolution``: the images are already at this resolution (a later stage of a pipeline
    whose ingest resized them for its first stage); only the views are chosen.
    """
    if budget_s <= 0:
        raise ConfigError(f"the rule needs a time budget in seconds (> 0), got {budget_s}")
    native = stats.native_side
    side = min(native, max_resolution) if max_resolution else native  # of the images the views are cut from
    batch = _batch(cfg, stats.count, ranks)
    base, crop = cfg.data.augment.views[0].size, smallest_crop(cfg)
    largest = int(side * crop)  # a larger view would upsample the smallest crop of an image
    candidates = [base] + list(range((base // VIEW_STEP + 1) * VIEW_STEP, largest + 1, VIEW_STEP))

    def plan(view: int) -> tuple[list[int], float, int, int]:
        views = _scaled_views(cfg, view)
        step_s = cost.step_s(cfg, views, batch)
        steps = int(budget_s / step_s)
        return views, step_s, steps, steps * batch * ranks

    fits = [v for v in candidates if plan(v)[3] >= MIN_IMAGES]
    view = max(fits) if fits else base
    views, step_s, steps, images = plan(view)
    if max_resolution:
        resolution = side
    else:
        resolution = min(native, math.ceil(view / crop / VIEW_STEP) * VIEW_STEP)
    buys = f"{budget_s:.0f} s buy ~{steps} steps x {batch * ranks} = {images:,} images ({step_s:.3f} s/step)"
    group = " + ".join(f"{v.count} x {s}" for v, s in zip(cfg.data.augment.views, views))
    reasons = [f"native side {native} px: the {NATIVE_QUANTILE:.0%} quantile of the shorter sides of {stats.where}"]
    if not fits:
        reasons.append(f"views {group} px, the recipe's: {buys}, fewer than {MIN_IMAGES:,} even there")
    elif view == candidates[-1]:
        reasons.append(f"views {group} px: {buys} (>= {MIN_IMAGES:,}); larger views would upsample the smallest "
                       f"crops ({crop:.2f} of the {side} px side)")
    else:
        nxt = candidates[candidates.index(view) + 1]
        own = "the recipe's, " if view == base else ""
        reasons.append(f"views {group} px: {own}the largest at which {buys} (>= {MIN_IMAGES:,}); "
                       f"{nxt} px: {plan(nxt)[3]:,}")
    if max_resolution:
        reasons.append(f"images at the pipeline's {resolution} px")
    else:
        capped = " (the native side)" if resolution == native else ""
        reasons.append(f"resolution {resolution} px{capped}: the smallest multiple of {VIEW_STEP} at which the "
                       f"smallest crops (scale {cfg.data.augment.views[0].scale[0]:g}: {crop:.2f} of the side) are "
                       f"cut at >= {view} px, never upsampled; kNN, k-means and export on whole images at it")
    if batch != cfg.data.batch_size:
        reasons.append(f"batch {batch} per rank (recipe {cfg.data.batch_size}): {stats.count} images on {ranks} "
                       "ranks allow two batches per rank per epoch")
    shard = max(1, min(SHARD_SAMPLES, math.ceil(stats.count / ranks)))
    return Fit(native_side=native, resolution=resolution, view_sizes=tuple(views), batch_size=batch,
               shard_samples=shard, step_s=round(step_s, 4), steps=steps, images=images, reasons=tuple(reasons))


def overrides(fit: Fit, cfg: Any) -> list[str]:
    """``key=value`` strings that set the fit on ``cfg``: the whole view list (sizes replaced), the batch, and
    the evaluation crop of the run's own features (whole images at the working resolution)."""
    views = []
    for v, size in zip(cfg.data.augment.views, fit.view_sizes):
        d = to_dict(v)
        d["size"] = size
        views.append(d)
    return [f"data.augment.views={json.dumps(views, separators=(',', ':'))}", f"data.batch_size={fit.batch_size}",
            f"eval.image_size={fit.resolution}", f"eval.resize={fit.resolution}"]


def fit_recipe(cfg: Any, ranks: int = 1) -> tuple[list[str], Fit]:
    """``seerlike train --fit-data``: the fit of a resolved config to its ``data.source`` and ``loop.time_budget_s``.

    Returns the overrides (to go before the user's own, which win) and the fit (for its reasons).
    """
    if cfg.loop.time_budget_s <= 0:
        raise ConfigError("--fit-data chooses the views the time budget affords: set loop.time_budget_s=SECONDS "
                          "(and loop.budget_clock=cpu to count CPU seconds)")
    if not cfg.data.source:
        raise ConfigError("--fit-data reads the images: give --data (a folder, list file or ingested dataset)")
    stats = data_stats(cfg.data.source, endpoint_url=cfg.data.s3_endpoint_url)
    fit = choose(stats, cfg, budget_s=cfg.loop.time_budget_s, ranks=ranks)
    return overrides(fit, cfg), fit
