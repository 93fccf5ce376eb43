"""Ingest to and from a real S3 HTTP server on loopback (moto server mode), never a mocked client."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os

import boto3
import pytest

from seerlike import storage
from sharding.config import IngestConfig
from sharding.ingest import ingest
from sharding.manifest import read_manifest, read_summary, shard_urls
from sharding.stats import verify
from sharding.writer import iter_tar

pytestmark = pytest.mark.integration


def _cifar_subset(cifar_dir, tmp_path, n=300):
    lines = (cifar_dir / "train.csv").read_text().splitlines()
    step = (len(lines) - 1) // n
    csv_path = tmp_path / "cifar_subset.csv"
    rows = [f"{cifar_dir}/{line}" for line in lines[1 :: step][:n]]
    csv_path.write_text("\n".join([lines[0]] + rows) + "\n")
    return csv_path


def _objects(endpoint, bucket, prefix):
    s3 = boto3.client("s3", endpoint_url=endpoint)
    return {o["Key"]: o["ETag"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix) for o in p.get("Contents", [])}


def test_ingest_photos_and_cifar_to_s3(s3_bucket, photos_dir, cifar_dir, tmp_path, monkeypatch, caplog):
    endpoint, bucket = s3_bucket
    secret = "sEcReT-never-in-logs-4242"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # found by boto3's standard chain
    out = f"s3://{bucket}/ds"
    cfg = IngestConfig(
        inputs=(str(photos_dir), str(_cifar_subset(cifar_dir, tmp_path))),
        out=out,
        chunk_size=150,
        shard_max_samples=100,
        resize_short_side=256,
        workers=1,
        progress=False,
    )
    caplog.set_level(logging.DEBUG)
    summary = ingest(cfg)
    assert summary["seen"] == 391 and summary["written"] + summary["duplicate"] + summary["rejected"] == 391
    assert summary["written"] == 390 and summary["rejected_by_reason"]["extreme_aspect"] == 1
    assert read_summary(out)["written"] == 390
    urls = shard_urls(out)
    assert urls and all(u.startswith(f"s3://{bucket}/ds/shards/") for u in urls)
    assert verify(out) == []
    rows = read_manifest(out).to_pylist()
    labelled = [r for r in rows if r["label"] is not None]
    assert len(labelled) == 300 and all(r["label"] == r["source"].split("/")[-2] for r in labelled)
    n = 0
    for url in urls:
        with storage.open_read(url) as f:
            n += sum(1 for name, _ in iter_tar(f) if name.endswith(".jpg"))
    assert n == 390
    # no temp or half-written objects: only the dataset layout
    keys = _objects(endpoint, bucket, "ds/")
    assert {k.split("/")[1] for k in keys} == {"shards", "manifest.parquet", "shards.parquet", "summary.json", "_ingest"}
    assert boto3.client("s3", endpoint_url=endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    # a rerun changes nothing (same objects, same ETags)
    again = ingest(cfg)
    assert again["run_chunks"] == 0 and _objects(endpoint, bucket, "ds/shards/") == {k: v for k, v in keys.items() if k.startswith("ds/shards/")}
    text = caplog.text + json.dumps(summary) + storage.read_bytes(f"{out}/_ingest/config.json").decode()
    assert secret not in text


def test_ingest_from_s3_prefix_and_list(s3_bucket, photos_dir, tmp_path, monkeypatch):
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    names = ["pillow_hopper.jpg", "skimage_coffee.png", "exifsamples_Canon_40D.jpg"]
    for name in names:
        storage.write_bytes(f"s3://{bucket}/raw/{name}", (photos_dir / name).read_bytes())
    storage.write_bytes(f"s3://{bucket}/raw/notes.txt.bak", b"skipped: not an image extension")
    storage.write_bytes(f"s3://{bucket}/lists/l.txt", b"../raw/pillow_hopper.jpg\ns3://bucket-does-not-exist/x.jpg\n")
    out = tmp_path / "ds"
    summary = ingest(
        IngestConfig(inputs=(f"s3://{bucket}/raw/", f"s3://{bucket}/lists/l.txt"), out=str(out), progress=False,
                     shuffle=False)  # rows are compared in listing order
    )
    rows = read_manifest(str(out)).to_pylist()
    assert [r["source"] for r in rows] == [f"s3://{bucket}/raw/{n}" for n in sorted(names)] + [
        f"s3://{bucket}/raw/pillow_hopper.jpg",  # relative to the list's prefix
        "s3://bucket-does-not-exist/x.jpg",
    ]
    assert [r["status"] for r in rows] == ["written"] * 3 + ["duplicate", "rejected"]
    assert rows[-1]["reason"] == "fetch_failed"
    assert summary["written"] == 3 and summary["seen"] == 5


def test_storage_multipart_pagination_and_endpoint(s3_bucket, tmp_path, monkeypatch):
    endpoint, bucket = s3_bucket
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    big = tmp_path / "big.bin"
    payload = os.urandom(11 * 1024 * 1024 + 123)
    big.write_bytes(payload)
    url = f"s3://{bucket}/x/big.bin"
    storage.multipart_upload(big, url, part_size=5 * 1024 * 1024, endpoint_url=endpoint)
    assert storage.read_bytes(url, endpoint_url=endpoint) == payload
    head = boto3.client("s3", endpoint_url=endpoint).head_object(Bucket=bucket, Key="x/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # really three parts
    for i in range(5):
        storage.write_bytes(f"s3://{bucket}/x/p/{i}", bytes([i]), endpoint_url=endpoint)
    listed = list(storage.list_files(f"s3://{bucket}/x/p/", endpoint_url=endpoint, page_size=2))
    assert listed == [(f"s3://{bucket}/x/p/{i}", 1) for i in range(5)]
    assert storage.exists(f"s3://{bucket}/x/p/0", endpoint_url=endpoint)
    storage.remove(f"s3://{bucket}/x/p/0", endpoint_url=endpoint)
    assert not storage.exists(f"s3://{bucket}/x/p/0", endpoint_url=endpoint)
    got = storage.get_file(url, tmp_path / "back.bin", endpoint_url=endpoint)
    assert got.read_bytes() == payload
    with storage.open_read(f"s3://{bucket}/x/p/1", endpoint_url=endpoint) as f:
        assert io.BytesIO(f.read()).getvalue() == b"\x01"


def test_verify_in_parts_on_s3_finds_what_one_process_finds(s3_bucket, cifar_dir, tmp_path, capsys):
    """`seerlike ingest-stats s3://... --verify --part I/N` reads the manifest's row groups and the shards over HTTP."""
    from sharding.stats import run as stats_command

    endpoint, bucket = s3_bucket
    out = f"s3://{bucket}/ds"
    ingest(IngestConfig(inputs=(str(_cifar_subset(cifar_dir, tmp_path, n=90)),), out=out, chunk_size=30,
                        shard_max_samples=12, workers=1, progress=False, endpoint_url=endpoint))
    shards = [u.rsplit("/", 1)[-1] for u, _ in storage.list_files(f"{out}/shards/", endpoint_url=endpoint)]
    assert len(shards) >= 6
    assert [verify(out, endpoint_url=endpoint, part=(i, 3)) for i in range(3)] == [[], [], []]
    storage.remove(f"{out}/shards/{shards[1]}", endpoint_url=endpoint)
    storage.write_bytes(f"{out}/shards/{shards[-1]}", b"not a tar", endpoint_url=endpoint)
    storage.write_bytes(f"{out}/shards/999999-0000.tar", b"", endpoint_url=endpoint)  # no chunk of the manifest
    whole = verify(out, endpoint_url=endpoint)
    assert f"shards/{shards[1]}: missing" in whole and "shards/999999-0000.tar: shard not in the manifest" in whole
    assert any(p.startswith(f"shards/{shards[-1]}") for p in whole)
    for n in (2, 3, 5):
        assert sorted(p for i in range(n) for p in verify(out, endpoint_url=endpoint, part=(i, n))) == sorted(whole)
    first = verify(out, endpoint_url=endpoint, part=(0, 2))
    assert f"shards/{shards[1]}: missing" in first and "shards/999999-0000.tar: shard not in the manifest" not in first
    args = argparse.Namespace(dataset=out, verify=True, part="0/2", endpoint_url=endpoint)
    assert stats_command(args) == 1  # the command: this part's problems only
    assert json.loads(capsys.readouterr().out)["verify"]["problems"] == first
