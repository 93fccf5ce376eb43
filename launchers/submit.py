"""`seerlike submit STAGE [resources] -- <stage args>`: one stage as a Slurm (or local) job.

The stage runs in-process inside every task through :class:`launchers.checkpointable.StageJob`
(``seerlike <stage> <stage args>``), so a multi-task job is a multi-rank run: the Spine's
``init_distributed()`` reads the Slurm variables (or, with the local executor, the torchrun
ones set from submitit's job environment).

Every submitted job gets a record ``LOG_DIR/index/JOB_ID.json`` (stage, arguments, log folder,
run folder) that ``seerlike jobs`` and ``seerlike pipeline status`` read; submitit's own files
(pickles, per-task stdout/stderr) go to ``LOG_DIR/JOB_ID/``. On a cluster ``LOG_DIR`` must
be on a file system that every node sees.

``seerlike submit ingest`` is special: a job array with one task per input chunk
(``sharding.ingest.plan``/``ingest_chunk``) plus a merge job that depends on all of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import submitit
from submitit.core import utils as submitit_utils

from seerlike import config as configlib
from seerlike.config import ConfigError
from seerlike.storage import strip_credentials, write_bytes

from launchers.checkpointable import StageJob

log = logging.getLogger(__name__)

#: Stages `seerlike submit` accepts (each a `seerlike` subcommand).
STAGES = ("train", "ingest", "extract", "cluster", "distill", "eval", "export", "finetune", "selftrain")

#: Stage options that name the stage's output folder, in the order they are looked for.
RUN_DIR_OPTIONS = ("--run-dir", "--out", "--output", "--out-dir")

_MEM_RE = re.compile(r"^\d+(\.\d+)?[KMGT]?B?$", re.IGNORECASE)


@dataclass(kw_only=True)
class SubmitConfig:
    cluster: Literal["auto", "slurm", "local"] = "auto"
    """Where jobs run: slurm (sbatch through submitit), local (processes on this machine), auto = slurm if sbatch is on PATH."""
    nodes: int = 1
    """Nodes per job (the local executor supports 1)."""
    tasks_per_node: int = 1
    """Tasks (ranks) per node; one per GPU on GPU nodes."""
    gpus_per_node: int = 0
    """GPUs per node requested from Slurm (--gpus-per-node); 0 requests none."""
    cpus_per_task: int = 1
    """CPU cores per task (data-loading workers + 1 is a good start)."""
    mem: str = ""
    """Memory per node as Slurm writes it (e.g. 64G, 500000M); empty: the partition's default."""
    partition: str = ""
    """Slurm partition; empty: the cluster's default."""
    account: str = ""
    """Slurm account to charge; empty: the user's default."""
    qos: str = ""
    """Slurm quality of service; empty: the default."""
    time: int = 60
    """Time limit per job run in minutes (a requeued run gets it again)."""
    constraint: str = ""
    """Slurm node feature constraint (e.g. a100|h100); empty: none."""
    exclusive: bool = False
    """Ask for whole nodes (sbatch --exclusive)."""
    max_requeues: int = 3
    """How often a preempted or timed-out job requeues itself before it fails."""
    signal_delay_s: int = 120
    """Seconds before the time limit at which Slurm sends USR2 (time for the checkpoint)."""
    log_dir: str = "jobs"
    """Folder for submitit's files and the job index; must be shared by all nodes on a cluster."""
    job_name: str = ""
    """Slurm job name; empty: seerlike-STAGE."""
    dependency: str = ""
    """Slurm dependency, e.g. afterok:123:124 (the local executor has none)."""
    array_parallelism: int = 64
    """Array tasks running at once (ingest)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the batch script before the tasks start (module load, source env)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables set in every task before the stage starts (NCCL_*, AWS_*, ...)."""
    python: str = ""
    """Command that runs Python in the job (e.g. 'apptainer exec --nv seerlike.sif python'); empty: this interpreter."""

    def __post_init__(self):
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "time", "array_parallelism"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "max_requeues", "signal_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mem and not _MEM_RE.match(self.mem):
            raise ValueError(f"mem={self.mem!r} is not a Slurm memory size (e.g. 64G, 500000M)")
        if self.signal_delay_s >= self.time * 60:
            raise ValueError(f"signal_delay_s={self.signal_delay_s} must be shorter than time={self.time} min")
        if self.cluster == "local" and self.nodes != 1:
            raise ValueError(f"the local executor runs on one node; got nodes={self.nodes} (use --cluster slurm)")
        if self.cluster == "local" and self.dependency:
            raise ValueError("the local executor has no dependencies; run the stages one after the other "
                             "(`seerlike pipeline run` does)")


