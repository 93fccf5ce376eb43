"""Exact mid-epoch resume of the training data (keys and global sample indices) on 2 real ranks x 2 workers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from seerlike.data import DataConfig, build_train_data
from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.testing import run_on_ranks
from tests.data_fixtures import cifar_images, write_shards

pytestmark = pytest.mark.dist

AUG = AugmentConfig(views=[ViewConfig(count=1, size=24, scale=(0.2, 1.0), blur_p=0.5, solarize_p=0.3),
                           ViewConfig(count=1, size=12, scale=(0.05, 0.3))])


def _digest(views: list[torch.Tensor]) -> list[float]:
    # float64 sums of every view: any changed pixel changes them (compared exactly below)
    return [float(v.double().sum()) + float((v.double() ** 2).sum()) for v in views]


def _run(rank: int, world: int, source: str, stop: int, extra: int) -> dict:
    cfg = DataConfig(source=source, batch_size=8, num_workers=2, shuffle_buffer=24, augment=AUG)
    clean = build_train_data(cfg, rank=rank, world_size=world, seed=7)
    steps = clean.steps_per_epoch
    clean_keys, clean_views = [], []
    for i, batch in enumerate(clean):
        clean_keys.append(list(zip(batch.keys, batch.indices.tolist())))
        clean_views.append(_digest(batch.views))
        if i + 1 == steps + extra:  # into the next epoch too
            break
    first = build_train_data(cfg, rank=rank, world_size=world, seed=7)
    got_keys = []
    for i, batch in enumerate(first):
        got_keys.append(list(zip(batch.keys, batch.indices.tolist())))
        if i + 1 == stop:
            break
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    del first
    resumed = build_train_data(cfg, rank=rank, world_size=world, seed=7)
    resumed.load_state_dict(state)
    resumed_views = []
    for i, batch in enumerate(resumed, start=stop):
        got_keys.append(list(zip(batch.keys, batch.indices.tolist())))
        resumed_views.append(_digest(batch.views))
        if i + 1 == steps + extra:
            break
    return {"steps": steps, "clean_keys": clean_keys, "clean_views": clean_views, "got_keys": got_keys,
            "resumed_views": resumed_views, "state": state}


def _check(results: list[dict], stop: int, extra: int) -> None:
    steps = results[0]["steps"]
    assert all(r["steps"] == steps for r in results), "ranks disagree on the epoch length"
    epoch_keys = Counter(k for r in results for b in r["clean_keys"][:steps] for k in b)
    assert max(epoch_keys.values()) == 1, "a clean epoch repeats a sample"
    resumed_epoch = Counter(k for r in results for b in r["got_keys"][:steps] for k in b)
    assert resumed_epoch == epoch_keys, "interrupted + resumed epoch differs from a clean epoch"
    for r in results:
        assert r["got_keys"] == r["clean_keys"], "batch order differs after resume"
        assert r["resumed_views"] == r["clean_views"][stop:], "views differ after resume"
        assert r["state"]["step_in_epoch"] == stop


def _run_all(rank: int, world: int, scenarios: list[tuple[str, int, int]]) -> list[dict]:
    return [_run(rank, world, *sc) for sc in scenarios]


def test_epoch_resumes_exactly_on_2_ranks_x_2_workers(tmp_path: Path, cifar_dir: Path) -> None:
    # unequal shards: the workers get unequal quotas, so a resume must restart at the right worker
    sizes = [30, 45, 20, 60, 35, 50, 25, 40, 15]
    write_shards(cifar_images(cifar_dir, sum(sizes)), tmp_path / "shards", sizes, bad_jpeg={11, 140})
    shards = str(tmp_path / "shards" / "{000000..000008}.tar")
    scenarios = [(shards, 5, 3), (shards, 10, 3), (str(cifar_dir / "val.csv"), 23, 2)]
    per_rank = run_on_ranks(_run_all, 2, scenarios)
    for i, (_, stop, extra) in enumerate(scenarios):
        _check([r[i] for r in per_rank], stop, extra)
    assert per_rank[0][0]["steps"] >= 10
    assert per_rank[0][2]["steps"] == 1000 // 16
