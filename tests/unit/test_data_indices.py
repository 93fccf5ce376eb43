"""Global sample indices of training batches (the Method contract's ``needs_indices``, methods/base.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from seerlike.data import DataConfig, build_train_data
from seerlike.data.augment import AugmentConfig, ViewConfig
from tests.data_fixtures import cifar_images, write_shards

SMALL = AugmentConfig(views=[ViewConfig(count=1, size=8, scale=(0.5, 1.0))])


def _epochs(cfg: DataConfig, world: int, epochs: int = 1) -> list[list[tuple[str, int]]]:
    """(key, index) of every sample per epoch, over the ``world`` ranks (each rank built in this process)."""
    seen = [[] for _ in range(epochs)]
    for rank in range(world):
        data = build_train_data(cfg, rank=rank, world_size=world, seed=3)
        it = iter(data)
        for epoch in range(epochs):
            for _ in range(data.steps_per_epoch):
                b = next(it)
                assert b.indices.dtype == torch.long and b.indices.shape == (len(b.keys),)
                seen[epoch] += list(zip(b.keys, b.indices.tolist()))
    return seen


@pytest.fixture(scope="module")
def folder(tmp_path_factory, cifar_dir: Path) -> Path:
    """48 images in class folders: a multiple of every global batch below."""
    root = tmp_path_factory.mktemp("folder")
    for p in cifar_images(cifar_dir, 5000)[::100][:48]:
        (root / p.parent.name).mkdir(exist_ok=True)
        shutil.copy(p, root / p.parent.name / p.name)
    return root


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2)])
def test_folder_indices_are_a_permutation_and_name_the_listing_position(folder: Path, world: int, workers: int):
    cfg = DataConfig(source=str(folder), batch_size=8, num_workers=workers, augment=SMALL)
    listing = sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.jpg"))
    epochs = _epochs(cfg, world, 2)
    for seen in epochs:
        assert sorted(i for _, i in seen) == list(range(48))
        assert all(listing[i] == key for key, i in seen)
    assert epochs[0] != epochs[1]  # reshuffled per epoch, the same index for the same sample


@pytest.mark.parametrize("world,workers", [(1, 2), (2, 2)])
def test_shard_indices_are_a_permutation_numbered_shard_after_shard(tmp_path: Path, cifar_dir: Path, world: int,
                                                                    workers: int):
    # keys s{i} are numbered across the shards in order, so a sample's index is its key's number
    write_shards(cifar_images(cifar_dir, 48), tmp_path, [12, 12, 12, 12])
    cfg = DataConfig(source=str(tmp_path / "{000000..000003}.tar"), batch_size=4, num_workers=workers,
                     shuffle_buffer=5, augment=SMALL)
    seen, = _epochs(cfg, world)
    assert sorted(i for _, i in seen) == list(range(48))
    assert all(int(key[1:]) == i for key, i in seen)


def test_dataset_indices_follow_the_manifest_shard_order(tmp_path: Path, cifar_dir: Path):
    paths = write_shards(cifar_images(cifar_dir, 30), tmp_path / "shards", [12, 18])
    names = [f"shards/{p.name}" for p in paths]
    rows = [names[1]] * 18 + [names[0]] * 12  # manifest rows out of shard order: indices follow the shard names
    pq.write_table(pa.table({"shard": rows, "status": ["written"] * 30}), tmp_path / "manifest.parquet")
    cfg = DataConfig(source=str(tmp_path), batch_size=5, num_workers=0, shuffle_buffer=4, augment=SMALL)
    seen, = _epochs(cfg, 1)
    assert sorted(i for _, i in seen) == list(range(30)) and all(int(key[1:]) == i for key, i in seen)


def test_skipped_samples_leave_their_index_out(tmp_path: Path, cifar_dir: Path):
    write_shards(cifar_images(cifar_dir, 20), tmp_path, [20], bad_jpeg={6})
    cfg = DataConfig(source=str(tmp_path / "000000.tar"), batch_size=6, num_workers=0, shuffle_buffer=1, augment=SMALL)
    seen, = _epochs(cfg, 1)  # 3 batches of 6 from 19 usable samples
    assert [i for _, i in seen] == [i for i in range(20) if i != 6][:18]
