"""Streaming shards from a real S3 server through a proxy that resets connections and answers 503.

Both readers of shards are exercised: the training pipeline's (``build_train_data``) and
extraction's (``seerlike.eval.extract``, also what ``seerlike eval`` reads images with).
Extraction takes its endpoint from ``AWS_ENDPOINT_URL`` and its retries from
``storage.DEFAULT_RETRY``, as a user's ``seerlike extract --data s3://...`` does.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seerlike import storage
from seerlike.data import DataConfig, build_train_data
from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.data.s3stream import S3Stream, ShardReadError, open_shard
from seerlike.eval.extract import ExtractConfig, extract
from seerlike.eval.features import FeatureStore, chunk_paths
from tests.data_fixtures import cifar_images, write_shards
from tests.s3_faults import FaultProxy

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

SMALL = AugmentConfig(views=[ViewConfig(count=2, size=16, scale=(0.2, 1.0))])
MODEL = "random:resnet10_cifar"
EXTRACT = ExtractConfig(layer="pool", image_size=16, resize=16, batch_size=16, workers=1)
SIZES = [20, 25, 15, 30, 22, 18]
BAD_JPEG, NO_IMAGE = 9, 50
"""Sample 9's JPEG is garbage; sample 50 (in shard 2, which holds 45..59) has its json only."""


@pytest.fixture
def s3_dataset(s3_bucket, tmp_path: Path, cifar_dir: Path, monkeypatch):
    """An ingest-style dataset (6 labelled shards + manifest) on S3, its local copy, and the images' classes."""
    monkeypatch.setattr(storage, "DEFAULT_RETRY", storage.RetryPolicy(retries=2, backoff_s=0.01, max_backoff_s=0.05))
    endpoint, bucket = s3_bucket
    local = tmp_path / "ds"
    images = cifar_images(cifar_dir, 5000)[::38][:sum(SIZES)]  # every class (the files are sorted by class)
    paths = write_shards(images, local / "shards", SIZES, bad_jpeg={BAD_JPEG}, missing_image={NO_IMAGE},
                         labelled=True)
    names = [f"shards/{p.name}" for p in paths]
    rows = [names[j] for j, n in enumerate(SIZES) for _ in range(n)]
    pq.write_table(pa.table({"shard": rows, "status": ["written"] * len(rows)}), local / "manifest.parquet")
    url = f"s3://{bucket}/ds"
    for f in [*paths, local / "manifest.parquet"]:
        storage.put_file(f, storage.join(url, str(f.relative_to(local))), endpoint_url=endpoint)
    classes = {f"s{i:06d}": p.parent.name for i, p in enumerate(images)}
    return endpoint, url, local, classes


def test_stream_resumes_at_the_byte_offset(s3_dataset) -> None:
    endpoint, url, local, _ = s3_dataset
    with FaultProxy(endpoint, every=3) as proxy:
        stream = S3Stream(f"{url}/shards/000003.tar", endpoint_url=proxy.url, backoff_s=0.01)
        got = io.BufferedReader(stream).read()
    assert got == (local / "shards" / "000003.tar").read_bytes()
    assert stream.resumes >= 1 and proxy.counts["reset"] >= 1


def test_training_and_extraction_over_faulty_s3_lose_and_double_nothing(s3_dataset, tmp_path, monkeypatch) -> None:
    endpoint, url, local, classes = s3_dataset
    base = dict(batch_size=8, num_workers=2, shuffle_buffer=16, augment=SMALL, s3_backoff_s=0.01)
    local_data = build_train_data(DataConfig(source=str(local), **base), seed=5)
    local_keys = Counter(k for _, b in zip(range(local_data.steps_per_epoch), local_data) for k in b.keys)
    extract(MODEL, str(local), tmp_path / "local", EXTRACT, progress=False)
    with FaultProxy(endpoint, every=3) as proxy:
        cfg = DataConfig(source=url, s3_endpoint_url=proxy.url, **base)
        remote = build_train_data(cfg, seed=5)
        assert remote.steps_per_epoch == local_data.steps_per_epoch
        remote_keys = Counter(k for _, b in zip(range(remote.steps_per_epoch), remote) for k in b.keys)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        meta = extract(MODEL, url, tmp_path / "remote", EXTRACT, progress=False)
    assert remote_keys == local_keys and max(remote_keys.values()) == 1
    got, want = FeatureStore(tmp_path / "remote").load(), FeatureStore(tmp_path / "local").load()
    expected = [f"s{i:06d}" for i in range(130) if i not in (BAD_JPEG, NO_IMAGE)]  # undecodable: left out, logged
    assert got.keys == want.keys == expected and meta["num_samples"] == 128 and meta["data"] == url
    # the labels travel in the shards with their images: every one arrives, none is made up
    assert got.labels == [classes[k] for k in expected] and len(set(got.labels)) == 10
    np.testing.assert_array_equal(got.features, want.features)
    assert proxy.counts["503"] >= 2 and proxy.counts["reset"] >= 2


