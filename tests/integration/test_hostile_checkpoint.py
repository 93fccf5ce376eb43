"""Checkpoints as untrusted input: a crafted .metadata runs nothing, damage is caught and named,
resume falls back past a damaged checkpoint, a fresh start never mixes two runs, and a resume
with another method or backbone is refused before the run's config is touched."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from seerlike import cli, config, recipes
from seerlike.config import ConfigError
from seerlike.engine import checkpoint
from seerlike.engine.checkpoint import Checkpointer, prepare_run_dir
from seerlike.engine.checkpoint_verify import CHECKSUMS, CheckpointError, hash_file, read_dcp_metadata
from seerlike.engine.loop import build_method, train
from seerlike.engine.optim import build_optimizer
from seerlike.engine.parallelize import ParallelConfig, parallelize

pytestmark = pytest.mark.integration

STEPS = 4  # checkpoints at steps 2 and 4


class FakeData:
    """Random 16 px view pairs; its position is the batch counter."""

    def __init__(self):
        self.i = 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.i)
            self.i += 1
            yield SimpleNamespace(views=[torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)])

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def _cfg(recipe: str = "tiny_swav", *extra: str):
    return config.apply_overrides(recipes.get(recipe), [
        f"loop.max_steps={STEPS}", "checkpoint.every_steps=2", "loop.log_every=1", "loop.progress=false",
        "loop.tensorboard=false", "optim.warmup_steps=1", "precision.dtype=fp32", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    assert train(_cfg(), run, data=FakeData()) == 0
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of a 4-step tiny SwAV run with complete checkpoints at steps 2 and 4."""
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    assert [checkpoint.step_of(p) for p in checkpoint.list_complete(dst)] == [2, 4]
    return dst


def _ckpt(run: Path, step: int) -> Path:
    return checkpoint.step_dir(run / "checkpoints", step)


def _resume(run: Path) -> checkpoint.Restored | None:
    """Checkpointer.resume into a freshly built model, as the loop does it."""
    cfg = _cfg()
    method = build_method(cfg)
    model = parallelize(method, ParallelConfig(strategy="none"))
    return Checkpointer(cfg.checkpoint, run).resume(model, build_optimizer(cfg.optim, method), method=method,
                                                    scaler=None)


def _rehash(ckpt: Path, name: str) -> None:
    """Record a replaced file's checksum, as an attacker who can write the folder would."""
    table = json.loads((ckpt / CHECKSUMS).read_text())
    table["files"][name] = hash_file(ckpt / name)
    (ckpt / CHECKSUMS).write_text(json.dumps(table))


# ---------------------------------------------------------------- 1. a crafted .metadata runs nothing


class _Payload:
    """Unpickling this opens (creates) ``target``: a stand-in for any code a pickle can run."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return open, (self.target, "w")


def _poison(ckpt: Path, marker: Path) -> Path:
    """Real DCP metadata with the payload tucked inside; checksums updated so only the unpickler stands guard."""
    md = read_dcp_metadata(ckpt)
    md.planner_data = {**(md.planner_data or {}), "payload": _Payload(str(marker))}
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    _rehash(ckpt, ".metadata")
    return ckpt / ".metadata"


def _load_with(loader: str, run: Path, tmp: Path, capsys) -> str:
    """Load ``run`` through one of the project's entry points; returns the error text it reports."""
    if loader == "export":
        assert cli.main(["export", "--checkpoint", str(run), "--out", str(tmp / "export")]) == 2
        return capsys.readouterr().err
    with pytest.raises(CheckpointError) as err:
        if loader == "resume":
            train(_cfg(), run, data=FakeData())
        elif loader == "extract":
            from seerlike.eval.extract import ExtractConfig, extract

            extract(str(run), str(tmp / "no-data"), tmp / "features", ExtractConfig(), progress=False)
        elif loader == "eval":
            from seerlike.eval.evaluate import evaluate
            from seerlike.eval.extract import ExtractConfig

            evaluate("knn", str(run), str(tmp / "a"), str(tmp / "b"), extract_cfg=ExtractConfig())
        elif loader == "teacher":
            from seerlike.methods.distill import Teacher

            Teacher(str(run), "none")
    return str(err.value)