def resolve_cluster(cfg: SubmitConfig) -> str:
    """``slurm`` or ``local`` for ``cfg.cluster`` (auto: slurm where sbatch exists)."""
    if cfg.cluster != "auto":
        return cfg.cluster
    return "slurm" if shutil.which("sbatch") else "local"


def make_executor(cfg: SubmitConfig, name: str = "seerlike", dependency: str = "") -> submitit.Executor:
    """A submitit executor for ``cfg``; submitit's files go to ``LOG_DIR/JOB_ID/``."""
    folder = Path(cfg.log_dir).absolute() / "%j"
    python = cfg.python or None
    if resolve_cluster(cfg) == "local":
        if dependency:
            raise ConfigError("the local executor has no dependencies")
        ex: submitit.Executor = submitit.LocalExecutor(folder, max_num_timeout=cfg.max_requeues, python=python)
        ex.update_parameters(timeout_min=cfg.time, tasks_per_node=cfg.tasks_per_node, nodes=1,
                             gpus_per_node=cfg.gpus_per_node, signal_delay_s=cfg.signal_delay_s)
        return ex
    ex = submitit.SlurmExecutor(folder, max_num_timeout=cfg.max_requeues, python=python)
    params: dict[str, Any] = dict(
        job_name=cfg.job_name or name, time=cfg.time, nodes=cfg.nodes, ntasks_per_node=cfg.tasks_per_node,
        cpus_per_task=cfg.cpus_per_task, signal_delay_s=cfg.signal_delay_s, array_parallelism=cfg.array_parallelism,
        # a preempted job may be requeued (Slurm's JobRequeue default may say otherwise)
        additional_parameters={"requeue": True},
    )
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cfg, key):
            params[key] = getattr(cfg, key)
    if cfg.mem:  # submitit's own `mem` wants GB as a number; Slurm's spelling passes through as is
        params["additional_parameters"]["mem"] = cfg.mem
    if cfg.exclusive:
        params["exclusive"] = True
    if dependency or cfg.dependency:
        params["dependency"] = dependency or cfg.dependency
    if cfg.setup:
        params["setup"] = list(cfg.setup)
    ex.update_parameters(**params)
    return ex


# ---------------------------------------------------------------- job records


def run_dir_of(argv: list[str]) -> str:
    """The output folder named by a stage's arguments (``--run-dir X`` / ``--out=X`` ...), or ''."""
    for opt in RUN_DIR_OPTIONS:
        for i, a in enumerate(argv):
            if a == opt and i + 1 < len(argv):
                return str(Path(argv[i + 1]).absolute()) if "://" not in argv[i + 1] else argv[i + 1]
            if a.startswith(opt + "="):
                value = a.split("=", 1)[1]
                return str(Path(value).absolute()) if "://" not in value else value
    return ""


def record_job(job: submitit.Job, cfg: SubmitConfig, *, stage: str, argv: list[str], run_dir: str = "",
               extra: dict | None = None) -> dict:
    """Write ``LOG_DIR/index/JOB_ID.json`` for ``seerlike jobs`` and return it."""
    rec = {
        "job_id": job.job_id, "cluster": "local" if isinstance(job, submitit.LocalJob) else "slurm",
        # the index is a record, not the job's input: a URL's user:password is left out of it
        "stage": stage, "argv": [strip_credentials(a) for a in argv], "run_dir": run_dir,
        "log_folder": str(job.paths.folder),
        "log_dir": str(Path(cfg.log_dir).absolute()), "tasks": job.num_tasks, "submitted_at": time.time(),
        **(extra or {}),
    }
    write_bytes(Path(cfg.log_dir) / "index" / f"{job.job_id}.json", (json.dumps(rec, indent=1) + "\n").encode())
    return rec


