"""Training and evaluation data: epoch plans, batches, corrupt samples, shard failures, eval order."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from seerlike.config import ConfigError, undocumented
from seerlike.data import DataConfig, build_train_data
from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.data.s3stream import ShardReadError
from seerlike.data.shards import plan_epoch
from seerlike.data.sources import FileSource, ShardSource
from tests.data_fixtures import cifar_images, write_shards

SMALL = AugmentConfig(views=[ViewConfig(count=2, size=16, scale=(0.2, 1.0), blur_p=0.5)])


def test_configs_document_every_field() -> None:
    assert undocumented(DataConfig) == []
    with pytest.raises(ValueError, match="epoch_steps"):
        DataConfig(resampled=True)


def test_a_saved_config_with_the_removed_eval_keys_loads_and_an_override_of_one_names_the_fix(
        tmp_path: Path, caplog, monkeypatch) -> None:
    from seerlike import config as configlib
    from seerlike import recipes
    from seerlike.api import train_config

    monkeypatch.setattr(configlib, "_warned_removed", set())
    cfg = recipes.get("tiny_swav")
    text = configlib.dumps(cfg)
    assert "eval_size" not in text
    # a run's config.yaml written before data.eval_size / data.eval_resize went away
    old = text.replace("\n  labels: ''\n", "\n  eval_size: 224\n  eval_resize: 256\n  labels: ''\n")
    assert "eval_resize: 256" in old
    (tmp_path / "config.yaml").write_text(old)
    with caplog.at_level(logging.WARNING, logger="seerlike.config"):
        assert train_config(None, tmp_path) == cfg  # `seerlike train --run-dir RUN` continues it
        assert configlib.loads(old) == cfg
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and "ignoring data.eval_size=224, no longer a setting" in warned[0]
    assert "seerlike extract --image-size" in warned[0] and "data.eval_resize=256" in warned[1]
    # setting one is a mistake to point out, not to ignore
    with pytest.raises(ConfigError, match=r"^data.eval_size is no longer a setting: .*`seerlike extract --image-size`"):
        configlib.apply_overrides(cfg, ["data.eval_size=32"])
    with pytest.raises(ConfigError, match="unknown key 'data.eval_sise' in DataConfig"):
        configlib.apply_overrides(cfg, ["data.eval_sise=32"])


def test_shard_plan_permutes_per_epoch_and_balances_ranks() -> None:
    counts = [37, 50, 12, 64, 20, 45, 33, 28, 51, 40, 9]
    src = ShardSource([f"{i}.tar" for i in range(len(counts))], counts)
    plans = [plan_epoch(src, epoch=e, seed=3, world_size=2, num_workers=2, batch_size=8) for e in range(3)]
    for p in plans:
        shards = [s for row in p.workers for w in row for s in w.shards]
        assert sorted(shards) == list(range(len(counts)))  # every shard once
        for row in p.workers:
            assert sum(w.quota for w in row) == p.steps  # every rank makes the same number of steps
            assert all(w.quota * 8 <= sum(counts[s] for s in w.shards) for w in row)
    firsts = {tuple(p.workers[0][0].shards) for p in plans}
    assert len(firsts) == 3  # rank 0 worker 0 reads different shards every epoch
    with pytest.raises(ConfigError, match="fewer data.num_workers"):
        plan_epoch(src, epoch=0, seed=0, world_size=4, num_workers=3, batch_size=8)
    rs = plan_epoch(src, epoch=0, seed=0, world_size=4, num_workers=3, batch_size=8, resampled=True, epoch_steps=10)
    assert rs.steps == 10 and all(sum(w.quota for w in row) == 10 for row in rs.workers)


def test_file_plan_splits_a_permutation_across_ranks() -> None:
    src = FileSource([f"{i}" for i in range(100)], [f"k{i}" for i in range(100)], [None] * 100, [])
    p = plan_epoch(src, epoch=0, seed=0, world_size=3, num_workers=2, batch_size=8)
    assert p.steps == 100 // 24
    files = [f for row in p.workers for w in row for f in w.files]
    assert len(files) == len(set(files)) == p.steps * 24
    assert plan_epoch(src, epoch=1, seed=0, world_size=3, num_workers=2, batch_size=8).workers[0][0].files != \
        p.workers[0][0].files


def test_folder_batches_have_the_views_keys_and_labels(cifar_dir: Path) -> None:
    cfg = DataConfig(source=str(cifar_dir / "val"), batch_size=50, num_workers=2, augment=SMALL)
    data = build_train_data(cfg, rank=1, world_size=2, seed=0)
    assert data.steps_per_epoch == 10
    keys, it = [], iter(data)
    for _ in range(10):
        b = next(it)
        assert [tuple(v.shape) for v in b.views] == [(50, 3, 16, 16)] * 2 and b.views[0].dtype == torch.float32
        assert b.labels.dtype == torch.long and len(b.keys) == 50
        assert [k.split("/")[0] for k in b.keys] == [data.source.classes[i] for i in b.labels]
        keys += b.keys
    assert len(set(keys)) == 500 and data.epoch == 0 and data.step_in_epoch == 10
    next(it)
    assert data.epoch == 1 and data.step_in_epoch == 1
    json.dumps(data.state_dict())


def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path, cifar_dir: Path, caplog) -> None:
    write_shards(cifar_images(cifar_dir, 34), tmp_path, [34], bad_jpeg={4}, missing_image={20})
    cfg = DataConfig(source=str(tmp_path / "000000.tar"), batch_size=8, num_workers=0, shuffle_buffer=10, augment=SMALL)
    data = build_train_data(cfg, seed=0)
    assert data.steps_per_epoch == 4
    with caplog.at_level(logging.WARNING):
        keys = [k for _, b in zip(range(4), data) for k in b.keys]
    assert sorted(keys) == sorted(f"s{i:06d}" for i in range(34) if i not in (4, 20))
    assert data.corrupt == 2 and "s000004" in caplog.text and "no image member" in caplog.text


def test_failing_shard_is_skipped_or_fatal(tmp_path: Path, cifar_dir: Path) -> None:
    paths = write_shards(cifar_images(cifar_dir, 40), tmp_path / "shards", [20, 20])
    shard = [f"shards/{p.name}" for p in paths]
    pq.write_table(pa.table({"shard": [shard[i // 20] for i in range(40)], "status": ["written"] * 40}),
                   tmp_path / "manifest.parquet")
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2] + b"\x07" * 1000)  # the manifest says 20 samples; it breaks half way
    base = dict(source=str(tmp_path), batch_size=4, num_workers=0, shuffle_buffer=1, augment=SMALL)
    skip = build_train_data(DataConfig(**base), seed=0)
    keys = [k for _, b in zip(range(skip.steps_per_epoch), skip) for k in b.keys]
    # the 8 lost samples are counted; to keep every rank in step the worker re-reads its stream for the rest
    assert len(keys) == skip.steps_per_epoch * 4 == 40 and skip.corrupt >= 8
    assert set(range(20)) | set(range(20, 31)) <= {int(k[1:]) for k in keys} <= set(range(32))
    fatal = build_train_data(DataConfig(**base, on_shard_error="fatal"), seed=0)
    with pytest.raises(ShardReadError, match="000001.tar"):
        for _ in fatal:
            pass


def test_resume_with_another_world_size_starts_the_next_epoch(cifar_dir: Path, caplog) -> None:
    cfg = DataConfig(source=str(cifar_dir / "val"), batch_size=20, num_workers=0, augment=SMALL)
    a = build_train_data(cfg, rank=0, world_size=2, seed=0)
    next(iter(a))
    b = build_train_data(cfg, rank=0, world_size=1, seed=0)
    with caplog.at_level(logging.WARNING):
        b.load_state_dict(a.state_dict())
    assert b.epoch == 1 and b.step_in_epoch == 0 and "cannot be continued exactly" in caplog.text
