"""Two data streams in every batch: B labeled images and ``unlabeled_ratio`` x B unlabeled ones.

Each stream is an ordinary :class:`seerlike.data.pipeline.TrainData` (its own workers, views,
epochs and exact position); :class:`MixedData` zips them into one ``Batch`` whose views are the
labeled views followed by the unlabeled views, and whose state (what a checkpoint stores) is both
positions, so resume is exact as for one stream. The unlabeled stream's seed is the run's seed
plus :data:`UNLABELED_SEED_OFFSET`: the two streams draw independent augmentations.

- FixMatch: labels are the labeled images' class indices; the unlabeled views are
  ``[data view (weak), method.strong]``.
- Noisy Student: the unlabeled stream reads only the images that kept a pseudo-label (a folder
  or CSV is filtered up front; shards are joined by key, the others skipped), and labels are the
  (B + U, K) weighted target distributions of labeled then pseudo-labeled rows.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any, Callable

import torch

from seerlike.config import ConfigError
from seerlike.data.augment import AugmentConfig
from seerlike.data.pipeline import Batch, TrainData
from seerlike.data.sources import FileSource, resolve

log = logging.getLogger(__name__)

UNLABELED_SEED_OFFSET = 1_000_003
"""Added to ``loop.seed`` for the unlabeled stream (its shuffling, crops and augmentations)."""

MAX_DEVICE_TABLE_BYTES = 256 << 20
"""Pseudo-label targets up to this size live on the training device (no copy back per step); larger ones on the host."""


class MixedData:
    """Batches of a labeled and an unlabeled stream side by side (see the module docstring)."""

    def __init__(self, labeled: TrainData, unlabeled: TrainData,
                 labels: Callable[[Batch, Batch], torch.Tensor] | None = None):
        self.labeled, self.unlabeled = labeled, unlabeled
        self._labels = labels or (lambda lb, ub: lb.labels)

    def __iter__(self) -> Iterator[Batch]:
        for lb, ub in zip(self.labeled, self.unlabeled):  # both go on forever, epoch after epoch
            yield Batch(views=[*lb.views, *ub.views], keys=[*lb.keys, *ub.keys], labels=self._labels(lb, ub))

    def state_dict(self) -> dict[str, Any]:
        return {"labeled": self.labeled.state_dict(), "unlabeled": self.unlabeled.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"labeled", "unlabeled"}:
            raise ValueError(f"data state of a single stream ({sorted(state)[:4]}...) cannot continue a labeled + "
                             "unlabeled run; was the run started with another command?")
        self.labeled.load_state_dict(state["labeled"])
        self.unlabeled.load_state_dict(state["unlabeled"])


def labeled_source(source: str, endpoint_url: str | None = None) -> FileSource:
    """The labeled images: class folders or a ``path,label`` CSV with a label on every row."""
    src = resolve(source, endpoint_url)
    if not isinstance(src, FileSource) or any(label is None for label in src.labels):
        raise ConfigError(f"labeled data {source!r} must be class folders (ROOT/CLASS/IMAGE) or a path,label CSV "
                          "with a label on every row")
    return src


def unlabeled_augment(cfg) -> AugmentConfig:
    """The unlabeled images' views: FixMatch's ``[weak, strong]``, else the labeled images' own."""
    if cfg.method.name == "fixmatch":
        return dataclasses.replace(cfg.data.augment, views=[cfg.data.augment.views[0], cfg.method.strong])
    return cfg.data.augment


def build_mixed_data(cfg, *, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu") -> MixedData:
    """The two streams of a FixMatch or Noisy Student run (``cfg``: its TrainConfig) for one rank."""
    from seerlike.semisup.labeling import PseudoLabels

    method = cfg.method
    if not method.unlabeled:
        raise ConfigError(f"{method.name} needs unlabeled images: give --unlabeled (method.unlabeled)")
    device = torch.device(device)
    labeled = TrainData(cfg.data, labeled_source(cfg.data.source, cfg.data.s3_endpoint_url), rank=rank,
                        world_size=world_size, seed=cfg.loop.seed, device=device)
    u_cfg = dataclasses.replace(cfg.data, source=method.unlabeled, labels="", augment=unlabeled_augment(cfg),
                                batch_size=cfg.data.batch_size * method.unlabeled_ratio)
    source = resolve(u_cfg.source, u_cfg.s3_endpoint_url)
    labels = None
    pseudo = None
    if method.name == "noisy_student":
        if not method.pseudo_labels:
            raise ConfigError("the Noisy Student student needs method.pseudo_labels (`seerlike selftrain` sets it)")
        pseudo = PseudoLabels(method.pseudo_labels, method.num_classes)
        if isinstance(source, FileSource):  # read only the images that kept a pseudo-label
            keep = [i for i, k in enumerate(source.keys) if k in pseudo.row_of]
            source = FileSource([source.paths[i] for i in keep], [source.keys[i] for i in keep],
                                [None] * len(keep), [])
        if len(pseudo) < u_cfg.batch_size * world_size or not len(source):
            raise ConfigError(f"only {len(pseudo)} images kept a pseudo-label in {method.pseudo_labels} (threshold "
                              f"{method.threshold}, per_class {method.per_class}), fewer than one unlabeled batch "
                              f"({world_size} ranks x {u_cfg.batch_size}); lower method.threshold, raise "
                              "method.per_class, or train the teacher longer")
        table_bytes = len(pseudo) * 4 * (method.num_classes if pseudo.probs is not None else 2)
        pseudo.to(device if table_bytes <= MAX_DEVICE_TABLE_BYTES else torch.device("cpu"))

        def labels(lb: Batch, ub: Batch) -> torch.Tensor:
            onehot = torch.nn.functional.one_hot(lb.labels, method.num_classes).float()
            return torch.cat([onehot, pseudo.targets(ub.labels).to(onehot.device, non_blocking=True)])
    unlabeled = TrainData(u_cfg, source, rank=rank, world_size=world_size, seed=cfg.loop.seed + UNLABELED_SEED_OFFSET,
                          device=device)
    if pseudo is not None:
        unlabeled.label_map = pseudo.row_of  # key -> row of the pseudo-label table: what `labels` indexes
    log.info("labeled: %s, %d images, batch %d; unlabeled: %s, %d images, batch %d%s", cfg.data.source,
             labeled.num_samples, cfg.data.batch_size, method.unlabeled, unlabeled.num_samples, u_cfg.batch_size,
             f", pseudo-labels {method.pseudo_labels}" if pseudo is not None else "")
    return MixedData(labeled, unlabeled, labels)