# ---------------------------------------------------------------- submitting


def validate_stage(target: str, argv: list[str], *, check_inputs: bool = False) -> None:
    """Fail here, not in the queue: parse a seerlike stage's arguments (and build its config).

    Stages whose module has ``build_config(args)`` get their whole config validated; others get
    their command line checked. With ``check_inputs`` (a single `seerlike submit`, whose inputs
    must exist already; a pipeline's later stages read what earlier ones write) the module's
    ``preflight(args)`` also checks that the data, models and files it names exist.
    ``module:function`` targets are only checked to be importable.
    """
    import importlib

    if ":" in target:
        module, _, name = target.partition(":")
        if not callable(getattr(importlib.import_module(module), name, None)):
            raise ConfigError(f"stage {target!r}: {module} has no function {name}")
        return
    from seerlike import cli

    if target not in cli.COMMANDS:
        raise ConfigError(f"unknown stage {target!r}; choose a seerlike command or 'package.module:function'")
    mod = importlib.import_module(cli.COMMANDS[target][0])
    parser = argparse.ArgumentParser(prog=f"seerlike {target}", exit_on_error=False)
    mod.add_arguments(parser)
    try:
        ns = parser.parse_args(argv)
    except argparse.ArgumentError as e:
        raise ConfigError(strip_credentials(f"seerlike {target} {' '.join(argv)}: {e}")) from None
    except SystemExit:  # argparse already printed the usage and the reason
        shown = strip_credentials(" ".join(argv))
        raise ConfigError(f"invalid arguments for seerlike {target} (after --): {shown}") from None
    if _overwrites(argv):
        raise ConfigError(f"seerlike {target}: checkpoint.overwrite=true would run again on every requeue of the job "
                          "and delete its own checkpoints; delete the old run's checkpoints (or choose a new "
                          "--run-dir) first, then submit without the flag")
    check = mod.preflight if check_inputs and hasattr(mod, "preflight") else getattr(mod, "build_config", None)
    if check is not None:
        try:
            check(ns)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"seerlike {target}: {e}") from e


def _overwrites(argv: list[str]) -> bool:
    """Whether a stage's overrides ask for ``checkpoint.overwrite`` (a requeue re-runs its command line)."""
    for item in argv:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "checkpoint.overwrite" and value.strip().lower() in ("true", "1", "yes", "on"):
            return True
    return False


def explain_refusal(stderr: str, cfg: SubmitConfig) -> str:
    """sbatch's refusal of a job in one line, with what to change (the usual causes on a real cluster)."""
    text = " ".join(line.strip() for line in stderr.strip().splitlines() if line.strip()) or "(no message)"
    low = text.lower()
    if "invalid partition" in low:
        hint = "check --partition against `sinfo -s`"
    elif cfg.gpus_per_node and ("gres" in low or "gpu" in low):
        hint = (f"the partition has no nodes with {cfg.gpus_per_node} GPUs (or no GPUs): lower or drop "
                "--gpus-per-node, or pick a GPU partition with --partition")
    elif "node configuration is not available" in low or "more processors than permitted" in low:
        asked = [f"--nodes {cfg.nodes}", f"--tasks-per-node {cfg.tasks_per_node} x --cpus-per-task {cfg.cpus_per_task}"]
        asked += [f"--gpus-per-node {cfg.gpus_per_node}"] * bool(cfg.gpus_per_node) + [f"--mem {cfg.mem}"] * bool(cfg.mem)
        hint = (f"no node offers {', '.join(asked)}: ask for less (a cluster without GPUs takes no "
                "--gpus-per-node), or pick another --partition (`sinfo -o '%P %D %c %m %G'` lists them)")
    elif "partition" in low:
        hint = "check --partition against `sinfo -s`"
    elif "time limit" in low:
        hint = "lower --time to the partition's limit (`sinfo -o '%P %l'`)"
    elif "account" in low or "qos" in low:
        hint = "check --account / --qos (`sacctmgr show assoc user=$USER`)"
    else:
        hint = "see `man sbatch` for the option it names"
    return f"sbatch refused the job: {text}; {hint}"


