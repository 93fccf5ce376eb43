"""Data sources: folders, CSVs, brace patterns, ingest manifests, sample counts."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seerlike.config import ConfigError
from seerlike.data.sources import FileSource, ShardSource, count_tar, expand_braces, resolve
from tests.data_fixtures import cifar_images, write_shards


def test_brace_patterns_expand_in_order_with_padding() -> None:
    assert expand_braces("s3://b/p/{008..011}.tar") == [f"s3://b/p/{i:03d}.tar" for i in range(8, 12)]
    assert expand_braces("a{0..2}-{x,y}") == ["a0-x", "a0-y", "a1-x", "a1-y", "a2-x", "a2-y"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_folder_and_csv_sources_carry_labels(cifar_dir: Path) -> None:
    folder = resolve(str(cifar_dir / "val"))
    assert isinstance(folder, FileSource) and len(folder) == 1000
    classes = (cifar_dir / "classes.txt").read_text().split()
    assert folder.classes == sorted(classes)
    for key, label in zip(folder.keys[::97], folder.labels[::97]):
        assert key.split("/")[0] == folder.classes[label]
    csv_src = resolve(str(cifar_dir / "val.csv"))
    assert isinstance(csv_src, FileSource) and len(csv_src) == 1000 and csv_src.classes == folder.classes
    assert all(Path(p).exists() for p in csv_src.paths[:20])
    assert csv_src.keys[0].startswith("val/")


def test_bad_sources_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(str(tmp_path / "nope"))
    (tmp_path / "x.csv").write_text("file,label\na.jpg,1\n")
    with pytest.raises(ConfigError, match="'path' column"):
        resolve(str(tmp_path / "x.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        resolve(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(str(tmp_path / "{0..3}.tar"))


def test_shard_pattern_counts_records_even_without_an_image(tmp_path: Path, cifar_dir: Path) -> None:
    write_shards(cifar_images(cifar_dir, 25), tmp_path, [10, 15], missing_image={3})
    src = resolve(str(tmp_path / "{000000..000001}.tar"))
    assert isinstance(src, ShardSource) and src.counts == [10, 15] and len(src) == 25
    assert count_tar(str(tmp_path / "000001.tar")) == 15


def test_ingest_dataset_counts_come_from_the_manifest(tmp_path: Path, cifar_dir: Path) -> None:
    write_shards(cifar_images(cifar_dir, 30), tmp_path / "shards", [12, 18])
    rows = [(f"s{i:06d}", "shards/000000.tar" if i < 12 else "shards/000001.tar", "written") for i in range(30)]
    rows += [("dropped", "shards/000000.tar", "rejected")]
    table = pa.table({"key": [r[0] for r in rows], "shard": [r[1] for r in rows], "status": [r[2] for r in rows]})
    pq.write_table(table, tmp_path / "manifest.parquet", compression="zstd")
    src = resolve(str(tmp_path))
    assert isinstance(src, ShardSource)
    assert [Path(u).name for u in src.urls] == ["000000.tar", "000001.tar"] and src.counts == [12, 18]
