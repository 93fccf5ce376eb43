"""`seerlike pipeline run|status`: multi-stage pipelines as chains of dependent jobs.

A pipeline is a list of stages, each a ``seerlike`` command (or ``module:function``) with
arguments; every stage writes into ``DIR/<stage name>`` and reads what earlier stages
wrote there. In the arguments, ``{out}`` is the stage's own folder, ``{dir}`` the pipeline
folder, ``{NAME}`` the folder of stage NAME and ``{VAR}`` a variable from ``vars``::

    name: clusterfit
    dir: runs/cf                      # or --dir
    vars: {data: /data/shards}
    submit: {time: 240, tasks_per_node: 8, gpus_per_node: 8}   # SubmitConfig for every stage
    stages:
      - name: pretrain
        command: train
        args: [--recipe, swav_rn50, --data, "{data}", --run-dir, "{out}"]
      - name: extract
        command: extract
        args: [--checkpoint, "{pretrain}", --data, "{data}", --layer, res5, --out, "{out}"]
        submit: {time: 60}           # per-stage overrides

On Slurm all stages are submitted at once, each with ``--dependency=afterok:<previous>``, so
a failed stage cancels the rest (``kill_invalid_depend``) instead of feeding them garbage.
With the local executor the stages run one after the other. Each stage that succeeds
writes ``DIR/.pipeline/NAME.done`` (its command and arguments); a rerun skips every stage
whose marker matches and reruns the first changed or unfinished stage and all after it.
``DIR/.pipeline/jobs.json`` remembers the submitted jobs for ``seerlike pipeline status``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from seerlike import config as configlib
from seerlike.config import ConfigError
from seerlike.storage import write_bytes

from launchers import jobs as jobslib
from launchers.submit import SubmitConfig, add_resource_arguments, config_from_args, resolve_cluster, submit_stage

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


@dataclass(kw_only=True)
class Stage:
    name: str
    """Stage name: its output folder is DIR/NAME and later stages refer to it as {NAME}."""
    command: str
    """A seerlike command (train, extract, cluster, distill, eval, export) or package.module:function."""
    args: list[str] = field(default_factory=list)
    """The command's arguments; {out}, {dir}, {STAGE} and {VAR} are filled in."""
    submit: dict[str, Any] = field(default_factory=dict)
    """SubmitConfig fields overriding the pipeline's for this stage (time, tasks_per_node, ...)."""


@dataclass(kw_only=True)
class Pipeline:
    name: str = "pipeline"
    """Name shown in job names and status."""
    dir: str = ""
    """Folder holding every stage's output and the pipeline's markers."""
    vars: dict[str, str] = field(default_factory=dict)
    """Values for {VAR} placeholders in stage arguments (data paths, sizes)."""
    submit: dict[str, Any] = field(default_factory=dict)
    """SubmitConfig fields for every stage."""
    stages: list[Stage] = field(default_factory=list)
    """The stages, in order; each depends on the one before."""

    def __post_init__(self):
        names = [s.name for s in self.stages]
        if not names:
            raise ValueError("a pipeline needs at least one stage")
        for n in names:
            if not _NAME_RE.match(n):
                raise ValueError(f"stage name {n!r}: use letters, digits, '_' and '-', starting with a letter")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"stage names must be unique; repeated: {sorted(dup)}")
        clash = set(names) & (set(self.vars) | {"out", "dir"})
        if clash:
            raise ValueError(f"{sorted(clash)} are both stage names and variables/reserved names")


# ---------------------------------------------------------------- spec -> concrete stages


def load_pipeline(path: str | Path) -> Pipeline:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    return pipeline_from_dict(data, source=str(path))


def pipeline_from_dict(data: dict, source: str = "pipeline") -> Pipeline:
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        raise ConfigError(f"{source}: expected a mapping with a 'stages' list")
    try:
        stages = [configlib.from_dict(Stage, s) for s in data["stages"]]
        return Pipeline(**{**{k: v for k, v in data.items() if k != "stages"}, "stages": stages})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from e