def _submit(ex: submitit.Executor, cfg: SubmitConfig, fn, *args):
    """``ex.submit`` with sbatch's refusal as a ConfigError (one line, exit 2), not submitit's traceback."""
    try:
        return ex.submit(fn, *args)
    except (submitit_utils.FailedJobError, submitit_utils.FailedSubmissionError) as e:
        raise ConfigError(explain_refusal(str(e), cfg)) from None


def submit_stage(cfg: SubmitConfig, target: str, argv: list[str] | tuple[str, ...] = (), *, dependency: str = "",
                 done_marker: str | None = None, marker_payload: dict | None = None,
                 name: str | None = None, check_inputs: bool = False) -> submitit.Job:
    """Submit ``seerlike TARGET ARGV`` (or ``module:function(argv)``) as one job and record it.

    ``check_inputs``: also check that the stage's inputs exist before queueing (validate_stage).
    """
    argv = list(argv)
    stage_name = name or target.rsplit(":", 1)[-1]
    validate_stage(target, argv, check_inputs=check_inputs)
    ex = make_executor(cfg, name=f"seerlike-{stage_name}", dependency=dependency)
    job_fn = StageJob(target, argv, max_requeues=cfg.max_requeues, env=cfg.env, done_marker=done_marker,
                      marker_payload=marker_payload)
    job = _submit(ex, cfg, job_fn)
    record_job(job, cfg, stage=stage_name, argv=argv, run_dir=run_dir_of(argv), extra={"target": target})
    log.info("submitted %s as job %s (%d tasks, logs %s)", stage_name, job.job_id, job.num_tasks, job.paths.folder)
    return job


def submit_array(cfg: SubmitConfig, fn: Callable[..., Any], args_list: list[tuple], *, name: str,
                 dependency: str = "") -> list[submitit.Job]:
    """``fn(*args)`` for each ``args`` as one Slurm job array (local: one job each); records each."""
    if not args_list:
        raise ConfigError(f"{name}: nothing to submit (empty argument list)")
    ex = make_executor(cfg, name=f"seerlike-{name}", dependency=dependency)
    try:
        with ex.batch():
            jobs = [ex.submit(fn, *args) for args in args_list]
    except (submitit_utils.FailedJobError, submitit_utils.FailedSubmissionError) as e:
        raise ConfigError(explain_refusal(str(e), cfg)) from None
    for job, args in zip(jobs, args_list):
        record_job(job, cfg, stage=name, argv=[repr(a) for a in args])
    log.info("submitted %s as %d array tasks (%s)", name, len(jobs), jobs[0].job_id.split("_")[0])
    return jobs


def afterok(jobs: list[submitit.Job]) -> str:
    """A Slurm dependency on the success of ``jobs`` (array tasks collapse to their array)."""
    ids = sorted({j.job_id.split("_")[0] for j in jobs}, key=int)
    return "afterok:" + ":".join(ids)


