"""Sharded checkpoints: save on 2 ranks, load on 1; incomplete ones are invisible; keep-last-N."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from seerlike import models
from seerlike.engine import checkpoint
from seerlike.engine.checkpoint import CheckpointConfig, Checkpointer
from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.parallelize import ParallelConfig, parallelize
from seerlike.engine.config import TrainConfig
from seerlike.methods.swav import SwAV
from seerlike.testing import run_on_ranks

pytestmark = pytest.mark.dist

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _setup():
    torch.manual_seed(0)
    method = SwAV(SwAV.Config(head_dims=(32, 16), num_prototypes=10, num_crops=2, freeze_prototypes_steps=0,
                              queue_length=8), models.build("resnet10_cifar"))
    model = parallelize(method, ParallelConfig(strategy="fsdp"))
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.1, weight_decay=1e-4), method)
    return method, model, opt


def _train_step(model, opt, method, step: int, rank: int) -> None:
    g = torch.Generator().manual_seed(100 * step + rank)
    views = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
    loss, _ = model(views)
    loss.backward()
    opt.step()
    opt.zero_grad()
    method.on_step_end(step, 10)


def _save_on_ranks(rank: int, world: int, root: str, run_dir: str | None = None, async_save: bool = True):
    method, model, opt = _setup()
    ckpt = Checkpointer(CheckpointConfig(dir=root, keep_last=2, async_save=async_save), run_dir=run_dir or root)
    for step in range(1, 4):
        _train_step(model, opt, method, step, rank)
        ckpt.save(step, model, opt, method=method, scaler=None, data_state={"rank": rank, "step": step},
                  train_config=TrainConfig())
    ckpt.wait()  # async: the last save gets its COMPLETE marker here
    return {"model": get_model_state_dict(model, options=FULL),
            "optim": get_optimizer_state_dict(model, opt, options=FULL).get("state"),
            "rng": torch.get_rng_state()}


def _load_on_one(rank: int, world: int, root: str, run_dir: str | None = None):
    method, model, opt = _setup()
    ckpt = Checkpointer(CheckpointConfig(dir=root), run_dir=run_dir or root)
    restored = ckpt.restore(ckpt.find_latest(), model, opt, method=method, scaler=None)
    return {"step": restored.step, "data": restored.data_state, "exact": restored.exact,
            "model": get_model_state_dict(model, options=FULL),
            "optim": get_optimizer_state_dict(model, opt, options=FULL).get("state")}


def test_save_on_two_ranks_load_on_one(tmp_path):
    """Saved with dcp.async_save (the synchronous path runs in the loop and resume tests)."""
    root = str(tmp_path / "ckpts")
    saved = run_on_ranks(_save_on_ranks, 2, root)[0]
    # keep-last-2, every survivor complete
    assert [checkpoint.step_of(p) for p in checkpoint.list_complete(root)] == [2, 3]
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["step_00000002", "step_00000003"]
    latest = checkpoint.latest(root)
    assert sorted(p.name for p in latest.iterdir()) == sorted([
        ".metadata", "__0_0.distcp", "__1_0.distcp", "COMPLETE", "checksums.json", "config.yaml", "meta.json",
        "rank_00000.json", "rank_00001.json", "rank_00000.safetensors", "rank_00001.safetensors"])

    loaded = run_on_ranks(_load_on_one, 1, root)[0]
    assert loaded["step"] == 3
    assert not loaded["exact"] and loaded["data"] == {"rank": 0, "step": 3}  # the pipeline maps it
    assert saved["model"].keys() == loaded["model"].keys()
    for k, v in saved["model"].items():
        assert torch.equal(v, loaded["model"][k]), k
    assert saved["model"]["queue_filled"] > 0  # method state (SwAV queue) travels in the model state
    assert saved["optim"].keys() == loaded["optim"].keys()
    for fqn, st in saved["optim"].items():
        assert torch.equal(st["momentum_buffer"], loaded["optim"][fqn]["momentum_buffer"]), fqn

    # the one-process reader used by export / extract sees the same full state dict
    full = checkpoint.load_model_state(latest)
    assert full.keys() == saved["model"].keys() and any(k.startswith("backbone.") for k in full)
    assert all(torch.equal(full[k], v) for k, v in saved["model"].items())


def test_a_checkpoint_without_complete_is_ignored(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step in (5, 10):
        d = checkpoint.step_dir(root, step)
        d.mkdir(parents=True)
        (d / "meta.json").write_text("{}")
    (checkpoint.step_dir(root, 5) / checkpoint.COMPLETE).write_text("5\n")
    assert checkpoint.latest(tmp_path / "run") == checkpoint.step_dir(root, 5)  # the run dir works too
    assert checkpoint.latest(root) == checkpoint.step_dir(root, 5)
    shutil.rmtree(checkpoint.step_dir(root, 5))
    assert checkpoint.latest(root) is None
    assert checkpoint.latest(tmp_path / "nowhere") is None


@pytest.mark.integration
def test_s3_checkpoints_upload_complete_last_and_resume(tmp_path, s3_bucket, monkeypatch):
    import boto3

    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # inherited by the spawned ranks
    root = f"s3://{bucket}/run1/ckpts"
    saved = run_on_ranks(_save_on_ranks, 2, root, str(tmp_path / "run"), False)[0]
    keys = sorted(o["Key"] for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(
        Bucket=bucket, Prefix="run1/ckpts/")["Contents"])
    assert {k.split("/")[2] for k in keys} == {"step_00000002", "step_00000003"}  # keep-last-2 remotely
    assert "run1/ckpts/step_00000003/COMPLETE" in keys and "run1/ckpts/step_00000003/__1_0.distcp" in keys
    assert not (tmp_path / "run" / "checkpoints_staging" / "step_00000003").exists()  # staging cleaned up
    loaded = run_on_ranks(_load_on_one, 1, root, str(tmp_path / "run"))[0]
    assert loaded["step"] == 3
    assert all(torch.equal(v, loaded["model"][k]) for k, v in saved["model"].items())