def _fill(text: str, values: dict[str, str], where: str) -> str:
    names = [f for _, f, _, _ in string.Formatter().parse(text) if f]
    missing = [n for n in names if n not in values]
    if missing:
        raise ConfigError(f"{where}: unknown placeholder(s) {missing}; known: {sorted(values)}")
    return text.format(**values)


def resolve(p: Pipeline) -> list[tuple[Stage, list[str], str]]:
    """Each stage with its arguments filled in and its output folder."""
    if not p.dir:
        raise ConfigError("the pipeline has no dir: set `dir:` in the file or pass --dir")
    root = Path(p.dir).absolute()
    values = {k: str(v) for k, v in p.vars.items()}
    values["dir"] = str(root)
    values.update({s.name: str(root / s.name) for s in p.stages})
    out = []
    for s in p.stages:
        v = dict(values, out=str(root / s.name))
        out.append((s, [_fill(str(a), v, f"stage {s.name}") for a in s.args], str(root / s.name)))
    return out


def fingerprint(command: str, argv: list[str]) -> str:
    return hashlib.sha256(json.dumps([command, argv]).encode()).hexdigest()[:16]


def _meta(p: Pipeline) -> Path:
    return Path(p.dir).absolute() / ".pipeline"


def marker_path(p: Pipeline, stage: str) -> Path:
    return _meta(p) / f"{stage}.done"


def is_done(p: Pipeline, stage: Stage, argv: list[str]) -> bool:
    m = marker_path(p, stage.name)
    if not m.is_file():
        return False
    try:
        return json.loads(m.read_text()).get("fingerprint") == fingerprint(stage.command, argv)
    except (OSError, ValueError):
        return False


def stage_config(p: Pipeline, stage: Stage, base: SubmitConfig) -> SubmitConfig:
    d = configlib.to_dict(base)
    d.update(p.submit)
    d.update(stage.submit)
    d.setdefault("job_name", "")
    if not d["job_name"]:
        d["job_name"] = f"{p.name}-{stage.name}"
    try:
        return configlib.from_dict(SubmitConfig, d)
    except ValueError as e:
        raise ConfigError(f"stage {stage.name}: {e}") from e


# ---------------------------------------------------------------- running


def run_pipeline(p: Pipeline, base: SubmitConfig | None = None, *, wait: bool = False) -> list[dict]:
    """Submit every stage that is not done yet; returns one row per stage (see ``status``).

    Slurm: the stages are chained with ``afterok`` and this returns right away (or after the
    last stage with ``wait``). Local executor: the stages run one after the other here; the
    first failure stops the pipeline and is raised.
    """
    base = base or SubmitConfig()
    stages = resolve(p)
    meta = _meta(p)
    meta.mkdir(parents=True, exist_ok=True)
    write_bytes(meta / "pipeline.yaml", yaml.safe_dump(configlib.to_dict(p), sort_keys=False).encode())
    record = _read_jobs(p)
    previous: str = ""  # job id the next stage must wait for
    rerun = False
    rows = []
    for stage, argv, out in stages:
        cfg = stage_config(p, stage, base)
        fp = fingerprint(stage.command, argv)
        if not rerun and is_done(p, stage, argv):
            log.info("stage %s: complete (%s), skipped", stage.name, marker_path(p, stage.name))
            rows.append({"stage": stage.name, "job_id": "", "state": "DONE", "out": out})
            continue
        rerun = True  # everything after a rerun stage sees new inputs
        marker_path(p, stage.name).unlink(missing_ok=True)
        old = record.get(stage.name, {})
        if old.get("fingerprint") == fp and old.get("cluster") == "slurm" and resolve_cluster(cfg) == "slurm" \
                and jobslib.state(jobslib.job_of(old)) in ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD"):
            log.info("stage %s: job %s from an earlier run is still queued/running; chaining on it",
                     stage.name, old["job_id"])
            previous = old["job_id"]
            rows.append({"stage": stage.name, "job_id": previous, "state": "QUEUED", "out": out})
            continue
        dependency = f"afterok:{previous}" if previous and resolve_cluster(cfg) == "slurm" else ""
        job = submit_stage(cfg, stage.command, argv, dependency=dependency, name=stage.name,
                           done_marker=str(marker_path(p, stage.name)),
                           marker_payload={"fingerprint": fp, "pipeline": p.name, "stage": stage.name})
        record[stage.name] = {"job_id": job.job_id, "fingerprint": fp, "cluster": resolve_cluster(cfg),
                              "log_dir": str(Path(cfg.log_dir).absolute()), "tasks": job.num_tasks}
        _write_jobs(p, record)
        log.info("stage %s: job %s%s", stage.name, job.job_id, f" after {previous}" if dependency else "")
        if resolve_cluster(cfg) == "local":
            final = jobslib.wait_state(job, poll_s=0.5)
            if final != "COMPLETED":
                cause = jobslib.failure_cause(job)
                raise RuntimeError(f"pipeline {p.name}: stage {stage.name} (job {job.job_id}) ended {final}"
                                   f"{f': {cause}' if cause else ''}; "
                                   f"see `seerlike jobs tail {job.job_id} --log-dir {cfg.log_dir}`")
            rows.append({"stage": stage.name, "job_id": job.job_id, "state": final, "out": out})
        else:
            rows.append({"stage": stage.name, "job_id": job.job_id, "state": "SUBMITTED", "out": out})
        previous = job.job_id
    if wait and previous:
        last = record[stages[-1][0].name]
        jobslib.wait_state(jobslib.job_of(last), poll_s=1.0)
        rows = status(p)
    return rows