def submit_ingest(cfg: SubmitConfig, argv: list[str]) -> tuple[list[submitit.Job], submitit.Job]:
    """Ingest as a job array over the input chunks plus a merge job after all of them.

    ``sharding.ingest.plan`` lists the inputs into chunks once (here, before submitting);
    each array task runs ``ingest_chunk(cfg, k)`` for one chunk not done yet (a rerun after
    a failure submits only the missing ones); once every chunk succeeded the merge runs as
    ``merge_prepare`` (dedup), an array of ``merge_chunks`` (duplicate marking and shard
    rewrites, ``array_parallelism`` tasks) and ``merge_finish`` (manifest, shard index,
    summary), the returned job. The local executor runs the chunks one job at a time, then
    ``merge`` in one job.
    """
    from sharding import cli as ingest_cli
    from sharding import ingest

    parser = argparse.ArgumentParser(prog="seerlike ingest", exit_on_error=False)
    ingest_cli.add_arguments(parser)
    try:
        icfg = ingest_cli.build_config(parser.parse_args(argv))
    except SystemExit:
        shown = strip_credentials(" ".join(argv))
        raise ConfigError(f"invalid arguments for seerlike ingest (after --): {shown}") from None
    plan = ingest.plan(icfg)
    todo = ingest.pending_chunks(icfg)
    log.info("ingest: %d inputs in %d chunks, %d still to do", plan.n_inputs, plan.n_chunks, len(todo))
    jobs: list[submitit.Job] = []
    if resolve_cluster(cfg) == "local":
        for k in todo:
            job = submit_array(cfg, ingest.ingest_chunk, [(icfg, k)], name="ingest")[0]
            job.result()
            jobs.append(job)
        merge = _submit(make_executor(cfg, name="seerlike-ingest-merge"), cfg, ingest.merge, icfg)
    else:
        if todo:
            jobs = submit_array(cfg, ingest.ingest_chunk, [(icfg, k) for k in todo], name="ingest")
        # The merge as dedup -> an array over the chunks (the shard rewrites) -> manifest and summary,
        # so no one job rewrites the corpus's shards (docs/scale.md).
        prepare = _submit(make_executor(cfg, name="seerlike-ingest-dedup", dependency=afterok(jobs) if jobs else ""),
                          cfg, ingest.merge_prepare, icfg)
        tasks = min(plan.n_chunks, cfg.array_parallelism)
        merging = submit_array(cfg, ingest.merge_chunks, [(icfg, t, tasks) for t in range(tasks)], name="ingest-merge-chunks",
                               dependency=afterok([prepare]))
        merge = _submit(make_executor(cfg, name="seerlike-ingest-merge", dependency=afterok(merging)),
                        cfg, ingest.merge_finish, icfg)
    record_job(merge, cfg, stage="ingest-merge", argv=argv, run_dir=icfg.out)
    return jobs, merge


# ---------------------------------------------------------------- command line


def parse_time(text: str) -> int:
    """Minutes from ``MIN``, ``HH:MM:SS``, ``MM:SS`` or ``D-HH[:MM[:SS]]`` (Slurm's spellings)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ConfigError(f"--time {text!r}: expected minutes or [D-]HH:MM:SS")
    days, a, b, c = m.groups()
    if days is None and b is None:
        return int(a)  # plain minutes
    if days is not None:
        h, mi, s = int(a), int(b or 0), int(c or 0)
    elif c is None:
        h, mi, s = 0, int(a), int(b)  # MM:SS
    else:
        h, mi, s = int(a), int(b), int(c)
    return max(1, int(days or 0) * 1440 + h * 60 + mi + (1 if s else 0))


def _doc(key: str) -> str:
    """SubmitConfig's doc of ``key`` as option help, with its default (the option itself defaults to unset)."""
    doc = configlib.field_docs(SubmitConfig)[key].rstrip(".")
    default = getattr(SubmitConfig(), key)
    return doc if default in ("", None) or isinstance(default, bool) else f"{doc} (default {default})"


def add_resource_arguments(p: argparse.ArgumentParser) -> None:
    """The SubmitConfig options shared by `seerlike submit` and `seerlike pipeline run`."""
    p.add_argument("--cluster", choices=("auto", "slurm", "local"), help="where to run (default auto)")
    p.add_argument("--nodes", type=int, help=_doc("nodes"))
    p.add_argument("--tasks-per-node", type=int, help="ranks per node (one per GPU)")
    p.add_argument("--gpus-per-node", type=int, help=_doc("gpus_per_node"))
    p.add_argument("--cpus-per-task", type=int, help=_doc("cpus_per_task"))
    p.add_argument("--mem", help="memory per node, e.g. 64G")
    p.add_argument("--partition", help=_doc("partition"))
    p.add_argument("--account", help=_doc("account"))
    p.add_argument("--qos", help=_doc("qos"))
    p.add_argument("--time", help="time limit: minutes or [D-]HH:MM:SS")
    p.add_argument("--constraint", help=_doc("constraint"))
    p.add_argument("--exclusive", action="store_true", default=None, help=_doc("exclusive"))
    p.add_argument("--max-requeues", type=int, help=_doc("max_requeues"))
    p.add_argument("--signal-delay-s", type=int, help="USR2 this many seconds before the time limit")
    p.add_argument("--log-dir", help="submitit folder + job index (shared on a cluster); default ./jobs "
                   "or $SEERLIKE_JOBS_DIR")
    p.add_argument("--job-name", help=_doc("job_name"))
    p.add_argument("--setup", action="append", help="shell line run before the tasks (repeatable)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE", help="environment variable for the tasks (repeatable)")
    p.add_argument("--python", help="command that runs Python in the job (containers)")


