"""The launchers with submitit's local executor: no Slurm, same job functions and pipelines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launchers import jobs as jobslib
from launchers.pipeline import pipeline_from_dict, run_pipeline, status
from launchers.submit import SubmitConfig, submit_stage
from tests.integration import launch_helpers

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HELPERS = "tests.integration.launch_helpers"


@pytest.fixture(autouse=True)
def _importable_tests(monkeypatch):
    # the local executor's tasks are fresh interpreters: they must find tests/ too
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def test_submit_two_local_tasks_form_one_process_group(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "seerlike", "submit", "train", "--cluster", "local", "--tasks-per-node", "2",
         "--time", "5", "--signal-delay-s", "30", "--log-dir", str(tmp_path / "jobs"), "--wait", "--",
         "--recipe", "nope", "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    # a bad stage argument is refused before anything is queued
    assert out.returncode == 2 and "nope" in out.stderr, out.stderr
    assert not (tmp_path / "jobs" / "index").exists()

    cfg = SubmitConfig(cluster="local", tasks_per_node=2, time=5, signal_delay_s=30, log_dir=str(tmp_path / "jobs"))
    job = submit_stage(cfg, f"{HELPERS}:world_info", ["x"])
    assert jobslib.wait_state(job, timeout_s=120, poll_s=0.2) == "COMPLETED"
    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in results)  # a real all_reduce across the 2 tasks
    rec = jobslib.load_record(job.job_id, cfg.log_dir)
    assert rec["cluster"] == "local" and rec["tasks"] == 2
    tail = subprocess.run([sys.executable, "-m", "seerlike", "jobs", "tail", job.job_id, "--log-dir", cfg.log_dir],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "task 0/2 of job" in tail.stdout, tail.stdout + tail.stderr


def test_same_pipeline_runs_stage_after_stage_and_reruns_only_what_changed(tmp_path):
    import yaml

    spec = launch_helpers.numbers_pipeline(str(tmp_path / "pipe"), "local", str(tmp_path / "jobs"))
    path = tmp_path / "numbers.yaml"
    path.write_text(yaml.safe_dump(spec))
    run = subprocess.run([sys.executable, "-m", "seerlike", "pipeline", "run", str(path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.findall(r"^(\w+)\s+\d+\s+COMPLETED", run.stdout, re.M) == ["make", "square", "total"], run.stdout
    assert json.loads((tmp_path / "pipe/total/data.json").read_text()) == [55]
    assert (tmp_path / "pipe/order.txt").read_text().split() == ["make", "square", "total"]
    st = subprocess.run([sys.executable, "-m", "seerlike", "pipeline", "status", "--dir", str(tmp_path / "pipe")],
                        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert re.findall(r"^(\w+)\s+\d+\s+DONE", st.stdout, re.M) == ["make", "square", "total"], st.stdout

    # unchanged: nothing runs
    rows = run_pipeline(pipeline_from_dict(spec))
    assert [r["state"] for r in rows] == ["DONE"] * 3
    assert (tmp_path / "pipe/order.txt").read_text().split() == ["make", "square", "total"]

    # a changed middle stage reruns with everything after it, not before it
    spec["stages"][1]["args"].append("--out={out}")  # same meaning, new fingerprint
    rows = run_pipeline(pipeline_from_dict(spec))
    assert [r["state"] for r in rows] == ["DONE", "COMPLETED", "COMPLETED"]
    assert (tmp_path / "pipe/order.txt").read_text().split() == ["make", "square", "total", "square", "total"]


def test_a_failing_stage_stops_the_local_pipeline(tmp_path):
    spec = launch_helpers.numbers_pipeline(str(tmp_path / "pipe"), "local", str(tmp_path / "jobs"), square_op="fail")
    with pytest.raises(RuntimeError, match=r"stage square \(job \d+\) ended FAILED: "
                                           r"RuntimeError: this stage fails on purpose"):
        run_pipeline(pipeline_from_dict(spec))
    assert [r["state"] for r in status(pipeline_from_dict(spec))] == ["DONE", "FAILED", "NOT SUBMITTED"]
    assert not (tmp_path / "pipe/total").exists()
    # `seerlike jobs status` says why, not only that it failed
    failed = next(r for r in jobslib.all_records(tmp_path / "jobs") if r["stage"] == "square")
    out = subprocess.run([sys.executable, "-m", "seerlike", "jobs", "status", failed["job_id"], "--log-dir",
                          str(tmp_path / "jobs")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "FAILED" in out.stdout, out.stderr
    assert "cause: RuntimeError: this stage fails on purpose" in out.stdout