def _read_jobs(p: Pipeline) -> dict:
    path = _meta(p) / "jobs.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_jobs(p: Pipeline, record: dict) -> None:
    write_bytes(_meta(p) / "jobs.json", (json.dumps(record, indent=1) + "\n").encode())


def status(p: Pipeline) -> list[dict]:
    """One row per stage: DONE (marker), the job's state, or NOT SUBMITTED."""
    record = _read_jobs(p)
    rows = []
    for stage, argv, out in resolve(p):
        rec = record.get(stage.name)
        if is_done(p, stage, argv):
            st = "DONE"
        elif rec is None:
            st = "NOT SUBMITTED"
        else:
            st = jobslib.state(jobslib.job_of({**rec, "job_id": rec["job_id"]}))
        rows.append({"stage": stage.name, "job_id": rec["job_id"] if rec else "", "state": st, "out": out})
    return rows


# ---------------------------------------------------------------- recipes


def clusterfit_tiny(data: str, dir: str, *, pretrain_steps: int = 200, k: int = 10, retrain_steps: int = 200,
                    distill_steps: int = 200, student: str = "resnet10_cifar") -> Pipeline:
    """SwAV pretrain -> res5 features -> k-means -> ClusterFit retrain -> distill -> export, CPU-sized."""
    return pipeline_from_dict({
        "name": "clusterfit-tiny", "dir": dir, "vars": {"data": data, "k": str(k)},
        "stages": [
            {"name": "pretrain", "command": "train",
             "args": ["--recipe", "tiny_swav", "--data", "{data}", "--run-dir", "{out}", "--max-steps", str(pretrain_steps)]},
            {"name": "extract", "command": "extract",
             "args": ["--checkpoint", "{pretrain}", "--data", "{data}", "--layer", "res5", "--image-size", "32",
                      "--out", "{out}"]},
            {"name": "cluster", "command": "cluster", "args": ["{extract}", "--k", "{k}", "--out", "{out}"]},
            {"name": "retrain", "command": "train",
             "args": ["--recipe", "clusterfit_tiny", "--data", "{data}", "--run-dir", "{out}", "--max-steps",
                      str(retrain_steps), "data.labels={cluster}", "method.num_classes={k}"]},
            {"name": "distill", "command": "distill",
             "args": ["--teacher", "{retrain}", "--student", student, "--data", "{data}", "--run-dir", "{out}",
                      "--max-steps", str(distill_steps)]},
            {"name": "export", "command": "export",
             "args": ["--checkpoint", "{distill}", "--format", "torchvision,safetensors", "--out", "{out}"]},
        ],
    }, source="recipe clusterfit_tiny")