def config_from_args(args: argparse.Namespace, base: SubmitConfig | None = None) -> SubmitConfig:
    """A SubmitConfig from ``base`` (or defaults) and the options given on the command line."""
    d = configlib.to_dict(base or SubmitConfig())
    if base is None and os.environ.get("SEERLIKE_JOBS_DIR"):
        d["log_dir"] = os.environ["SEERLIKE_JOBS_DIR"]
    for key in ("cluster", "nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem", "partition",
                "account", "qos", "constraint", "exclusive", "max_requeues", "signal_delay_s", "log_dir",
                "job_name", "python", "dependency"):
        value = getattr(args, key, None)
        if value is not None:
            d[key] = value
    if getattr(args, "time", None) is not None:
        d["time"] = parse_time(str(args.time))
    if getattr(args, "setup", None):
        d["setup"] = list(d.get("setup") or []) + args.setup
    for item in getattr(args, "env", None) or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
        d.setdefault("env", {})[key] = value
    try:
        return configlib.from_dict(SubmitConfig, d)
    except ValueError as e:
        raise ConfigError(f"seerlike submit: {e}") from e


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=STAGES, help="the seerlike command to run in the job")
    add_resource_arguments(p)
    p.add_argument("--dependency", help="Slurm dependency, e.g. afterok:123")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its final state")
    p.epilog = "Everything after -- is passed to the stage: seerlike submit train --nodes 2 -- --recipe ... --run-dir ..."
    split_stage_args(p)


def split_stage_args(p: argparse.ArgumentParser) -> None:
    """Make ``p.parse_args`` put everything after the first ``--`` into ``args.stage_args``.

    argparse cannot do this itself: a trailing ``nargs='*'`` positional is matched (empty)
    as soon as the stage name is seen, and the arguments after ``--`` are then rejected.
    """
    parse = p.parse_args

    def parse_args(args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        rest: list[str] = []
        if "--" in args:
            i = args.index("--")
            args, rest = args[:i], args[i + 1:]
        ns = parse(args, namespace)
        ns.stage_args = rest
        return ns

    p.parse_args = parse_args  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> int:
    argv = list(args.stage_args)
    cfg = config_from_args(args)
    if args.stage == "ingest":
        jobs, merge = submit_ingest(cfg, argv)
        print(f"array job id: {jobs[0].job_id.split('_')[0] if jobs else '-'} ({len(jobs)} chunk task(s))")
        print(f"job id: {merge.job_id}  (merge, after the array)")
        print(f"log folder: {merge.paths.folder}")
        print(f"run folder: {run_dir_of(argv) or '-'}")
        final = [merge]
    else:
        job = submit_stage(cfg, args.stage, argv, check_inputs=True)
        print(f"job id: {job.job_id}")
        print(f"log folder: {job.paths.folder}")
        print(f"run folder: {run_dir_of(argv) or '-'}")
        final = [job]
    if not args.wait:
        return 0
    from launchers.jobs import wait_state

    state = wait_state(final[0])
    print(f"state: {state}")
    if state != "COMPLETED":
        from launchers.jobs import failure_cause

        cause = failure_cause(final[0])
        if cause:
            print(f"cause: {cause}")
    return 0 if state == "COMPLETED" else 1
