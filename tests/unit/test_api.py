"""The Python API trains like the CLI, returns what comes next, and fails like the CLI."""

from __future__ import annotations

import pytest

import seerlike
from seerlike.config import ConfigError

TINY = {"loop.max_steps": 2, "data.batch_size": 8, "loop.progress": False, "loop.tensorboard": False,
        "optim.warmup_steps": 1, "parallel.strategy": "none", "precision.dtype": "fp32",
        "checkpoint.every_steps": 2}


def test_pretrain_returns_the_run_its_checkpoint_and_metrics(tmp_path, cifar_dir, one_thread):
    run = seerlike.pretrain(data=cifar_dir / "val", out=tmp_path / "run", recipe="tiny_byol", overrides=TINY)
    assert run.run_dir == (tmp_path / "run").absolute() and run.step == 2 and not run.stopped
    assert run.checkpoint is not None and run.checkpoint.name == "step_00000002"
    assert run.metrics["step"] == 2 and run.metrics["loss"] > 0
    assert run.config.loop.max_steps == 2
    # no recipe: the run continues from its own config.yaml (already complete: nothing to do)
    again = seerlike.pretrain(out=tmp_path / "run")
    assert again.step == 2 and again.checkpoint == run.checkpoint


def test_an_unknown_method_fails_listing_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown method 'nope'; choose one of \[.*'byol'.*'swav'"):
        seerlike.pretrain(data=tmp_path, out=tmp_path / "run", recipe="tiny_swav", overrides={"method.name": "nope"})
    assert not (tmp_path / "run").exists()


def test_the_cli_says_the_same_with_exit_status_2(tmp_path, capsys):
    from seerlike.cli import main

    assert main(["train", "--recipe", "tiny_swav", "--run-dir", str(tmp_path / "r"), "method.name=nope"]) == 2
    assert "unknown method 'nope'; choose one of" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
