"""`seerlike jobs status|cancel|tail [JOB]`: look after jobs that `seerlike submit` recorded.

States come from Slurm's accounting (``sacct``; this is why infra/slurm runs slurmdbd) or,
for local-executor jobs, from the controller process and submitit's result files. They are
reported in Slurm's words: PENDING, RUNNING, REQUEUED, COMPLETED, FAILED, CANCELLED,
TIMEOUT, ...
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit
from submitit.core import utils

from seerlike.config import ConfigError

#: States after which a job does nothing more (REQUEUED and PREEMPTED with requeue are not final).
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                          "BOOT_FAIL", "DEADLINE", "INTERRUPTED"})


def default_log_dir() -> str:
    return os.environ.get("SEERLIKE_JOBS_DIR", "jobs")


def load_record(job_id: str, log_dir: str | os.PathLike | None = None) -> dict:
    """The record `seerlike submit` wrote for ``job_id`` (array task ids: ``ID_TASK``)."""
    index = Path(log_dir or default_log_dir()) / "index"
    path = index / f"{job_id}.json"
    if not path.is_file():
        known = sorted(p.stem for p in index.glob("*.json")) if index.is_dir() else []
        raise ConfigError(f"no job {job_id!r} in {index}"
                          + (f" (known: {', '.join(known[-10:])})" if known else "; pass --log-dir where it was submitted"))
    return json.loads(path.read_text())


def all_records(log_dir: str | os.PathLike | None = None) -> list[dict]:
    index = Path(log_dir or default_log_dir()) / "index"
    recs = [json.loads(p.read_text()) for p in index.glob("*.json")] if index.is_dir() else []
    return sorted(recs, key=lambda r: r.get("submitted_at", 0))


def job_of(rec: dict) -> submitit.Job:
    """A submitit job handle for a record (works from any process on a machine that sees the log dir)."""
    folder = Path(rec["log_dir"]) / "%j"
    tasks = list(range(int(rec.get("tasks", 1))))
    if rec["cluster"] == "local":
        return submitit.LocalJob(folder, rec["job_id"], tasks=tasks)
    return submitit.SlurmJob(folder, rec["job_id"], tasks=tasks)


SACCT_IDS_PER_CALL = 200
"""Job ids one sacct call asks about (an array id stands for all its tasks)."""


def _slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm state of every job id (array tasks as ``ID_TASK``), asking sacct once per 200 jobs or arrays.

    An ingest records one array task per chunk (100,000 at a billion images): querying by
    array id keeps that to one call per array instead of one per task (docs/scale.md).
    """
    bases = sorted({j.split("_")[0] for j in job_ids})
    lines: list[tuple[str, str]] = []
    for i in range(0, len(bases), SACCT_IDS_PER_CALL):
        ids = ",".join(bases[i:i + SACCT_IDS_PER_CALL])
        out = subprocess.run(["sacct", "-j", ids, "-X", "-n", "-P", "-o", "JobID,State"], capture_output=True,
                             text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"sacct -j {ids} failed: {out.stderr.strip()}")
        for line in out.stdout.splitlines():
            jid, _, state = line.partition("|")
            lines.append((jid, state.split()[0] if state else "UNKNOWN"))  # "CANCELLED by 0" -> CANCELLED
    exact = dict(lines)
    first_of_base: dict[str, str] = {}
    for jid, state in lines:
        first_of_base.setdefault(jid.split("_")[0], state)
    # not in accounting yet, or a pending array task (sacct shows ID_[3-99] for those): PENDING
    return {j: exact.get(j) or ("_" not in j and first_of_base.get(j)) or "PENDING" for j in job_ids}


def _slurm_state(job_id: str) -> str:
    return _slurm_states([job_id])[job_id]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own finished child) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _local_state(job: submitit.Job) -> str:
    if isinstance(job, submitit.LocalJob) and job._process is not None:
        if job._process.poll() is None:
            return "RUNNING"
    elif _pid_alive(int(job.job_id)):
        return "RUNNING"
    outcomes = []
    for task in range(job.num_tasks):
        p = utils.JobPaths(job.paths.folder.parent / "%j", job.job_id, task).result_pickle
        if p.exists():
            outcomes.append(utils.pickle_load(p)[0])
    if outcomes and all(o == "success" for o in outcomes) and len(outcomes) == job.num_tasks:
        return "COMPLETED"
    if "error" in outcomes:
        return "FAILED"
    return "CANCELLED"  # the controller is gone without a result: interrupted or cancelled


def state(job: submitit.Job) -> str:
    """Slurm-style state of a submitit job (local jobs included)."""
    if isinstance(job, submitit.LocalJob):
        return _local_state(job)
    return _slurm_state(job.job_id)


def states(jobs: list[submitit.Job]) -> list[str]:
    """``state`` of many jobs: the Slurm ones with one sacct call per 200 jobs or arrays."""
    slurm = _slurm_states([j.job_id for j in jobs if not isinstance(j, submitit.LocalJob)])
    return [_local_state(j) if isinstance(j, submitit.LocalJob) else slurm[j.job_id] for j in jobs]


