"""The data rule on S3 inputs (a real S3 server on loopback) and `seerlike train --fit-data` writing its choice
into the run's config.yaml."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from seerlike import config, recipes, storage
from seerlike.engine.config import TrainConfig
from seerlike.recipes import fit_data as fd

pytestmark = pytest.mark.integration


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 80, 40)).save(buf, "JPEG")
    return buf.getvalue()


def test_statistics_from_an_s3_manifest_and_from_s3_images(s3_bucket):
    endpoint, bucket = s3_bucket
    table = pa.table({"status": ["written"] * 3 + ["duplicate"], "width": pa.array([640, 300, 96, 0], pa.int32()),
                      "height": pa.array([480, 200, 96, 0], pa.int32())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(f"s3://{bucket}/ds/manifest.parquet", buf.getvalue(), endpoint_url=endpoint)
    storage.write_bytes(f"s3://{bucket}/ds/summary.json", json.dumps({"written": 3}).encode(), endpoint_url=endpoint)
    stats = fd.data_stats(f"s3://{bucket}/ds", endpoint_url=endpoint)
    assert (stats.count, stats.short_sides) == (3, (96, 200, 480)) and stats.where.startswith("manifest of s3://")

    for i, (w, h) in enumerate([(160, 120), (90, 200), (500, 64)]):
        storage.write_bytes(f"s3://{bucket}/raw/{i}.jpg", _jpeg(w, h), endpoint_url=endpoint)
    stats = fd.data_stats(f"s3://{bucket}/raw", endpoint_url=endpoint)
    assert (stats.count, stats.short_sides, stats.native_side) == (3, (64, 90, 120), 64)


def test_train_fit_data_saves_the_fitted_values_in_config_yaml(tmp_path, capsys):
    from seerlike.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for i in range(16):
        (images / f"{i:02d}.jpg").write_bytes(_jpeg(96, 80))
    run = tmp_path / "run"
    argv = ["train", "--recipe", "tiny_swav", "--data", str(images), "--run-dir", str(run), "--max-steps", "1",
            "--fit-data", "loop.time_budget_s=3000", "loop.tensorboard=false", "loop.progress=false",
            "optim.warmup_steps=1"]
    assert main(argv) == 0
    saved = config.load(run / "config.yaml", TrainConfig)
    # 16 images of 80 px on 1 rank: batch 8 (two per epoch); 3,000 s afford views of 40 px, the smallest crop
    # of an 80 px image (scale 0.25: half its side), so the images stay at their native 80 px
    assert saved.data.batch_size == 8
    assert [(v.count, v.size) for v in saved.data.augment.views] == [(2, 40)]
    assert saved.eval.image_size == saved.eval.resize == 80
    assert saved.data.augment.views[0].scale == recipes.get("tiny_swav").data.augment.views[0].scale
    assert "fit-data: resolution 80 px (the native side)" in capsys.readouterr().err