def semisup_tiny(data: str, dir: str, *, pretrain_steps: int = 200, finetune_steps: int = 200,
                 student_steps: int = 200, fixmatch_steps: int = 200) -> Pipeline:
    """SwAV pretrain on {data} -> fine-tune on {labeled} -> Noisy Student and FixMatch on {labeled} + {unlabeled}.

    ``--var labeled=CSV`` (a path,label CSV or class folders) is required; ``--var unlabeled=...``
    defaults to the pretraining images. Each semi-supervised stage starts from the pretrained trunk.
    """
    return pipeline_from_dict({
        "name": "semisup-tiny", "dir": dir, "vars": {"data": data, "labeled": "", "unlabeled": data},
        "stages": [
            {"name": "pretrain", "command": "train",
             "args": ["--recipe", "tiny_swav", "--data", "{data}", "--run-dir", "{out}", "--max-steps",
                      str(pretrain_steps)]},
            {"name": "finetune", "command": "finetune",
             "args": ["--init", "{pretrain}", "--data", "{labeled}", "--run-dir", "{out}", "--max-steps",
                      str(finetune_steps)]},
            {"name": "noisy_student", "command": "selftrain",
             "args": ["--method", "noisy_student", "--teacher", "{finetune}", "--init", "{pretrain}", "--labeled",
                      "{labeled}", "--unlabeled", "{unlabeled}", "--run-dir", "{out}", "--max-steps",
                      str(student_steps)]},
            {"name": "fixmatch", "command": "selftrain",
             "args": ["--method", "fixmatch", "--init", "{pretrain}", "--labeled", "{labeled}", "--unlabeled",
                      "{unlabeled}", "--run-dir", "{out}", "--max-steps", str(fixmatch_steps)]},
        ],
    }, source="recipe semisup_tiny")


PIPELINES = {"clusterfit_tiny": clusterfit_tiny, "semisup_tiny": semisup_tiny}
"""Pipeline recipes: functions (data, dir, **options) -> Pipeline."""


# ---------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("run", "status"), help="run: submit the stages not yet done; status: each stage's state")
    p.add_argument("pipeline", nargs="?", help="PIPELINE.yaml (status also accepts --dir alone)")
    p.add_argument("--recipe", choices=sorted(PIPELINES), help="a built-in pipeline instead of a file")
    p.add_argument("--data", help="recipe: the training images")
    p.add_argument("--dir", help="pipeline folder (overrides the file's dir)")
    p.add_argument("--var", action="append", default=[], metavar="KEY=VALUE", help="set a pipeline variable")
    p.add_argument("--wait", action="store_true", help="run: wait for the last stage (Slurm)")
    add_resource_arguments(p)


def _pipeline_from_args(args: argparse.Namespace) -> Pipeline:
    if args.recipe:
        if not (args.data and args.dir):
            raise ConfigError(f"--recipe {args.recipe} needs --data and --dir")
        p = PIPELINES[args.recipe](args.data, args.dir)
    elif args.pipeline:
        p = load_pipeline(args.pipeline)
    elif args.action == "status" and args.dir and (Path(args.dir) / ".pipeline" / "pipeline.yaml").is_file():
        p = load_pipeline(Path(args.dir) / ".pipeline" / "pipeline.yaml")
    else:
        raise ConfigError("give PIPELINE.yaml or --recipe NAME (status: or --dir of a pipeline run)")
    if args.dir:
        p.dir = args.dir
    for item in args.var:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--var {item!r}: expected KEY=VALUE")
        p.vars[key] = value
    return p


def _print(rows: list[dict]) -> None:
    print(f"{'STAGE':12}  {'JOB':>12}  {'STATE':14}  OUTPUT")
    for r in rows:
        print(f"{r['stage']:12}  {r['job_id'] or '-':>12}  {r['state']:14}  {r['out']}")


def run(args: argparse.Namespace) -> int:
    p = _pipeline_from_args(args)
    if args.action == "status":
        _print(status(p))
        return 0
    rows = run_pipeline(p, config_from_args(args), wait=args.wait)
    _print(rows)
    return 0 if all(r["state"] in ("DONE", "COMPLETED", "SUBMITTED", "QUEUED") for r in rows) else 1