#: A line that says why a stage failed: the CLI's one-line errors, logged errors, an exception's last line.
_CAUSE_LINE = re.compile(r"^seerlike [\w-]+: |\bERROR\b|^(?:[\w.]+\.)?\w*(?:Error|Exception|Failed|Reached|Interrupt)\b")


def _last_match(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip() and _CAUSE_LINE.search(line.strip()):
            return line.strip()
    return ""


def failure_cause(job: submitit.Job) -> str:
    """The line that says why ``job`` failed, from its tasks' stderr or the error submitit recorded.

    The stage's own error line (`seerlike train: config error: ...`, a logged ERROR) is preferred
    over the exception the job wrapper raised after it; '' when nothing says.
    """
    from_log, from_result = "", ""
    for task in range(job.num_tasks):
        paths = utils.JobPaths(job.paths.folder.parent / "%j", job.job_id, task)
        if not from_log and paths.stderr.exists():
            lines = paths.stderr.read_text(errors="replace").splitlines()[-400:]
            stage_lines = [ln for ln in lines if not re.search(r"submitit|launchers\.checkpointable", ln)]
            from_log = _last_match("\n".join(stage_lines))
        if not from_result and paths.result_pickle.exists():
            outcome, payload = utils.pickle_load(paths.result_pickle)[:2]
            if outcome == "error":
                text = str(payload).strip()
                from_result = _last_match(text) or (text.splitlines()[-1] if text else "")
    cause = from_log or from_result
    return cause[:500]


def wait_state(job: submitit.Job, timeout_s: float = 7 * 24 * 3600, poll_s: float = 1.0) -> str:
    """Block until ``job`` reaches a final state; return it."""
    end = time.monotonic() + timeout_s
    while True:
        s = state(job)
        if s in FINAL_STATES:
            return s
        if time.monotonic() > end:
            raise TimeoutError(f"job {job.job_id} still {s} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def cancel(job: submitit.Job) -> None:
    if isinstance(job, submitit.LocalJob):
        if job._process is not None:
            job.cancel()
        elif _pid_alive(int(job.job_id)):
            os.kill(int(job.job_id), signal.SIGINT)  # the controller stops its tasks on SIGINT
        return
    subprocess.run(["scancel", job.job_id], check=True, timeout=30)


# ---------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("status", "cancel", "tail"),
                   help="status: state and, for a failed job, its error line; cancel; tail: the job's log")
    p.add_argument("job", nargs="?", help="job id (status without one lists every recorded job)")
    p.add_argument("--log-dir", help="where the job was submitted from (default ./jobs or $SEERLIKE_JOBS_DIR)")
    p.add_argument("--task", type=int, default=0, help="tail: which task's log (default 0)")
    p.add_argument("--stdout", action="store_true", help="tail: stdout instead of stderr (where logs go)")
    p.add_argument("-n", "--lines", type=int, default=40, help="tail: last N lines")
    p.add_argument("-f", "--follow", action="store_true", help="tail: keep printing until the job ends")


def _tail(path: Path, n: int) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def run(args: argparse.Namespace) -> int:
    if args.action == "status" and not args.job:
        recs = all_records(args.log_dir)
        if not recs:
            print(f"no jobs recorded in {Path(args.log_dir or default_log_dir()) / 'index'}")
            return 0
        print(f"{'JOB':>14}  {'CLUSTER':7}  {'STAGE':14}  {'STATE':10}  RUN FOLDER")
        handles = [job_of(rec) for rec in recs]
        for rec, job, st in zip(recs, handles, states(handles)):
            print(f"{rec['job_id']:>14}  {rec['cluster']:7}  {rec['stage']:14}  {st:10}  "
                  f"{rec.get('run_dir') or '-'}")
            cause = failure_cause(job) if st not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETED") else ""
            if cause:
                print(f"{'':>14}  cause: {cause[:160]}")
        return 0
    if not args.job:
        raise ConfigError(f"seerlike jobs {args.action}: give a JOB id")
    rec = load_record(args.job, args.log_dir)
    job = job_of(rec)
    if args.action == "status":
        st = state(job)
        print(f"job {rec['job_id']} ({rec['cluster']}, {rec['stage']}): {st}")
        cause = failure_cause(job) if st not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETED") else ""
        if cause:
            print(f"cause: {cause}")
        print(f"log folder: {rec['log_folder']}")
        print(f"run folder: {rec.get('run_dir') or '-'}")
        return 0
    if args.action == "cancel":
        cancel(job)
        print(f"job {rec['job_id']}: cancel requested")
        return 0
    paths = utils.JobPaths(Path(rec["log_dir"]) / "%j", rec["job_id"], args.task)
    path = paths.stdout if args.stdout else paths.stderr
    text = _tail(path, args.lines)
    print(text if text else f"({path} is empty or missing)")
    if args.follow:
        seen = len(path.read_text(errors="replace")) if path.exists() else 0
        while True:
            done = state(job) in FINAL_STATES
            if path.exists():
                data = path.read_text(errors="replace")
                sys.stdout.write(data[seen:])
                sys.stdout.flush()
                seen = len(data)
            if done:
                break
            time.sleep(1.0)
    return 0