@pytest.mark.parametrize("loader", ["resume", "export", "extract", "eval", "teacher"])
def test_a_crafted_metadata_runs_nothing_in_any_loader(run, tmp_path, capsys, loader):
    marker = tmp_path / "pwned"
    # both checkpoints poisoned: resume has nothing to fall back to
    bad = [_poison(_ckpt(run, step), marker) for step in (2, 4)]
    message = _load_with(loader, run, tmp_path, capsys)
    assert not marker.exists(), f"{loader} ran the pickle payload"
    assert str(bad[1]) in message and "open, which is not part of DCP's metadata" in message, message
    if loader == "resume":
        assert str(bad[0]) in message  # every candidate was tried and is named


def test_resume_skips_a_crafted_metadata_and_falls_back(run, tmp_path, caplog):
    marker = tmp_path / "pwned"
    bad = _poison(_ckpt(run, 4), marker)
    with caplog.at_level(logging.WARNING, logger="seerlike.engine.checkpoint"):
        restored = _resume(run)
    assert not marker.exists()
    assert restored.step == 2 and restored.path == _ckpt(run, 2)
    assert any(str(_ckpt(run, 4)) in r.getMessage() and str(bad) in r.getMessage() for r in caplog.records)


def test_the_real_metadata_passes_the_allow_list(run):
    md = read_dcp_metadata(_ckpt(run, 4))
    # the allow-list still yields real DCP objects: shapes, dtypes and storage of every tensor
    w = md.state_dict_metadata["model.backbone.conv1.weight"]
    assert tuple(w.size) == (32, 3, 3, 3) and w.properties.dtype == torch.float32
    assert {i.relative_path for i in md.storage_data.values()} == {"__0_0.distcp"}


# ---------------------------------------------------------------- 2. damage is caught, named, and skipped


def _truncate(ckpt: Path) -> Path:
    p = ckpt / "__0_0.distcp"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p


def _delete_metadata(ckpt: Path) -> Path:
    (ckpt / ".metadata").unlink()
    return ckpt / ".metadata"


def _random_metadata(ckpt: Path) -> Path:
    p = ckpt / ".metadata"
    p.write_bytes(torch.randint(0, 256, (p.stat().st_size,), dtype=torch.uint8).numpy().tobytes())
    return p


def _floats_in_shard(ckpt: Path) -> Path:
    """4 KB of plausible weights over the middle of the shard: same size, loads without a checksum."""
    p = ckpt / "__0_0.distcp"
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = (0.01 * torch.randn(1024)).numpy().tobytes()
    p.write_bytes(bytes(data))
    return p


def _random_rank_state(ckpt: Path) -> Path:
    p = ckpt / "rank_00000.json"
    p.write_bytes(torch.randint(0, 256, (p.stat().st_size,), dtype=torch.uint8).numpy().tobytes())
    return p


def _delete_checksums(ckpt: Path) -> Path:
    (ckpt / CHECKSUMS).unlink()
    return ckpt / CHECKSUMS


DAMAGE = {"truncated shard": (_truncate, "bytes"), "deleted .metadata": (_delete_metadata, "missing"),
          "random .metadata": (_random_metadata, "sha256"), "4 KB of floats in a shard": (_floats_in_shard, "sha256"),
          "random rank state": (_random_rank_state, "sha256"), "deleted checksums": (_delete_checksums, "missing")}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_resume_falls_back(run, caplog, damage):
    do, reason = DAMAGE[damage]
    bad_file = do(_ckpt(run, 4))
    # a single load (export / extract / eval / teacher of that checkpoint) names file, reason, older ones
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_model_state(_ckpt(run, 4))
    assert str(bad_file) in str(err.value) and reason in str(err.value), str(err.value)
    assert str(_ckpt(run, 2)) in str(err.value)  # "older complete checkpoints of this run: ..."
    # resume takes the next older one and says which it skipped and why
    with caplog.at_level(logging.WARNING, logger="seerlike.engine.checkpoint"):
        restored = _resume(run)
    assert restored.step == 2
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping checkpoint")]
    assert len(skipped) == 1 and str(_ckpt(run, 4)) in skipped[0] and str(bad_file) in skipped[0], skipped