def test_sample_indices_over_s3_are_the_local_datasets(s3_dataset) -> None:
    endpoint, url, local, _ = s3_dataset
    base = dict(batch_size=8, num_workers=2, shuffle_buffer=16, augment=SMALL)

    def epoch(cfg):
        data = build_train_data(cfg, seed=5)
        return [(k, i) for _, b in zip(range(data.steps_per_epoch), data) for k, i in zip(b.keys, b.indices.tolist())]

    remote = epoch(DataConfig(source=url, s3_endpoint_url=endpoint, **base))
    assert remote == epoch(DataConfig(source=str(local), **base))
    assert all(int(k[1:]) == i for k, i in remote) and len({i for _, i in remote}) == len(remote) >= 100


def test_a_dead_shard_is_skipped_by_training_and_stops_extraction(s3_dataset, tmp_path, monkeypatch) -> None:
    endpoint, url, _, classes = s3_dataset
    shard2 = {f"s{i:06d}" for i in range(45, 60)}
    usable = {f"s{i:06d}" for i in range(130)} - shard2 - {f"s{BAD_JPEG:06d}"}
    with FaultProxy(endpoint, every=10**9, dead=("000002.tar",)) as proxy:
        with pytest.raises(ShardReadError, match="000002.tar"):
            open_shard(f"{url}/shards/000002.tar", endpoint_url=proxy.url, retries=2, backoff_s=0.01).read()
        assert proxy.counts["dead"] == 3
        base = dict(source=url, s3_endpoint_url=proxy.url, batch_size=8, num_workers=0, s3_retries=2,
                    s3_backoff_s=0.01, shuffle_buffer=1, augment=SMALL)
        # training (data.on_shard_error=skip): the dead shard's 15 samples are skipped and counted; the
        # epoch's 16 batches are filled by reading the usable samples again, never the dead shard's
        data = build_train_data(DataConfig(**base), seed=0)
        keys = [k for _, b in zip(range(data.steps_per_epoch), data) for k in b.keys]
        assert data.steps_per_epoch == 16 and len(keys) == 128 and set(keys) == usable
        assert data.corrupt >= 15 + 1 and proxy.counts["dead"] >= 3 + 3
        with pytest.raises(ShardReadError, match="000002.tar"):
            for _ in build_train_data(DataConfig(**base, on_shard_error="fatal"), seed=0):
                pass
        # extraction never leaves samples out: it stops, naming the shard, with the shards before it done
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with pytest.raises(ShardReadError, match="000002.tar"):
            extract(MODEL, url, tmp_path / "f", EXTRACT, progress=False)
    done = [u for u in (f"shard-{j:06d}" for j in range(6)) if chunk_paths(tmp_path / "f", u)[1].exists()]
    assert done == ["shard-000000", "shard-000001"]
    stamps = [chunk_paths(tmp_path / "f", u)[0].stat().st_mtime_ns for u in done]
    # the shard is back (the proxy is gone): the rerun extracts the rest only
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    meta = extract(MODEL, url, tmp_path / "f", EXTRACT, progress=False)
    assert [chunk_paths(tmp_path / "f", u)[0].stat().st_mtime_ns for u in done] == stamps
    store = FeatureStore(tmp_path / "f").load()
    assert meta["num_samples"] == 128 and store.keys == sorted(usable | shard2 - {f"s{NO_IMAGE:06d}"})
    assert store.labels == [classes[k] for k in store.keys]


def test_a_shard_missing_from_the_bucket_is_named(s3_dataset, tmp_path, monkeypatch) -> None:
    endpoint, url, _, _ = s3_dataset
    bucket = url.split("/")[2]
    boto3.client("s3", endpoint_url=endpoint).delete_object(Bucket=bucket, Key="ds/shards/000004.tar")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(ShardReadError, match="000004.tar"):
        extract(MODEL, url, tmp_path / "f", EXTRACT, progress=False)
    # training skips it (on_shard_error=skip), counting its 22 samples; fatal names it
    base = dict(source=url, s3_endpoint_url=endpoint, batch_size=8, num_workers=0, s3_retries=2,
                s3_backoff_s=0.01, shuffle_buffer=1, augment=SMALL)
    data = build_train_data(DataConfig(**base), seed=0)
    keys = {k for _, b in zip(range(data.steps_per_epoch), data) for k in b.keys}
    assert not keys & {f"s{i:06d}" for i in range(90, 112)} and data.corrupt >= 22
    with pytest.raises(ShardReadError, match="000004.tar"):
        for _ in build_train_data(DataConfig(**base, on_shard_error="fatal"), seed=0):
            pass
