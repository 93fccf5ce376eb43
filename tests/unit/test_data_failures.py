"""Training data that cannot make progress stops with one message; skipped samples are logged as counts."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seerlike.data import DataConfig, build_train_data
from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.data.pipeline import NoUsableData, SkipLog
from tests.data_fixtures import cifar_images, corrupt_jpegs, write_shards

SMALL = AugmentConfig(views=[ViewConfig(count=2, size=16, scale=(0.2, 1.0))])


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "seerlike.data.pipeline" and r.levelno == logging.WARNING]


def test_skips_are_logged_as_one_count_per_interval(caplog) -> None:
    now = [0.0]
    skips = SkipLog("rank 0 worker 1", interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        skips.add("a", "cannot decode image: OSError: broken")
        for i in range(500):  # 500 skips within 10 s: nothing more logged yet
            now[0] = 9.9 * i / 500
            skips.add(f"k{i}", "cannot decode image")
        assert len(_warnings(caplog)) == 1
        now[0] = 10.0
        skips.add("z", "no image member")
        skips.flush()  # nothing new since the last line
    lines = _warnings(caplog)
    assert lines == ["rank 0 worker 1: skipping sample a: cannot decode image: OSError: broken "
                     "(further skips are counted and logged every 10 s)",
                     "rank 0 worker 1: skipped 501 samples in the last 10 s (502 in all); last error: z: no image member"]
    assert skips.total == 502 and skips.first == "a: cannot decode image: OSError: broken"


@pytest.mark.parametrize("workers", [0, 1])
def test_a_folder_of_corrupt_images_stops_with_one_message(tmp_path: Path, photos_dir: Path, workers: int,
                                                           caplog) -> None:
    corrupt_jpegs(photos_dir, tmp_path / "bad", 24)
    cfg = DataConfig(source=str(tmp_path / "bad"), batch_size=4, num_workers=workers, augment=SMALL)
    data = build_train_data(cfg, seed=0)
    with caplog.at_level(logging.WARNING), pytest.raises(NoUsableData) as e:
        next(iter(data))
    msg = str(e.value)
    assert f"data source {str(tmp_path / 'bad')!r}: none of the last 24 samples" in msg
    assert "a whole pass over its 24 samples; 24 skipped in all); first error: bad" in msg
    assert "cannot decode image" in msg or "empty image bytes" in msg
    if workers == 0:  # a worker process logs to its own copy of the handlers
        assert len(_warnings(caplog)) == 1


def _dataset(tmp_path: Path, cifar_dir: Path, sizes: list[int], bad_jpeg: set[int] = frozenset()) -> list[Path]:
    """An ingest-style dataset folder (manifest.parquet + shards/) of real CIFAR images."""
    paths = write_shards(cifar_images(cifar_dir, sum(sizes)), tmp_path / "shards", sizes, bad_jpeg=bad_jpeg)
    shard = [f"shards/{p.name}" for p, n in zip(paths, sizes) for _ in range(n)]
    pq.write_table(pa.table({"shard": shard, "status": ["written"] * len(shard)}), tmp_path / "manifest.parquet")
    return paths


@pytest.mark.parametrize("workers", [0, 1])
def test_a_dataset_whose_shards_are_gone_stops_after_one_pass(tmp_path: Path, cifar_dir: Path, workers: int) -> None:
    shutil.rmtree(_dataset(tmp_path, cifar_dir, [16, 16, 8])[0].parent)
    cfg = DataConfig(source=str(tmp_path), batch_size=4, num_workers=workers, augment=SMALL)
    with pytest.raises(NoUsableData, match=r"none of the last 40 samples .* \(a whole pass over its 40 samples; "
                                           r"3 of its shards could not be read; 40 skipped in all\); first error: "
                                           r".*shard unreadable \(ShardReadError: cannot open shard .*; "
                                           r"restore the unreadable shards"):
        next(iter(build_train_data(cfg, seed=0)))


def test_undecodable_samples_in_a_row_stop_at_the_limit_but_a_lost_shard_does_not(tmp_path: Path, cifar_dir: Path,
                                                                                one_thread) -> None:
    # shard 0: samples 4..13 undecodable (10 in a row); shard 1 (20 samples) deleted; read in order
    paths = _dataset(tmp_path, cifar_dir, [40, 20], bad_jpeg=set(range(4, 14)))
    base = dict(source=str(tmp_path), batch_size=10, num_workers=0, shuffle_buffer=1, augment=SMALL)
    with pytest.raises(NoUsableData, match=r"none of the last 10 samples .*\(data.max_consecutive_failures=10 "
                                           r"undecodable or unreadable in a row; 10 skipped in all\); first error: "
                                           r"s000004: cannot decode image.*raise data.max_consecutive_failures"):
        for _ in build_train_data(DataConfig(**base, max_consecutive_failures=10), seed=0):
            pass
    paths[1].unlink()  # 20 samples of a lost shard in a row are not undecodable samples
    data = build_train_data(DataConfig(**base, max_consecutive_failures=11), seed=0)
    keys = [k for _, b in zip(range(data.steps_per_epoch), data) for k in b.keys]
    assert len(keys) == data.steps_per_epoch * 10 == 60 and data.corrupt >= 30
    with pytest.raises(ValueError, match="max_consecutive_failures must be >= 1"):
        DataConfig(max_consecutive_failures=0)
