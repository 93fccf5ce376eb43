"""Data path: sources, shard streaming (local / S3), augmentation, exact-resume training data."""

from seerlike.data.augment import AugmentConfig, ViewConfig, byol_views, swav_multicrop
from seerlike.data.pipeline import Batch, DataConfig, TrainData, build_train_data

__all__ = ["AugmentConfig", "Batch", "DataConfig", "TrainData", "ViewConfig", "build_train_data", "byol_views",
           "swav_multicrop"]
