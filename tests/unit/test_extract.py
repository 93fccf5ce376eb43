"""Feature extraction over real images: every sample once across ranks, keyed, resumable, layers."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from seerlike.config import ConfigError
from seerlike.eval.extract import ExtractConfig, extract, list_units
from seerlike.eval.features import FeatureStore, chunk_paths

MODEL = "random:resnet10_cifar"
pytestmark = pytest.mark.usefixtures("one_thread")


def _csv(tmp_path, cifar_dir, n=40):
    rows = list(csv.DictReader(open(cifar_dir / "val.csv")))[::1000 // n][:n]
    path = tmp_path / "subset.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for r in rows:
            w.writerow([str(cifar_dir / r["path"]), r["label"]])
    return path


CFG = ExtractConfig(layer="res5", image_size=32, resize=32, batch_size=8, chunk_size=8, workers=1)


def _extract_on_rank(rank, world, model, data, out):
    import torch.distributed as dist

    return extract(model, data, out, CFG, rank=rank, world_size=world, barrier=dist.barrier, progress=False)


@pytest.mark.dist
def test_two_ranks_extract_every_sample_once_and_match_one(tmp_path, cifar_dir):
    from seerlike.testing import run_on_ranks

    data = str(_csv(tmp_path, cifar_dir))
    single = extract(MODEL, data, tmp_path / "one", CFG, progress=False)
    metas = run_on_ranks(_extract_on_rank, 2, MODEL, data, str(tmp_path / "two"))
    assert metas[1] is None and metas[0]["num_samples"] == single["num_samples"] == 40
    one, two = FeatureStore(tmp_path / "one").load(), FeatureStore(tmp_path / "two").load()
    assert one.keys == two.keys and len(set(two.keys)) == 40
    assert one.labels == two.labels and all(one.labels)
    np.testing.assert_allclose(one.features, two.features, rtol=1e-5, atol=1e-5)


def test_resume_redoes_only_missing_chunks_and_layers_differ(tmp_path, cifar_dir):
    data = str(_csv(tmp_path, cifar_dir, n=24))
    extract(MODEL, data, tmp_path / "f", CFG, progress=False)
    store = FeatureStore(tmp_path / "f")
    assert store.units == ["part-000000", "part-000001", "part-000002"] and store.dim == 256
    before = store.load().features
    npy, idx = chunk_paths(tmp_path / "f", "part-000001")
    idx.unlink()  # an interrupted chunk: features written, index (the completion marker) not
    stamp = {u: chunk_paths(tmp_path / "f", u)[0].stat().st_mtime_ns for u in ("part-000000", "part-000002")}
    extract(MODEL, data, tmp_path / "f", CFG, progress=False)
    assert {u: chunk_paths(tmp_path / "f", u)[0].stat().st_mtime_ns for u in stamp} == stamp
    np.testing.assert_allclose(FeatureStore(tmp_path / "f").load().features, before, rtol=1e-6, atol=1e-6)
    # res4 (average-pooled) has the width of the third stage; pool equals the model's forward
    r4 = extract(MODEL, data, tmp_path / "r4", ExtractConfig(**{**CFG.__dict__, "layer": "res4"}), progress=False)
    assert r4["dim"] == 128
    pool = extract(MODEL, data, tmp_path / "pool", ExtractConfig(**{**CFG.__dict__, "layer": "pool"}), progress=False)
    # res5 average-pooled is what the trunk's global pool computes
    np.testing.assert_allclose(FeatureStore(tmp_path / "pool").load().features, before, rtol=1e-5, atol=1e-5)
    assert pool["layer"] == "pool"


def test_extract_refuses_mismatched_resume_and_bad_sources(tmp_path, cifar_dir):
    data = str(_csv(tmp_path, cifar_dir, n=8))
    extract(MODEL, data, tmp_path / "f", CFG, progress=False)
    with pytest.raises(ConfigError, match="different extraction"):
        extract(MODEL, data, tmp_path / "f", ExtractConfig(**{**CFG.__dict__, "layer": "res4"}), progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        list_units(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="no classifier head"):
        extract(MODEL, data, tmp_path / "h", ExtractConfig(**{**CFG.__dict__, "layer": "head"}), progress=False)


def test_shard_units_read_webdataset_tars(tmp_path, cifar_dir):
    import io
    import json
    import tarfile

    files = sorted((cifar_dir / "val" / "cat").glob("*.jpg"))[:6]
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:06d}.tar", "w") as tar:
            for f in files[s * 3:(s + 1) * 3]:
                data = f.read_bytes() if f != files[4] else f.read_bytes()[:40]  # one truncated JPEG
                for name, payload in ((f"{f.stem}.jpg", data), (f"{f.stem}.json", json.dumps({"key": f.stem}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    units = list_units(str(tmp_path / "shard-{000000..000001}.tar"))
    assert [u.name for u in units] == ["shard-shard-000000", "shard-shard-000001"] and [u.size for u in units] == [3, 3]
    samples = [s for u in units for s in u.read()]
    assert [s.key for s in samples] == [f.stem for f in files]
    assert samples[0].data == files[0].read_bytes()
    meta = extract(MODEL, str(tmp_path / "shard-{000000..000001}.tar"), tmp_path / "f", CFG, progress=False)
    # the undecodable sample is skipped (logged), never given made-up features
    assert meta["num_samples"] == 5
    assert FeatureStore(tmp_path / "f").index()["key"].to_pylist() == [f.stem for f in files if f != files[4]]


def test_an_ingested_labelled_list_keeps_its_labels_through_extraction(tmp_path, cifar_dir):
    import seerlike
    from sharding.manifest import read_manifest

    listing = _csv(tmp_path, cifar_dir, n=20)  # path,label of 20 images, every class
    ds = seerlike.ingest(listing, out=tmp_path / "ds", progress=False, overrides={"shard_max_samples": 8})
    assert ds.written == 20 and ds.shards == 3
    meta = extract(MODEL, ds.dataset, tmp_path / "f", CFG, progress=False)
    got = FeatureStore(tmp_path / "f").load()
    manifest = read_manifest(ds.dataset, ["key", "label"]).to_pylist()
    # the labels ingest copied from the list into each sample's json come back with its features
    assert meta["num_samples"] == 20 and len(set(got.labels)) == 10
    assert dict(zip(got.keys, got.labels)) == {r["key"]: r["label"] for r in manifest}


def test_a_shard_sample_with_a_broken_json_is_skipped_not_unlabelled(tmp_path, cifar_dir):
    import io
    import tarfile

    from seerlike.eval.extract import shard_label

    assert shard_label(None) is None and shard_label(b'{"key": "a"}') is None
    assert shard_label(b'{"key": "a", "label": "cat"}') == "cat" and shard_label(b'{"label": 3}') == "3"
    with pytest.raises(ValueError, match="unreadable .json member"):
        shard_label(b'{"label": "ca')
    files = sorted((cifar_dir / "val" / "cat").glob("*.jpg"))[:3]
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for i, f in enumerate(files):
            meta = b'{"label": "cat"}' if i != 1 else b"\xff{broken"
            for name, payload in ((f"{f.stem}.jpg", f.read_bytes()), (f"{f.stem}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    samples = [s for u in list_units(str(tmp_path / "s.tar")) for s in u.read()]
    assert [(s.label, s.error is None) for s in samples] == [("cat", True), (None, False), ("cat", True)]
    assert "s.tar: unreadable .json member" in samples[1].error
    extract(MODEL, str(tmp_path / "s.tar"), tmp_path / "f", CFG, progress=False)
    got = FeatureStore(tmp_path / "f").load()
    assert got.keys == [files[0].stem, files[2].stem] and got.labels == ["cat", "cat"]