def test_the_loop_resumes_past_a_damaged_checkpoint_and_rewrites_it(run, caplog):
    _floats_in_shard(_ckpt(run, 4))
    with caplog.at_level(logging.INFO):
        assert train(_cfg(), run, data=FakeData()) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"skipping checkpoint {_ckpt(run, 4)}") for m in messages)
    assert f"resumed from {_ckpt(run, 2)} (step 2)" in messages
    # step 4 was trained again and written afresh: it verifies and loads
    assert [checkpoint.step_of(p) for p in checkpoint.list_complete(run)] == [2, 4]
    assert "backbone.conv1.weight" in checkpoint.load_model_state(_ckpt(run, 4))


def test_when_every_checkpoint_is_damaged_the_run_stops_and_writes_nothing(run):
    for step in (2, 4):
        _truncate(_ckpt(run, step))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError) as err:
        train(_cfg(), run, data=FakeData())
    assert str(_ckpt(run, 2)) in str(err.value) and str(_ckpt(run, 4)) in str(err.value)
    assert "no complete checkpoint could be loaded" in str(err.value)
    # no fresh start beside the damaged run (config.yaml is rewritten with identical content)
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert after.keys() == before.keys()
    assert [p for p in after if after[p] != before[p]] == [run / "config.yaml"]


def _strip_checksums(ckpt: Path) -> None:
    """Make a checkpoint look like one written before checksums existed."""
    (ckpt / CHECKSUMS).unlink()
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["checksums"]
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_a_checkpoint_without_checksums_loads_with_a_warning_but_truncation_is_caught(run, caplog):
    ckpt = _ckpt(run, 4)
    verified = checkpoint.load_model_state(ckpt)
    _strip_checksums(ckpt)
    with caplog.at_level(logging.WARNING):
        state = checkpoint.load_model_state(ckpt)
    assert state.keys() == verified.keys() and all(torch.equal(state[k], v) for k, v in verified.items())
    assert any("loading it unverified" in r.getMessage() and str(ckpt) in r.getMessage() for r in caplog.records)
    shard = _truncate(ckpt)
    with pytest.raises(CheckpointError, match="truncated") as err:
        checkpoint.load_model_state(ckpt)
    assert str(shard) in str(err.value)


# ---------------------------------------------------------------- 3. a fresh start never mixes two runs


def test_a_fresh_start_into_a_run_with_checkpoints_is_refused(run):
    config_before = (run / "config.yaml").read_bytes()
    with pytest.raises(ConfigError) as err:
        train(_cfg("tiny_swav", "checkpoint.resume=false", "loop.max_steps=2"), run, data=FakeData())
    msg = str(err.value)
    assert str(run / "checkpoints") in msg and "--run-dir" in msg and "checkpoint.overwrite=true" in msg, msg
    assert (run / "config.yaml").read_bytes() == config_before
    assert [checkpoint.step_of(p) for p in checkpoint.list_complete(run)] == [2, 4]


