"""Hostile storage on a real S3 server (moto, loopback): keys that leave their folder,
credentials inside endpoint URLs, and connections cut in the middle of every kind of object."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seerlike import config as configlib
from seerlike import storage
from seerlike.data.s3stream import open_shard
from seerlike.data.sources import resolve
from seerlike.engine.checkpoint import COMPLETE, CheckpointConfig, Checkpointer
from sharding.manifest import iter_manifest, read_table
from tests.data_fixtures import cifar_images, write_shards
from tests.s3_faults import FaultProxy, ResetProxy

pytestmark = pytest.mark.integration

SECRET = "wJalrXUtnFEMI-sEcReT-4242"


@pytest.fixture
def fast_retries(monkeypatch):
    """The real retry policy with millisecond delays, so dozens of resets fit in a second."""
    monkeypatch.setattr(storage, "DEFAULT_RETRY", storage.RetryPolicy(retries=8, backoff_s=0.002, max_backoff_s=0.02))


def _raw(endpoint: str):
    """A plain boto3 client: how a hostile or careless writer puts objects in the bucket."""
    return boto3.client("s3", endpoint_url=endpoint)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _manifest_bytes(rows: int = 3000) -> bytes:
    """An uncompressed manifest-like parquet of ~400 KB (random sources: nothing compresses)."""
    table = pa.table({"key": [f"s{i:06d}" for i in range(rows)],
                      "shard": [f"shards/{i % 5:06d}.tar" for i in range(rows)],
                      "status": ["written"] * rows,
                      "source": [os.urandom(48).hex() for _ in range(rows)]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="none")
    return sink.getvalue().to_pybytes()


# ---------------------------------------------------------------- 1. nothing escapes its folder


@pytest.mark.parametrize("rel", ["../../evil", "ABSOLUTE/abs_evil"])
def test_checkpoint_keys_that_leave_the_cache_are_refused(s3_bucket, tmp_path, monkeypatch, rel):
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    rel = rel.replace("ABSOLUTE", str(tmp_path))  # "/tmp/.../abs_evil": pathlib would join it as absolute
    step = "run/ckpts/step_00000010"
    s3 = _raw(endpoint)
    for name in (".metadata", "meta.json", COMPLETE):
        s3.put_object(Bucket=bucket, Key=f"{step}/{name}", Body=b"{}")
    hostile = f"{step}/{rel}"
    s3.put_object(Bucket=bucket, Key=hostile, Body=b"written outside the cache")
    assert hostile in {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}  # stored as is
    before = _files(tmp_path)

    ckpt = Checkpointer(CheckpointConfig(dir=f"s3://{bucket}/run/ckpts"), tmp_path / "run")
    with pytest.raises(storage.UnsafeKeyError) as err:
        ckpt.find_latest()
    assert repr(hostile) in str(err.value) and repr(bucket) in str(err.value)
    assert _files(tmp_path) == before  # nothing written: not the evil file, not the checkpoint's others
    assert not (tmp_path / "run" / "evil").exists() and not (tmp_path / "abs_evil").exists()


def test_get_tree_maps_plain_keys_and_skips_folder_markers(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    s3 = _raw(endpoint)
    for key in ("p/a.bin", "p/sub/b.bin", "p/sub/"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"" if key.endswith("/") else key.encode())
    got = storage.get_tree(f"s3://{bucket}/p", tmp_path / "out", endpoint_url=endpoint)
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in got) == ["a.bin", "sub/b.bin"]
    assert (tmp_path / "out" / "sub" / "b.bin").read_bytes() == b"p/sub/b.bin"


@pytest.mark.parametrize("where", ["s3", "local"])
def test_manifest_shards_that_leave_the_dataset_are_refused(s3_bucket, tmp_path, where):
    endpoint, bucket = s3_bucket
    table = pa.table({"shard": ["shards/000000.tar", "../../elsewhere/000001.tar"], "status": ["written"] * 2})
    local = tmp_path / "ds"
    local.mkdir()
    pq.write_table(table, local / "manifest.parquet")
    source = str(local)
    if where == "s3":
        source = f"s3://{bucket}/ds"
        storage.put_file(local / "manifest.parquet", f"{source}/manifest.parquet", endpoint_url=endpoint)
    with pytest.raises(storage.UnsafeKeyError, match=r"'\.\./\.\./elsewhere/000001\.tar'.*manifest"):
        resolve(source, endpoint)


# ---------------------------------------------------------------- 2. credentials in endpoint URLs


def _with_credentials(endpoint: str) -> str:
    return endpoint.replace("http://", f"http://AKIDEXAMPLE:{SECRET}@")


def test_ingest_with_credentials_in_the_endpoint_leaves_no_secret(s3_bucket, photos_dir, tmp_path, caplog):
    from sharding.config import IngestConfig
    from sharding.ingest import ingest

    endpoint, bucket = s3_bucket
    secret_endpoint = _with_credentials(endpoint)
    storage.write_bytes(f"s3://{bucket}/raw/a.jpg", (photos_dir / "pillow_hopper.jpg").read_bytes(),
                        endpoint_url=endpoint)
    listing = tmp_path / "list.txt"
    listing.write_text(f"s3://{bucket}/raw/a.jpg\ns3://{bucket}/raw/missing.jpg\n")
    caplog.set_level(logging.DEBUG)  # botocore's own debug lines print the URLs it requests
    out = f"s3://{bucket}/ds"
    summary = ingest(IngestConfig(inputs=(str(listing),), out=out, endpoint_url=secret_endpoint, progress=False))
    assert summary["written"] == 1 and summary["rejected_by_reason"]["fetch_failed"] == 1
    saved = b"".join(storage.read_bytes(url, endpoint_url=endpoint)
                     for url, _ in storage.list_files(f"{out}/", endpoint_url=endpoint))
    assert b"missing.jpg" in saved  # the manifest holds the rejected input and its error text ...
    assert SECRET.encode() not in saved and SECRET not in caplog.text  # ... but no secret anywhere


def test_train_with_credentials_in_the_endpoint_saves_none_and_resumes(s3_bucket, cifar_dir, tmp_path, monkeypatch,
                                                                      caplog, one_thread):
    from seerlike import recipes
    from seerlike.engine.loop import train
    from seerlike.engine.config import TrainConfig

    endpoint, bucket = s3_bucket
    secret_endpoint = _with_credentials(endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", secret_endpoint)  # checkpoints find their endpoint here
    shards = write_shards(cifar_images(cifar_dir, 32), tmp_path / "local" / "shards", 16)
    rows = [f"shards/{p.name}" for p in shards for _ in range(16)]
    pq.write_table(pa.table({"shard": rows, "status": ["written"] * 32}), tmp_path / "local" / "manifest.parquet")
    for f in [*shards, tmp_path / "local" / "manifest.parquet"]:
        storage.put_file(f, f"s3://{bucket}/ds/{f.relative_to(tmp_path / 'local').as_posix()}", endpoint_url=endpoint)
    cfg = configlib.apply_overrides(recipes.get("tiny_swav"), [
        f"data.source=s3://{bucket}/ds", f"data.s3_endpoint_url={secret_endpoint}", "data.batch_size=8",
        "data.num_workers=0", "data.augment.views=[{count: 2, size: 16, scale: [0.2, 1.0]}]",
        f"checkpoint.dir=s3://{bucket}/run/ckpts", "checkpoint.every_steps=1", "loop.max_steps=1",
        "optim.warmup_steps=0", "loop.progress=false", "loop.tensorboard=false", "loop.log_every=1"])
    run_dir = tmp_path / "run"
    caplog.set_level(logging.DEBUG)
    assert train(cfg, run_dir) == 0

    saved_text = (run_dir / "config.yaml").read_text()
    remote_cfg = storage.read_bytes(f"s3://{bucket}/run/ckpts/step_00000001/config.yaml", endpoint_url=endpoint)
    assert SECRET not in saved_text and SECRET.encode() not in remote_cfg and SECRET not in caplog.text
    saved = configlib.load(run_dir / "config.yaml", TrainConfig)
    assert saved.data.s3_endpoint_url == endpoint  # the endpoint without its user:password
    # resuming from the saved config: the credentials now come from the environment (the fixture's)
    resumed = configlib.apply_overrides(saved, ["loop.max_steps=2"])
    assert train(resumed, run_dir) == 0
    assert "resumed from" in caplog.text and SECRET not in caplog.text
    assert Checkpointer(resumed.checkpoint, run_dir)._remote_complete()[-1] == "step_00000002"


def test_job_records_and_argument_errors_leave_out_endpoint_credentials(tmp_path):
    from types import SimpleNamespace

    from seerlike.config import ConfigError
    from launchers.submit import SubmitConfig, record_job, validate_stage

    endpoint = _with_credentials("http://minio.example:9000")
    argv = ["--recipe", "tiny_swav", "--run-dir", str(tmp_path / "run"), f"data.s3_endpoint_url={endpoint}"]
    job = SimpleNamespace(job_id="42", paths=SimpleNamespace(folder=tmp_path / "logs"), num_tasks=1)
    record_job(job, SubmitConfig(log_dir=str(tmp_path / "logs")), stage="train", argv=argv)
    saved = (tmp_path / "logs" / "index" / "42.json").read_text()
    assert SECRET not in saved and "data.s3_endpoint_url=http://minio.example:9000" in saved
    with pytest.raises(ConfigError) as err:
        validate_stage("ingest", ["--out", "s3://b/ds", "--endpoint-url", endpoint, "--workers", "many"])
    assert "--endpoint-url" in str(err.value) and SECRET not in str(err.value)


def test_storage_errors_never_show_endpoint_credentials(s3_server, tmp_path, monkeypatch, fast_retries):
    closed = _with_credentials("http://127.0.0.1:9")  # the discard port: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError) as err:
        storage.read_bytes("s3://some-bucket/manifest.parquet", endpoint_url=closed)
    assert time.monotonic() - t0 < 5  # the policy's retries, then a clear failure: no hang
    text = str(err.value) + repr(err.value.__cause__)
    assert "s3://some-bucket/manifest.parquet" in text and "after 8 retries" in text
    assert SECRET not in text and "AKIDEXAMPLE" not in text

    # no credentials anywhere (a resumed run whose endpoint lost its user:password): say where to put them
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(storage, "_clients", {})
    with pytest.raises(storage.StorageError, match="AWS_ACCESS_KEY_ID.*resumed run"):
        storage.read_bytes("s3://some-bucket/x", endpoint_url=s3_server)


# ---------------------------------------------------------------- 3. connections cut inside objects


def test_reads_resume_through_connection_resets(s3_bucket, tmp_path, fast_retries):
    endpoint, bucket = s3_bucket
    manifest = _manifest_bytes()
    assert 300_000 < len(manifest) < 600_000
    url = f"s3://{bucket}/ds/manifest.parquet"
    storage.write_bytes(url, manifest, endpoint_url=endpoint)
    for i in range(30):
        storage.write_bytes(f"s3://{bucket}/ds/labels/{i:03d}.json", b"{}" * 500, endpoint_url=endpoint)
    shard = os.urandom(350_000)
    storage.write_bytes(f"s3://{bucket}/ds/shards/000000.tar", shard, endpoint_url=endpoint)
    expected = pq.read_table(pa.BufferReader(manifest))
    with ResetProxy(endpoint) as proxy:
        # the shard stream reads 1 MiB chunks through its read-ahead thread: same reader, same policy
        with open_shard(f"s3://{bucket}/ds/shards/000000.tar", endpoint_url=proxy.url, backoff_s=0.002) as f:
            assert f.read() == shard
        assert storage.read_bytes(url, endpoint_url=proxy.url) == manifest
        with storage.open_read(url, endpoint_url=proxy.url) as f:
            assert f.read() == manifest
        assert storage.get_file(url, tmp_path / "m.parquet", endpoint_url=proxy.url).read_bytes() == manifest
        assert read_table(url, endpoint_url=proxy.url).equals(expected)
        assert pa.Table.from_batches(list(iter_manifest(f"s3://{bucket}/ds", endpoint_url=proxy.url))).equals(expected)
        # what `seerlike extract --data s3://...` and training do first: count the shards from the manifest
        source = resolve(f"s3://{bucket}/ds", proxy.url)
        assert source.counts == [600] * 5
        listed = list(storage.list_files(f"s3://{bucket}/ds/labels/", endpoint_url=proxy.url, page_size=3))
        assert [u.rsplit("/", 1)[1] for u, _ in listed] == [f"{i:03d}.json" for i in range(30)]
        assert storage.size_of(url, endpoint_url=proxy.url) == len(manifest)
    assert proxy.resets >= 12  # ~3 per full read of the manifest or the shard


def test_labels_that_cannot_be_read_are_an_error_not_an_unlabelled_set(s3_bucket, cifar_dir, tmp_path, monkeypatch,
                                                                       fast_retries):
    """Extraction's reader (what `seerlike extract` and `seerlike eval` read shards with) takes each
    sample's label from its shard's json, read with the image under the retry policy."""
    from seerlike.data.s3stream import ShardReadError
    from seerlike.eval.extract import list_units

    endpoint, bucket = s3_bucket
    images = cifar_images(cifar_dir, 5000)[::25]  # 200 images of every class
    shards = write_shards(images, tmp_path / "ds" / "shards", [50] * 4, labelled=True)
    url = f"s3://{bucket}/ds"
    rows = [f"shards/{p.name}" for p in shards for _ in range(50)]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"shard": rows, "status": ["written"] * len(rows)}), sink)
    storage.write_bytes(f"{url}/manifest.parquet", sink.getvalue().to_pybytes(), endpoint_url=endpoint)
    for p in shards:
        storage.put_file(p, f"{url}/shards/{p.name}", endpoint_url=endpoint)
    expected = [(f"s{i:06d}", p.parent.name) for i, p in enumerate(images)]
    with ResetProxy(endpoint, low=20_000, high=60_000) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        samples = [s for u in list_units(url) for s in u.read()]
    assert [(s.key, s.label) for s in samples] == expected and not [s for s in samples if s.error]
    assert proxy.resets >= 3
    # the manifest was read, the shards then cannot be: an error naming the shard, not unlabelled samples
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    units = list_units(url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: retries, then fail
    with pytest.raises(ShardReadError, match="000000.tar"):
        list(units[0].read())


def test_checkpoint_download_through_connection_resets(s3_bucket, tmp_path, monkeypatch, fast_retries):
    endpoint, bucket = s3_bucket
    files = {".metadata": os.urandom(30_000), "__0_0.distcp": os.urandom(400_000), "__1_0.distcp": os.urandom(250_000),
             "meta.json": b'{"step": 7}', "rank_00000.json": b"{}", COMPLETE: b"7\n"}
    for name, data in files.items():
        storage.write_bytes(f"s3://{bucket}/run/ckpts/step_00000007/{name}", data, endpoint_url=endpoint)
    with ResetProxy(endpoint, seed=1) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        local = Checkpointer(CheckpointConfig(dir=f"s3://{bucket}/run/ckpts"), tmp_path / "run").find_latest()
    assert local == tmp_path / "run" / "checkpoints_cache" / "step_00000007"
    assert {p.name: p.read_bytes() for p in local.iterdir()} == files
    assert [p.name for p in local.parent.iterdir()] == ["step_00000007"]  # no partial folder left
    assert proxy.resets >= 4


def test_uploads_survive_connection_resets(s3_bucket, tmp_path, monkeypatch, fast_retries):
    import moto.s3.models

    endpoint, bucket = s3_bucket
    # the server closes every connection after one answer, so each request gets a fresh 20-150 KB
    # budget: parts and objects of 48-60 KB are cut in about one try in four and go up on a later
    # one (S3's 5 MiB part minimum is lowered on both sides to make parts that small)
    part = 48 * 1024
    monkeypatch.setattr(storage, "MIN_PART_SIZE", part)
    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", part)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(8 * part + 123))
    small = {f"s3://{bucket}/up/small/{i}": os.urandom(50_000) for i in range(10)}
    staging = tmp_path / "run" / "checkpoints_staging" / "step_00000003"
    staging.mkdir(parents=True)
    for name in ("meta.json", "rank_00000.json", "__0_0.distcp"):
        (staging / name).write_bytes(os.urandom(60_000))
    with ResetProxy(endpoint, seed=2) as proxy:
        storage.multipart_upload(big, f"s3://{bucket}/up/big.bin", part_size=part, endpoint_url=proxy.url)
        for url, data in small.items():
            storage.write_bytes(url, data, endpoint_url=proxy.url)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        ckpt = Checkpointer(CheckpointConfig(dir=f"s3://{bucket}/run/ckpts"), tmp_path / "run")
        assert ckpt._upload(3, staging) == f"s3://{bucket}/run/ckpts/step_00000003"
        assert storage.remove_tree(f"s3://{bucket}/up/small", endpoint_url=proxy.url) == 10
    assert proxy.resets >= 3  # 7 of 35 connections with this seed
    assert storage.read_bytes(f"s3://{bucket}/up/big.bin", endpoint_url=endpoint) == big.read_bytes()
    head = _raw(endpoint).head_object(Bucket=bucket, Key="up/big.bin")
    assert head["ETag"].strip('"').endswith("-9")  # really 9 parts
    assert list(storage.list_files(f"s3://{bucket}/up/small/", endpoint_url=endpoint)) == []
    remote = {u.rsplit("/", 1)[1] for u, _ in storage.list_files(f"s3://{bucket}/run/ckpts/", endpoint_url=endpoint)}
    assert remote == {"meta.json", "rank_00000.json", "__0_0.distcp", COMPLETE}
    assert _raw(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_an_object_replaced_during_a_read_is_an_error_not_a_splice(s3_bucket, fast_retries):
    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/ds/shards/000000.tar"
    storage.write_bytes(url, b"a" * 100_000, endpoint_url=endpoint)
    gets = []

    def replace_before_the_resume(method: str, path: str) -> None:
        if method == "GET" and ".tar" in path:
            gets.append(path)
            if len(gets) == 2:
                storage.write_bytes(url, b"b" * 100_000, endpoint_url=endpoint)

    # the proxy cuts the first GET of a .tar after half its body; the resume meets the new object
    with FaultProxy(endpoint, every=3, answer=replace_before_the_resume) as proxy:
        with pytest.raises(storage.StorageError, match="changed while it was being read"):
            storage.read_bytes(url, endpoint_url=proxy.url)
    assert proxy.counts["reset"] == 1 and len(gets) == 2


@pytest.mark.parametrize("store", ["idempotent", "forgetful"])
def test_a_lost_complete_answer_is_not_a_failed_upload(s3_bucket, tmp_path, monkeypatch, fast_retries, store):
    """The answer to CompleteMultipartUpload is lost; the retry finds the upload completed.

    AWS (and moto) answer a repeated Complete with success; other stores (the "forgetful"
    case, played by the proxy) answer NoSuchUpload, and the object's ETag must tell.
    """
    import moto.s3.models

    endpoint, bucket = s3_bucket
    part = 48 * 1024
    monkeypatch.setattr(storage, "MIN_PART_SIZE", part)
    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", part)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * part))
    completes = []

    def is_complete(method: str, path: str) -> bool:  # CompleteMultipartUpload: POST KEY?uploadId=ID
        return method == "POST" and "uploadId=" in path

    def first_complete(method: str, path: str) -> bool:
        if is_complete(method, path):
            completes.append(path)
        return is_complete(method, path) and len(completes) == 1

    def forget(method: str, path: str) -> tuple[int, bytes] | None:
        if store == "forgetful" and is_complete(method, path) and completes:
            return 404, b"<Error><Code>NoSuchUpload</Code><Message>gone</Message></Error>"
        return None

    with FaultProxy(endpoint, every=10**9, lose_answer=first_complete, answer=forget) as proxy:
        storage.multipart_upload(big, f"s3://{bucket}/up/big.bin", part_size=part, endpoint_url=proxy.url)
    assert proxy.counts["lost_answer"] == 1 and proxy.counts["canned"] == (store == "forgetful")
    assert storage.read_bytes(f"s3://{bucket}/up/big.bin", endpoint_url=endpoint) == big.read_bytes()
