"""The launchers on a real one-node Slurm cluster (infra/slurm: munge, MariaDB, slurmdbd, slurmctld, slurmd).

The module fixture brings the cluster up with ``infra/slurm/up`` (installing the Debian
packages if needed) and takes it down again unless it was already running. Training jobs
run the real ``seerlike train --recipe tiny_swav`` on 2 gloo ranks with a handful of steps.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch

from launchers import jobs as jobslib
from launchers.pipeline import pipeline_from_dict, run_pipeline, status
from launchers.submit import SubmitConfig, afterok, submit_stage
from seerlike.engine import checkpoint as ckptlib
from tests.integration import launch_helpers

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

ROOT = Path(__file__).resolve().parents[2]
HELPERS = "tests.integration.launch_helpers"
TRAIN_STEPS = 10


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("the one-node Slurm cluster needs root (infra/slurm/up installs packages and runs slurmd)")
    was_up = subprocess.run([str(ROOT / "infra/slurm/status")], capture_output=True).returncode == 0
    up = subprocess.run([str(ROOT / "infra/slurm/up")], capture_output=True, text=True, timeout=900)
    if up.returncode == 3:
        pytest.skip(f"Slurm's Debian packages could not be installed: {up.stderr.strip()[-400:]}")
    assert up.returncode == 0, f"infra/slurm/up failed:\n{up.stdout}\n{up.stderr}"
    conf = re.search(r"export SLURM_CONF=(\S+)", up.stdout).group(1)
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PYTHONPATH")}
    # jobs inherit this environment (sbatch --export=ALL): they must find the config and tests/
    os.environ["SLURM_CONF"] = conf
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else []))
    try:
        yield conf
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if not was_up:
            down = subprocess.run([str(ROOT / "infra/slurm/down")], capture_output=True, text=True, timeout=120)
            assert down.returncode == 0, f"infra/slurm/down left something behind:\n{down.stdout}\n{down.stderr}"


def _cfg(tmp_path: Path, **kw) -> SubmitConfig:
    return SubmitConfig(cluster="slurm", log_dir=str(tmp_path / "jobs"), time=10, signal_delay_s=30, **kw)


def _wait(job: submitit.Job, timeout_s: float = 240) -> str:
    return jobslib.wait_state(job, timeout_s=timeout_s, poll_s=0.5)


def _train_args(cifar_dir: Path, run_dir: Path) -> list[str]:
    # a short warmup: the recipe's 10 warmup steps would be the whole run.
    # fp32: bf16 autocast on CPU differs between identical runs (seen at step 1), fp32 does not
    return ["--recipe", "tiny_swav", "--data", str(cifar_dir / "train.csv"), "--run-dir", str(run_dir),
            "data.batch_size=8", "data.num_workers=0", "checkpoint.every_steps=2", "checkpoint.keep_last=0",
            "loop.log_every=1", "loop.progress=false", "loop.tensorboard=false", "precision.dtype=fp32", "optim.warmup_steps=2",
            f"loop.max_steps={TRAIN_STEPS}"]


def _seerlike(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seerlike", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def reference_run(slurm, cifar_dir, tmp_path_factory):
    """An uninterrupted 2-task training job submitted through `seerlike submit train`."""
    tmp = tmp_path_factory.mktemp("reference")
    run_dir = tmp / "run"
    out = _seerlike("submit", "train", "--cluster", "slurm", "--nodes", "1", "--tasks-per-node", "2",
                    "--cpus-per-task", "1", "--time", "00:10:00", "--log-dir", str(tmp / "jobs"), "--wait",
                    "--", *_train_args(cifar_dir, run_dir))
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = re.search(r"job id: (\S+)", out.stdout).group(1)
    assert re.search(r"log folder: .*/jobs/" + job_id, out.stdout)
    assert f"run folder: {run_dir}" in out.stdout
    assert "state: COMPLETED" in out.stdout
    return job_id, run_dir, tmp / "jobs"


def test_two_task_training_job_completes_with_checkpoint(reference_run):
    job_id, run_dir, log_dir = reference_run
    job = jobslib.job_of(jobslib.load_record(job_id, log_dir))
    assert job.num_tasks == 2
    assert job.results() == [0, 0]  # both ranks' `seerlike train` exit status
    last = ckptlib.latest(run_dir)
    assert last is not None and ckptlib.step_of(last) == TRAIN_STEPS
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TRAIN_STEPS + 1))
    assert "on 2 rank(s)" in job.stderr()
    status = _seerlike("jobs", "status", job_id, "--log-dir", str(log_dir))
    assert f"job {job_id} (slurm, train): COMPLETED" in status.stdout, status.stdout + status.stderr


def test_preempted_training_requeues_and_resumes_exactly(reference_run, cifar_dir, tmp_path):
    _, ref_dir, _ = reference_run
    run_dir = tmp_path / "run"
    job = submit_stage(_cfg(tmp_path, tasks_per_node=2, max_requeues=2), "train", _train_args(cifar_dir, run_dir))
    first = ckptlib.step_dir(run_dir / "checkpoints", 2) / ckptlib.COMPLETE
    end = time.monotonic() + 180
    while not first.exists():
        assert time.monotonic() < end, f"no checkpoint at step 2 after 180 s:\n{job.stderr()}"
        assert jobslib.state(job) in ("PENDING", "RUNNING"), job.stderr()
        time.sleep(0.2)
    job._interrupt()  # what Slurm does on preemption: SIGTERM, then submitit's USR2
    assert _wait(job) == "COMPLETED", job.stderr()
    log = job.stderr()
    # scancel sends SIGTERM, then USR2: the trainer may stop on either; the job is requeued exactly once
    assert "caught SIGUSR2" in log or "checkpointed and stopped after" in log, log
    assert log.count("requeueing job") == 1 and "scontrol requeue" not in log, log
    assert "Slurm restart count 1" in log, log
    stop_step = int(re.search(r"checkpoint at step (\d+) written, exiting", log).group(1))
    assert 2 <= stop_step < TRAIN_STEPS
    assert f"from step {stop_step} to {TRAIN_STEPS}" in log  # the requeued run resumed there
    # every step ran exactly once across the two runs, and the end state is bit-identical
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == list(range(1, TRAIN_STEPS + 1))
    ref = ckptlib.load_model_state(ckptlib.latest(ref_dir))
    got = ckptlib.load_model_state(ckptlib.latest(run_dir))
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_ingest_runs_as_a_job_array_plus_a_dependent_merge(slurm, photos_dir, tmp_path):
    out_dir = tmp_path / "dataset"
    out = _seerlike("submit", "ingest", "--cluster", "slurm", "--time", "10", "--log-dir", str(tmp_path / "jobs"),
                    "--wait", "--", str(photos_dir), "--out", str(out_dir), "chunk_size=30", "--no-progress")
    assert out.returncode == 0, out.stdout + out.stderr
    array_id = re.search(r"array job id: (\d+) \((\d+) chunk task", out.stdout)
    n_photos = sum(1 for p in photos_dir.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    assert int(array_id.group(2)) == -(-n_photos // 30)
    merge_id = re.search(r"job id: (\d+)\s+\(merge", out.stdout).group(1)
    assert "state: COMPLETED" in out.stdout
    expected = {**{f"{array_id.group(1)}_{i}": "COMPLETED" for i in range(int(array_id.group(2)))},
                merge_id: "COMPLETED"}
    deadline = time.monotonic() + 30
    while True:  # slurmdbd records job ends asynchronously: sacct may lag the scheduler briefly
        acct = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", f"{array_id.group(1)},{merge_id}"],
                              capture_output=True, text=True).stdout.split()
        tasks = {line.split("|")[0]: line.split("|")[1] for line in acct}
        if tasks == expected or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert tasks == expected
    summary = json.loads((out_dir / "summary.json").read_text())
    assert (out_dir / "manifest.parquet").is_file() and sorted(out_dir.glob("shards/*.tar"))
    # the merge ran after every chunk: it accounts for all of them
    assert summary["chunks"] == int(array_id.group(2)) and summary["seen"] == n_photos


def test_dependency_chain_runs_in_order_and_a_failure_cancels_the_rest(slurm, tmp_path):
    cfg = _cfg(tmp_path)
    order = tmp_path / "order.txt"
    a = submit_stage(cfg, f"{HELPERS}:write_file", [str(order), "a", "3"])
    b = submit_stage(cfg, f"{HELPERS}:write_file", [str(order), "b"], dependency=afterok([a]))
    c = submit_stage(cfg, f"{HELPERS}:write_file", [str(order), "c"], dependency=afterok([b]))
    bad = submit_stage(cfg, f"{HELPERS}:write_file", [str(order)])  # IndexError: fails
    after_bad = submit_stage(cfg, f"{HELPERS}:write_file", [str(order), "never"], dependency=afterok([bad]))
    assert [_wait(j) for j in (a, b, c)] == ["COMPLETED"] * 3
    assert order.read_text().split() == ["a", "b", "c"]
    assert _wait(bad) == "FAILED"
    assert _wait(after_bad, timeout_s=60) == "CANCELLED"  # kill_invalid_depend: never left pending
    assert "never" not in order.read_text()


def test_cancelled_job_is_reported_cancelled(slurm, tmp_path):
    cfg = _cfg(tmp_path)
    job = submit_stage(cfg, f"{HELPERS}:sleep_for", ["300"])
    end = time.monotonic() + 60
    while jobslib.state(job) != "RUNNING":
        assert time.monotonic() < end, "job did not start within 60 s"
        time.sleep(0.2)
    jobslib.cancel(job)  # what `seerlike jobs cancel` calls
    assert _wait(job, timeout_s=60) == "CANCELLED"
    out = _seerlike("jobs", "status", job.job_id, "--log-dir", cfg.log_dir)
    assert "CANCELLED" in out.stdout, out.stdout + out.stderr
    # with accounting, submitit's result() ends (it would wait forever without sacct)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(job.result)
        with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
            fut.result(timeout=60)


def test_pipeline_chains_stages_with_afterok_and_skips_completed_ones(slurm, tmp_path):
    spec = launch_helpers.numbers_pipeline(str(tmp_path / "pipe"), "slurm", str(tmp_path / "jobs"))
    rows = run_pipeline(pipeline_from_dict(spec), wait=True)
    assert [r["state"] for r in rows] == ["DONE"] * 3, rows
    record = json.loads((tmp_path / "pipe/.pipeline/jobs.json").read_text())
    ids = [record[s]["job_id"] for s in ("make", "square", "total")]
    scripts = [next((tmp_path / "jobs" / i).glob("*_submission.sh")).read_text() for i in ids]
    assert "--dependency" not in scripts[0]
    assert f"--dependency=afterok:{ids[0]}" in scripts[1] and f"--dependency=afterok:{ids[1]}" in scripts[2]
    assert json.loads((tmp_path / "pipe/total/data.json").read_text()) == [55]
    again = run_pipeline(pipeline_from_dict(spec))
    assert [r["job_id"] for r in again] == ["", "", ""]  # nothing resubmitted
    assert [r["state"] for r in status(pipeline_from_dict(spec))] == ["DONE"] * 3


def test_ingest_split_merge_as_jobs_equals_a_local_ingest(slurm, photos_dir, tmp_path):
    """Dedup job, an array of merge-chunk tasks and the finish job give the dataset a local ingest gives."""
    from launchers.submit import submit_ingest
    from sharding.manifest import read_manifest

    photos = sorted(p for p in photos_dir.iterdir() if p.suffix.lower() in (".jpg", ".png"))[:36]
    inputs = [str(p) for p in photos] + [str(photos[i]) for i in (1, 9, 17, 2)]  # repeats in later chunks
    (tmp_path / "list.txt").write_text("\n".join(inputs) + "\n")
    ingest_args = ["chunk_size=8", "shuffle=false", "shard_max_samples=3", "--no-progress"]
    local = _seerlike("ingest", str(tmp_path / "list.txt"), "--out", str(tmp_path / "local"), *ingest_args)
    assert local.returncode == 0, local.stdout + local.stderr
    jobs, finish = submit_ingest(_cfg(tmp_path, array_parallelism=2),
                                 [str(tmp_path / "list.txt"), "--out", str(tmp_path / "slurm"), *ingest_args])
    assert len(jobs) == 5 and _wait(finish, timeout_s=480) == "COMPLETED", finish.stderr()
    # 5 chunk tasks, the dedup job, 2 merge-chunk tasks (chunks 0, 2, 4 and 1, 3), the finish job
    expected = sorted([("seerlike-ingest", "COMPLETED")] * 5 + [("seerlike-ingest-merge-chunks", "COMPLETED")] * 2
                      + [("seerlike-ingest-dedup", "COMPLETED"), ("seerlike-ingest-merge", "COMPLETED")])
    deadline = time.monotonic() + 60
    while True:  # slurmdbd records job ends asynchronously, a task's row can come after its successor's
        acct = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,JobName,State", "-S", "now-1hour"],
                              capture_output=True, text=True).stdout.splitlines()
        ours = sorted((n, s) for j, n, s in (line.split("|") for line in acct)
                      if int(j.split("_")[0]) >= int(jobs[0].job_id.split("_")[0]))
        if ours == expected or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert ours == expected
    got, want = tmp_path / "slurm", tmp_path / "local"
    summary = json.loads((got / "summary.json").read_text())
    assert (summary["written"], summary["duplicates_across_chunks"], summary["chunks"], summary["shards"]) == (36, 4, 5, 14)
    assert read_manifest(str(got)).to_pylist() == read_manifest(str(want)).to_pylist()
    assert {p.name: p.read_bytes() for p in sorted((got / "shards").iterdir())} == \
        {p.name: p.read_bytes() for p in sorted((want / "shards").iterdir())}
    assert (got / "shards.parquet").read_bytes() == (want / "shards.parquet").read_bytes()
    fields = ("seen", "written", "duplicate", "rejected", "rejected_by_reason", "duplicates_across_chunks", "shards")
    assert {f: summary[f] for f in fields} == {f: json.loads((want / "summary.json").read_text())[f] for f in fields}
