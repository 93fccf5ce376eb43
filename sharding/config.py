"""IngestConfig: every knob of `seerlike ingest`, one docstring per field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")

# Fields that change neither which inputs exist nor what is written for them: a rerun may
# change these freely; any other change against an existing output is refused.
RUNTIME_FIELDS = frozenset(
    {"workers", "fetch_threads", "endpoint_url", "http_timeout_s", "http_retries", "http_backoff_s", "progress", "spool_dir"}
)


@dataclass(kw_only=True, frozen=True)
class IngestConfig:
    inputs: tuple[str, ...] = ()
    """Folders, list files (.txt/.csv/.parquet, local or s3://), s3://bucket/prefix, http(s) URLs."""
    out: str = ""
    """Dataset folder or s3://bucket/prefix receiving shards/, manifest.parquet, summary.json."""
    list_column: str = ""
    """Column of CSV/parquet lists holding paths or URLs; empty: first of path, url, file, filename."""
    label_column: str = "label"
    """Column of CSV/parquet lists copied into the json and manifest as `label` when present."""
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    """File extensions picked up from folders and s3 prefixes (case-insensitive); others are skipped."""
    min_side: int = 32
    """Reject images whose shorter side is below this (too_small); 32 keeps CIFAR, use ~128 for web crawls."""
    max_aspect: float = 5.0
    """Reject images whose long/short side ratio exceeds this (extreme_aspect): banners, strips, cube maps."""
    max_pixels: int = 100_000_000
    """Reject images declaring more pixels than this, read from the header before decoding (decompression_bomb)."""
    max_bytes: int = 50_000_000
    """Reject inputs larger than this many bytes (too_many_bytes); HTTP downloads stop at this size."""
    resize_short_side: int = 512
    """Downscale so the shorter side is at most this; 512 keeps a 0.14-area 224 crop free of upsampling."""
    jpeg_quality: int = 90
    """JPEG quality of re-encoded images."""
    keep_original: bool = True
    """Store the original bytes when already an RGB JPEG, upright (no EXIF rotation) and small enough."""
    animations: Literal["first_frame", "reject"] = "first_frame"
    """Animated GIF/WebP/PNG: keep the first frame, or reject them (reason animated)."""
    phash: bool = False
    """Also store a 64-bit DCT perceptual hash per image (manifest column phash) for near-duplicate analysis."""
    dedup: bool = True
    """Exact dedup by the sha256 of the input bytes across the whole corpus; first in planned order wins."""
    dedup_partitions: int = 256
    """Hash partitions the merge spills to disk for cross-chunk dedup (memory ~ 40 B x written / partitions)."""
    chunk_size: int = 10_000
    """Inputs per chunk, the unit of work, resume and Slurm array tasks; raise to ~100k for 1B images."""
    shuffle: bool = True
    """Shuffle the whole listing (seeded, bounded memory) so every shard mixes its folders/classes/sites; false keeps listing order."""
    seed: int = 0
    """Seed of the listing shuffle; the plan is recorded, so reruns and resumes keep the same order."""
    shard_max_samples: int = 1000
    """Close a shard after this many samples."""
    shard_max_mb: float = 256.0
    """Close a shard once it reaches this many MB."""
    workers: int = 1
    """Worker processes, each ingesting whole chunks; 1 runs in the calling process."""
    fetch_threads: int = 8
    """Threads per worker fetching s3:// and http(s) inputs ahead of decoding; local files are read inline."""
    endpoint_url: str = ""
    """S3 endpoint for s3:// inputs and outputs; empty: AWS_ENDPOINT_URL from the environment, else AWS."""
    http_timeout_s: float = 10.0
    """Connect/read timeout of one HTTP attempt, in seconds."""
    http_retries: int = 3
    """Retries of an HTTP fetch after a timeout, connection error, 429 or 5xx (4xx are not retried)."""
    http_backoff_s: float = 0.5
    """First retry delay; doubled on every further retry."""
    progress: bool = True
    """Show a progress bar (images/s, written, duplicates, rejects) on stderr."""
    spool_dir: str = ""
    """Local folder for shards being written before upload to S3; empty: the system temp dir."""

    def __post_init__(self) -> None:
        checks = [
            (self.min_side >= 1, f"min_side must be >= 1, got {self.min_side}"),
            (self.max_aspect >= 1, f"max_aspect must be >= 1, got {self.max_aspect}"),
            (self.max_pixels >= 1, f"max_pixels must be >= 1, got {self.max_pixels}"),
            (self.max_bytes >= 1, f"max_bytes must be >= 1, got {self.max_bytes}"),
            (self.resize_short_side >= self.min_side, "resize_short_side must be >= min_side"),
            (1 <= self.jpeg_quality <= 100, f"jpeg_quality must be in 1..100, got {self.jpeg_quality}"),
            (1 <= self.chunk_size <= 9_999_999, f"chunk_size must be in 1..9,999,999, got {self.chunk_size}"),
            (self.shard_max_samples >= 1, f"shard_max_samples must be >= 1, got {self.shard_max_samples}"),
            (self.shard_max_mb > 0, f"shard_max_mb must be > 0, got {self.shard_max_mb}"),
            (1 <= self.dedup_partitions <= 65536, f"dedup_partitions must be in 1..65536, got {self.dedup_partitions}"),
            (self.workers >= 1, f"workers must be >= 1, got {self.workers}"),
            (self.fetch_threads >= 1, f"fetch_threads must be >= 1, got {self.fetch_threads}"),
            (self.http_timeout_s > 0, f"http_timeout_s must be > 0, got {self.http_timeout_s}"),
            (self.http_retries >= 0, f"http_retries must be >= 0, got {self.http_retries}"),
            (all(e.startswith(".") for e in self.extensions), f"extensions must start with '.', got {self.extensions}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def output_fields(self) -> dict:
        """The fields that determine the output (compared on resume)."""
        from seerlike.config import to_dict

        return {k: v for k, v in to_dict(self).items() if k not in RUNTIME_FIELDS}

    def replace(self, **changes) -> IngestConfig:
        return dataclasses.replace(self, **changes)
