"""Launchers without a cluster: options, validation, pipeline resolution and skipping."""

from __future__ import annotations

import argparse
import json
import os
import signal

import pytest

from launchers import pipeline as pl
from launchers.checkpointable import StageJob
from launchers.submit import SubmitConfig, add_arguments, config_from_args, parse_time, run_dir_of
from seerlike.config import ConfigError
from seerlike.engine.loop import REQUEUE_EXIT_CODE


def _stopped_by_sigterm(argv: list[str]) -> int:
    """A stage that checkpointed and stopped on Slurm's SIGTERM, before submitit's USR2 came."""
    return REQUEUE_EXIT_CODE


def test_a_usr2_after_the_stage_stopped_does_not_requeue_the_job_again(monkeypatch, caplog):
    for k, v in {"_TEST_CLUSTER_": "local", "SUBMITIT_LOCAL_JOB_ID": "7", "SUBMITIT_LOCAL_NTASKS": "1", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
                 "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0",
                 "OMP_NUM_THREADS": "1", "RANK": "", "WORLD_SIZE": "", "LOCAL_RANK": "", "LOCAL_WORLD_SIZE": "",
                 "MASTER_ADDR": "", "MASTER_PORT": ""}.items():
        monkeypatch.setenv(k, v)  # the stage job rewrites the rank variables; monkeypatch restores them
    submitit_requeues, our_requeues = [], []

    def requeue(self, env):
        os.kill(os.getpid(), signal.SIGUSR2)  # submitit's USR2, arriving while rank 0 requeues
        our_requeues.append(self.requeues)
        raise SystemExit(-1)

    monkeypatch.setattr(StageJob, "_requeue_or_fail", requeue)
    # stands in for submitit's own handler, which requeues the job when it gets USR2
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: submitit_requeues.append(signum))
    try:
        with pytest.raises(SystemExit):
            StageJob(f"{__name__}:_stopped_by_sigterm")()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert our_requeues == [0] and submitit_requeues == []
    assert "caught SIGUSR2 after the stage had checkpointed and stopped" in caplog.text


def test_requeue_exit_code_is_defined_once():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    defs = [p for pkg in ("seerlike", "sharding", "launchers") for p in (root / pkg).rglob("*.py")
            if re.search(r"^REQUEUE_EXIT_CODE\s*=", p.read_text(), re.M)]
    assert defs == [root / "seerlike" / "engine" / "loop.py"]


def test_imagenet_mean_is_defined_once():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    defs = [p for pkg in ("seerlike", "sharding", "launchers") for p in (root / pkg).rglob("*.py")
            if re.search(r"^IMAGENET_MEAN\s*=", p.read_text(), re.M)]
    assert defs == [root / "seerlike" / "data" / "augment.py"]


@pytest.mark.parametrize("text,minutes", [("90", 90), ("01:30:00", 90), ("2-00:00:00", 2880), ("10:30", 11),
                                          ("0:00:30", 1), ("1-2", 1560)])
def test_parse_time_reads_slurm_spellings(text, minutes):
    assert parse_time(text) == minutes


def test_parse_time_rejects_garbage():
    with pytest.raises(ConfigError, match="--time"):
        parse_time("soon")


@pytest.mark.parametrize("kw,msg", [
    ({"nodes": 0}, "nodes must be >= 1"),
    ({"mem": "lots"}, "not a Slurm memory size"),
    ({"time": 1, "signal_delay_s": 60}, "shorter than time"),
    ({"cluster": "local", "nodes": 2}, "one node"),
    ({"cluster": "local", "dependency": "afterok:1"}, "no dependencies"),
])
def test_submit_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SubmitConfig(**kw)