def test_overwrite_deletes_the_old_run_before_writing_the_new_one(run):
    old_time = checkpoint.read_meta(_ckpt(run, 4))["time"]
    assert train(_cfg("tiny_swav", "checkpoint.overwrite=true", "loop.max_steps=2"), run, data=FakeData()) == 0
    # only the new run's step 2 is left: the old step 4 cannot be mistaken for its continuation
    assert [checkpoint.step_of(p) for p in checkpoint.list_complete(run)] == [2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
    assert checkpoint.read_meta(_ckpt(run, 2))["time"] > old_time
    # what the run records continues it; it never starts over again
    for saved in (run / "config.yaml", _ckpt(run, 2) / "config.yaml"):
        ck = yaml.safe_load(saved.read_text())["checkpoint"]
        assert ck["resume"] is True and ck["overwrite"] is False, saved


def test_a_fresh_start_on_an_s3_root_is_refused_and_overwrite_empties_it(tmp_path, s3_bucket, monkeypatch):
    import boto3

    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for key in ("r/step_00000002/COMPLETE", "r/step_00000002/__0_0.distcp", "r/step_00000004/__0_0.distcp",
                "r/other.txt"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    (tmp_path / "run" / "checkpoints_cache" / "step_00000002").mkdir(parents=True)
    cfg = _cfg("tiny_swav", f"checkpoint.dir=s3://{bucket}/r", "checkpoint.resume=false")
    with pytest.raises(ConfigError, match=f"s3://{bucket}/r/step_00000002"):
        prepare_run_dir(cfg, tmp_path / "run")
    prepare_run_dir(config.apply_overrides(cfg, ["checkpoint.overwrite=true"]), tmp_path / "run")
    left = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="r/").get("Contents", [])]
    assert left == ["r/other.txt"]  # every step_* object gone (incomplete ones too), nothing else touched
    assert not (tmp_path / "run" / "checkpoints_cache").exists()  # no stale copy of the old run


def test_a_damaged_newest_s3_checkpoint_falls_back_to_the_older_one(tmp_path, s3_bucket, monkeypatch, caplog):
    import boto3

    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    cfg = _cfg("tiny_swav", f"checkpoint.dir=s3://{bucket}/r", "checkpoint.keep_last=0")
    assert train(cfg, tmp_path / "a", data=FakeData()) == 0
    s3 = boto3.client("s3", endpoint_url=endpoint)
    key = "r/step_00000004/__0_0.distcp"
    size = s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
    s3.put_object(Bucket=bucket, Key=key, Body=os.urandom(size))  # same size: only the hash tells
    method = build_method(cfg)
    model = parallelize(method, ParallelConfig(strategy="none"))
    with caplog.at_level(logging.WARNING):
        restored = Checkpointer(cfg.checkpoint, tmp_path / "b").resume(
            model, build_optimizer(cfg.optim, method), method=method, scaler=None)
    assert restored is not None and restored.step == 2
    assert "skipping checkpoint" in caplog.text and "step_00000004" in caplog.text
    # the damaged copy left the cache: a later run downloads the newest again instead of trusting it
    assert not (tmp_path / "b" / "checkpoints_cache" / "step_00000004").exists()


# ---------------------------------------------------------------- 4. a resume with another method is refused first


def test_resuming_with_another_method_is_refused_before_anything_is_written(run):
    config_before = (run / "config.yaml").read_bytes()
    with pytest.raises(ConfigError) as err:
        train(_cfg("tiny_byol"), run, data=FakeData())
    msg = str(err.value)
    assert f"run {run} was trained with method.name=swav model.name=resnet10_cifar" in msg, msg
    assert "this config has method.name=byol;" in msg and "new --run-dir" in msg
    assert (run / "config.yaml").read_bytes() == config_before
    # the run still continues with its own recipe
    assert train(_cfg("tiny_swav", "loop.max_steps=6"), run, data=FakeData()) == 0
    assert checkpoint.step_of(checkpoint.latest(run)) == 6


def test_resuming_with_another_backbone_is_refused(run):
    with pytest.raises(ConfigError, match="this config has model.name=resnet18;"):
        prepare_run_dir(_cfg("tiny_swav", "model.name=resnet18"), run)


def test_the_check_reads_both_shapes_of_a_saved_method_section(run, tmp_path):
    """``method: {name: swav, swav: {...}}`` today, ``method: {name: swav, <fields>}`` tomorrow."""
    saved = yaml.safe_load((_ckpt(run, 4) / "config.yaml").read_text())
    flat = {**saved, "method": {"name": "swav", "num_prototypes": 30}}
    (_ckpt(run, 4) / "config.yaml").write_text(yaml.safe_dump(flat))
    with pytest.raises(ConfigError, match="method.name=swav .*this config has method.name=byol"):
        prepare_run_dir(_cfg("tiny_byol"), run)
    prepare_run_dir(_cfg("tiny_swav"), run)  # the same method passes
