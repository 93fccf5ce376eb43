"""Streaming shards from a real S3 server through a proxy that resets connections and answers 503."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seerlike import storage
from seerlike.data import DataConfig, build_eval_data, build_train_data
from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.data.s3stream import S3Stream, ShardReadError, open_shard
from tests.data_fixtures import cifar_images, write_shards
from tests.s3_faults import FaultProxy

pytestmark = pytest.mark.integration

SMALL = AugmentConfig(views=[ViewConfig(count=2, size=16, scale=(0.2, 1.0))])


@pytest.fixture
def s3_dataset(s3_bucket, tmp_path: Path, cifar_dir: Path):
    """An ingest-style dataset (6 shards + manifest) on S3 and its local copy."""
    endpoint, bucket = s3_bucket
    local = tmp_path / "ds"
    sizes = [20, 25, 15, 30, 22, 18]
    paths = write_shards(cifar_images(cifar_dir, sum(sizes)), local / "shards", sizes, bad_jpeg={9}, missing_image={50})
    names = [f"shards/{p.name}" for p in paths]
    rows = [names[j] for j, n in enumerate(sizes) for _ in range(n)]
    pq.write_table(pa.table({"shard": rows, "status": ["written"] * len(rows)}), local / "manifest.parquet")
    url = f"s3://{bucket}/ds"
    for f in [*paths, local / "manifest.parquet"]:
        storage.put_file(f, storage.join(url, str(f.relative_to(local))), endpoint_url=endpoint)
    return endpoint, url, local


def test_stream_resumes_at_the_byte_offset(s3_dataset) -> None:
    endpoint, url, local = s3_dataset
    with FaultProxy(endpoint, every=3) as proxy:
        stream = S3Stream(f"{url}/shards/000003.tar", endpoint_url=proxy.url, backoff_s=0.01)
        got = io.BufferedReader(stream).read()
    assert got == (local / "shards" / "000003.tar").read_bytes()
    assert stream.resumes >= 1 and proxy.counts["reset"] >= 1


def test_training_and_eval_over_faulty_s3_lose_and_double_nothing(s3_dataset) -> None:
    endpoint, url, local = s3_dataset
    base = dict(batch_size=8, num_workers=2, shuffle_buffer=16, augment=SMALL, s3_backoff_s=0.01)
    local_data = build_train_data(DataConfig(source=str(local), **base), seed=5)
    local_keys = Counter(k for _, b in zip(range(local_data.steps_per_epoch), local_data) for k in b.keys)
    with FaultProxy(endpoint, every=3) as proxy:
        cfg = DataConfig(source=url, s3_endpoint_url=proxy.url, **base)
        remote = build_train_data(cfg, seed=5)
        assert remote.steps_per_epoch == local_data.steps_per_epoch
        remote_keys = Counter(k for _, b in zip(range(remote.steps_per_epoch), remote) for k in b.keys)
        ev = build_eval_data(DataConfig(source=url, s3_endpoint_url=proxy.url, batch_size=16, num_workers=2,
                                        eval_size=16, eval_resize=16, s3_backoff_s=0.01))
        eval_keys = Counter(k for b in ev for k in b.keys)
    assert remote_keys == local_keys and max(remote_keys.values()) == 1
    expected = Counter(f"s{i:06d}" for i in range(130) if i not in (9, 50))  # the bad JPEG and the missing image
    assert eval_keys == expected and ev.corrupt == 2
    assert proxy.counts["503"] >= 2 and proxy.counts["reset"] >= 2


def test_sample_indices_over_s3_are_the_local_datasets(s3_dataset) -> None:
    endpoint, url, local = s3_dataset
    base = dict(batch_size=8, num_workers=2, shuffle_buffer=16, augment=SMALL)

    def epoch(cfg):
        data = build_train_data(cfg, seed=5)
        return [(k, i) for _, b in zip(range(data.steps_per_epoch), data) for k, i in zip(b.keys, b.indices.tolist())]

    remote = epoch(DataConfig(source=url, s3_endpoint_url=endpoint, **base))
    assert remote == epoch(DataConfig(source=str(local), **base))
    assert all(int(k[1:]) == i for k, i in remote) and len({i for _, i in remote}) == len(remote) >= 100


def test_a_dead_shard_is_skipped_or_fatal(s3_dataset) -> None:
    endpoint, url, _ = s3_dataset
    with FaultProxy(endpoint, every=10**9, dead=("000002.tar",)) as proxy:
        with pytest.raises(ShardReadError, match="000002.tar"):
            open_shard(f"{url}/shards/000002.tar", endpoint_url=proxy.url, retries=2, backoff_s=0.01).read()
        base = dict(source=url, s3_endpoint_url=proxy.url, batch_size=8, num_workers=0, s3_retries=2,
                    s3_backoff_s=0.01, eval_size=16, eval_resize=16)
        ev = build_eval_data(DataConfig(**base))
        keys = {k for b in ev for k in b.keys}
        # shard 2 holds samples 45..59 (the missing image, 50, among them); sample 9 is a bad JPEG
        assert keys == {f"s{i:06d}" for i in range(130) if not 45 <= i < 60 and i != 9}
        assert ev.corrupt == 15 + 1 and proxy.counts["dead"] == 3 + 3
        with pytest.raises(ShardReadError, match="000002.tar"):
            for _ in build_eval_data(DataConfig(**base, on_shard_error="fatal")):
                pass


def test_webdataset_reads_s3_through_our_opener(s3_dataset) -> None:
    import webdataset as wds

    from seerlike.data.s3stream import register_webdataset_opener

    import importlib

    schemes = importlib.import_module("webdataset.gopen").gopen_schemes
    endpoint, url, _ = s3_dataset
    old = schemes.get("s3")
    with FaultProxy(endpoint, every=3) as proxy:
        register_webdataset_opener(proxy.url)
        try:
            ds = wds.WebDataset(f"{url}/shards/{{000000..000005}}.tar", shardshuffle=False, empty_check=False)
            keys = Counter(sample["__key__"] for sample in ds)
        finally:  # the opener is process-wide: leave webdataset as it was
            schemes.pop("s3")
            if old is not None:
                schemes["s3"] = old
    assert keys == Counter(f"s{i:06d}" for i in range(130)) and proxy.counts["reset"] >= 1