def test_command_line_splits_stage_arguments_at_double_dash():
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["train", "--nodes", "2", "--tasks-per-node", "8", "--time", "1:00:00", "--mem", "64G",
                         "--env", "NCCL_DEBUG=INFO", "--exclusive", "--",
                         "--recipe", "tiny_swav", "--run-dir", "r", "optim.lr=0.1", "--nodes", "9"])
    assert args.stage_args == ["--recipe", "tiny_swav", "--run-dir", "r", "optim.lr=0.1", "--nodes", "9"]
    cfg = config_from_args(args)
    assert (cfg.nodes, cfg.tasks_per_node, cfg.time, cfg.mem, cfg.exclusive) == (2, 8, 60, "64G", True)
    assert cfg.env == {"NCCL_DEBUG": "INFO"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        config_from_args(p.parse_args(["train", "--env", "NOEQUALS"]))


def test_run_dir_is_found_in_stage_arguments(tmp_path):
    assert run_dir_of(["--recipe", "x", "--run-dir", str(tmp_path / "r")]) == str(tmp_path / "r")
    assert run_dir_of(["--out=s3://b/p"]) == "s3://b/p"
    assert run_dir_of(["--recipe", "x"]) == ""


def _spec(tmp_path, **extra):
    return {"name": "t", "dir": str(tmp_path / "p"), "vars": {"data": "/d"}, **extra, "stages": [
        {"name": "a", "command": "train", "args": ["--data", "{data}", "--run-dir", "{out}"]},
        {"name": "b", "command": "extract", "args": ["--checkpoint", "{a}", "--out", "{out}"]},
    ]}


def test_pipeline_fills_placeholders_with_stage_folders(tmp_path):
    stages = pl.resolve(pl.pipeline_from_dict(_spec(tmp_path)))
    root = tmp_path / "p"
    assert [argv for _, argv, _ in stages] == [["--data", "/d", "--run-dir", str(root / "a")],
                                               ["--checkpoint", str(root / "a"), "--out", str(root / "b")]]


@pytest.mark.parametrize("change,msg", [
    (lambda s: s["stages"][1]["args"].append("{nope}"), r"unknown placeholder\(s\) \['nope'\]"),
    (lambda s: s["stages"].append(dict(s["stages"][0])), "unique"),
    (lambda s: s["stages"][0].update(name="data"), "both stage names and variables"),
    (lambda s: s["stages"][0].update(name="1st"), "letters"),
    (lambda s: s.update(stages=[]), "at least one stage"),
    (lambda s: s["stages"][0].update(bogus=1), "bogus"),
])
def test_pipeline_rejects_bad_specs(tmp_path, change, msg):
    spec = _spec(tmp_path)
    change(spec)
    with pytest.raises(ConfigError, match=msg):
        pl.resolve(pl.pipeline_from_dict(spec))


def test_a_stage_is_done_only_with_a_marker_of_the_same_command(tmp_path):
    p = pl.pipeline_from_dict(_spec(tmp_path))
    (stage, argv, _), _ = pl.resolve(p)
    assert not pl.is_done(p, stage, argv)
    marker = pl.marker_path(p, "a")
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"fingerprint": pl.fingerprint(stage.command, argv)}))
    assert pl.is_done(p, stage, argv)
    assert not pl.is_done(p, stage, argv + ["optim.lr=0.2"])
    assert [r["state"] for r in pl.status(p)] == ["DONE", "NOT SUBMITTED"]


def test_submit_checks_the_stage_inputs_before_queueing(tmp_path):
    from launchers.submit import validate_stage

    argv = ["--recipe", "tiny_swav", "--data", str(tmp_path / "missing"), "--run-dir", str(tmp_path / "run")]
    validate_stage("train", argv)  # a pipeline stage: its data may come from an earlier stage
    with pytest.raises(ConfigError, match=r"data source '.*missing' does not exist"):
        validate_stage("train", argv, check_inputs=True)
    with pytest.raises(ConfigError, match="--checkpoint .*nope does not exist"):
        validate_stage("extract", ["--checkpoint", str(tmp_path / "nope"), "--data", str(tmp_path),
                                   "--out", str(tmp_path / "f")], check_inputs=True)
    with pytest.raises(ConfigError, match="unknown backbone 'resnet_nope'"):
        validate_stage("export", ["--checkpoint", "random:resnet_nope", "--out", str(tmp_path / "e")],
                       check_inputs=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stderr, says", [
    ("sbatch: error: Invalid generic resource (gres) specification", "lower or drop --gpus-per-node"),
    ("sbatch: error: Batch job submission failed: Requested node configuration is not available",
     "no node offers --nodes 2, --tasks-per-node 8 x --cpus-per-task 1, --gpus-per-node 8"),
    ("sbatch: error: invalid partition specified: gpu", "check --partition"),
])
def test_an_sbatch_refusal_is_explained_in_one_line(stderr, says):
    from launchers.submit import explain_refusal

    text = explain_refusal(stderr + "\n", SubmitConfig(cluster="slurm", nodes=2, tasks_per_node=8, gpus_per_node=8))
    assert text.startswith("sbatch refused the job: sbatch: error:") and says in text and "\n" not in text


def test_submit_refuses_a_stage_that_overwrites_its_checkpoints_on_every_requeue(tmp_path):
    from launchers.submit import validate_stage

    argv = ["--recipe", "tiny_swav", "--data", str(tmp_path), "--run-dir", str(tmp_path / "r"), "checkpoint.overwrite=true"]
    with pytest.raises(ConfigError, match="checkpoint.overwrite=true would run again on every requeue"):
        validate_stage("train", argv)
    validate_stage("train", argv[:-1] + ["checkpoint.overwrite=false"])
