"""`seerlike quickstart`: the whole chain on real images, on one machine, as one pipeline.

ingest (images -> shards) -> pretrain (SwAV or BYOL, 2 ranks) -> extract (res5) -> k-means ->
ClusterFit retrain -> distill into a half-width student -> export -> kNN evaluation of every
model and of the same architectures at random init -> results.json, plots, report.md.

The chain is a :class:`launchers.pipeline.Pipeline` run by ``run_pipeline``: each stage is a
local-executor job (``--cluster local``, the default) or a Slurm job chained with
``afterok`` (``--cluster slurm``); a rerun with the same arguments skips every stage whose
completion marker matches. While the stages run, a watcher thread prints which stage runs,
the elapsed time and the stage's own log lines (from the job's log files).

Every training stage runs the kNN monitor on the eval split (``monitor_args``); the report plots
its readings against the stage's wall minutes and tables each stage's planned against its
actual seconds (``stage_timing``, from the stage's timing.json and calibration row).

The default budget fits 15 minutes on 2 CPU cores: each training stage gets a share of the
time (``SHARES``) and sets its own step count from its first timed steps on the actual data and
model (``loop.time_budget_s``); ``--minutes`` scales them and ``--pretrain-steps`` /
``--clusterfit-steps`` / ``--distill-steps`` set step counts outright.

The images set the resolution: before anything runs, ``seerlike.recipes.fit_data`` reads the
images' sizes (a sample of headers) and, from each stage's seconds, chooses the working
resolution the ingest resizes to (and kNN, k-means and export use), the views and the batch
of every training stage (docs/fit_data.md). The choice is printed, written to
RUN_DIR/fit_data.json and into each stage's config.yaml, and explained in the report;
``--no-fit-data`` keeps the tiny recipes' CIFAR settings whatever the images.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import seerlike
from seerlike import storage
from seerlike.config import ConfigError

log = logging.getLogger(__name__)

#: ../shared/data beside the repository root (where the real CIFAR-dev images live).
SHARED_DATA = Path(seerlike.__file__).resolve().parents[1].parent / "shared" / "data"
#: Run from a source checkout (pyproject.toml beside the package), not from an installed wheel:
#: only a checkout has the shared/ folder beside it.
SOURCE_CHECKOUT = (Path(seerlike.__file__).resolve().parents[1] / "pyproject.toml").is_file()

ARCH = "resnet10_cifar"
"""Backbone pretrained and retrained (docs/benchmarks.md, "Learning quality": what learns in 15 CPU-minutes)."""
STUDENT = "resnet10_cifar_w16"
"""Distillation student: the same net at half width (a quarter of the parameters)."""
IMAGE_SIZE = 32
"""Evaluation and k-means resolution with ``--no-fit-data``: whole CIFAR images (views: recipes.tiny.TRAIN_SIZE)."""
K = 200
"""k-means clusters = ClusterFit classes (the clusterfit_tiny recipe's sweep: k 200 beat 50 and 100)."""

#: Wall seconds of everything that is not a training step or a kNN monitor reading: process start-ups,
#: ingest, extract, k-means, five kNN evaluations over 6,000 images, export, report (~150 CPU-s of a
#: 4-minute run).
OVERHEAD_S = 150.0
#: The kNN monitor's planned seconds per second of a stage's steps, on top of them: ``eval.max_fraction``'s
#: default, the share the monitor holds (it sizes its split from the stage's seconds; docs/engine.md,
#: "Watching it learn"). The engine pauses its step budget while the monitor reads, so the plan adds it.
MONITOR_SHARE = 0.05
#: How the training time left after the overhead is shared: at the default 15 minutes,
#: pretraining gets 450 s with its monitor (7.5 minutes x 2 cores = the benchmark's 15 CPU-minutes;
#: 429 s of steps), ClusterFit and distillation 150 s each, which is what each needs to match the
#: model it starts from.
SHARES = {"pretrain": 0.6, "clusterfit": 0.2, "distill": 0.2}
#: Warmup steps of each training stage at full budgets (its length is only known once its first steps are timed).
WARMUP = {"pretrain": 50, "clusterfit": 25, "distill": 25}
#: A time-budgeted stage warms up over at most this share of the steps its seconds are predicted to buy
#: (``fit_data.StepCost``), never over fewer than its calibration steps: the engine runs at least the
#: warmup whatever the budget (docs/engine.md, "A run that fits a time budget"), so a fixed 50 steps
#: overran every stage shorter than 50 steps.
WARMUP_SHARE = 0.05
#: How many times slower than the step-cost model (2 idle cores) a machine may be while the shortest
#: stage still holds its plan: ``--minutes`` is refused unless every stage's seconds are predicted to
#: buy this many times its shortest possible run (its calibration steps + 1).
SLOWDOWN_HELD = 4.0
#: A stage whose steps and monitor end within this share of their planned seconds held its plan
#: (when the machine runs the stage at the speed of its first, timed steps: docs/fit_data.md).
PLAN_TOLERANCE = 0.10
#: RUN_DIR file holding fit_data's choice (or {"rule": "off"}), read by the report.
FIT_JSON = "fit_data.json"
#: Upper bound of a time-budgeted stage's steps (the budget ends it far earlier on 2 cores).
MAX_STEPS = 1_000_000


@dataclass(kw_only=True)
class Budget:
    """Seconds of training per stage (each stage times its first steps and sets its own length:
    ``loop.time_budget_s``), or step counts that replace them; and the k of k-means."""

    pretrain_s: float
    """Seconds of steps of the pretraining stage (its kNN monitor comes on top: ``monitor_share``)."""
    clusterfit_s: float
    """Seconds of steps of ClusterFit."""
    distill_s: float
    """Seconds of steps of distillation."""
    pretrain_steps: int | None = None
    """Explicit pretraining steps (instead of its seconds)."""
    clusterfit_steps: int | None = None
    """Explicit ClusterFit steps."""
    distill_steps: int | None = None
    """Explicit distillation steps."""
    k: int = K
    """k-means clusters = ClusterFit classes."""
    monitor_share: float = MONITOR_SHARE
    """The kNN monitor's planned seconds per second of steps, on top of them (every stage runs it)."""
    step_s: dict[str, float] = field(default_factory=dict)
    """Predicted seconds per step of each stage (``fit_data.StepCost``, 2 idle cores): sizes the warmups."""
    calibrate_steps: int = 12
    """The stages' ``loop.calibrate_steps``: the warmup never ends before them."""
    clock: str = "wall"
    """What the stages' seconds count (``loop.budget_clock``): wall seconds, or each rank's CPU seconds."""

    def __post_init__(self):
        for name in ("pretrain", "clusterfit", "distill"):
            steps = getattr(self, f"{name}_steps")
            if steps is not None and steps < 1:
                raise ValueError(f"{name}: steps must be >= 1, got {steps}")
            if steps is None and getattr(self, f"{name}_s") <= 0:
                raise ValueError(f"{name}: seconds must be > 0, got {getattr(self, f'{name}_s')}")
        if self.k < 2:
            raise ValueError(f"k must be >= 2, got {self.k}")

    def planned_s(self, stage: str) -> float | None:
        """The stage's planned seconds: its steps and its monitor (None when its steps were given)."""
        if getattr(self, f"{stage}_steps") is not None:
            return None
        return getattr(self, f"{stage}_s") * (1.0 + self.monitor_share)

    def predicted_steps(self, stage: str) -> int | None:
        """Steps the stage's seconds buy by the step-cost model (None without a prediction)."""
        step_s = self.step_s.get(stage)
        return int(getattr(self, f"{stage}_s") / step_s) if step_s else None

    def warmup_steps(self, stage: str) -> int:
        """``WARMUP`` of the stage, cut to ``WARMUP_SHARE`` of its predicted steps, never below the calibration."""
        predicted = self.predicted_steps(stage)
        if predicted is None:
            return WARMUP[stage]
        return min(WARMUP[stage], max(self.calibrate_steps, int(WARMUP_SHARE * predicted)))

    def train_args(self, stage: str, seed: int, *extra: str) -> list[str]:
        """The stage's --max-steps / time budget and key=value overrides (after every option)."""
        steps = getattr(self, f"{stage}_steps")
        if steps is not None:
            length = ["--max-steps", str(steps), f"optim.warmup_steps={max(1, steps // 20)}"]
        else:
            length = ["--max-steps", str(MAX_STEPS), f"loop.time_budget_s={getattr(self, f'{stage}_s'):.0f}",
                      f"optim.warmup_steps={self.warmup_steps(stage)}"]
            if self.clock != "wall":
                length.append(f"loop.budget_clock={self.clock}")
        # checkpoints a few times per run (resume after a kill) instead of the recipes' every 10 steps
        every = max(50, steps // 4) if steps is not None else 250
        log_every = max(1, min(20, steps // 10)) if steps is not None else 20
        return [*length, *extra, f"loop.seed={seed}", f"checkpoint.every_steps={every}", "checkpoint.keep_last=1",
                "loop.tensorboard=false", f"loop.log_every={log_every}"]


def stage_recipes(method: str) -> dict:
    """Each training stage's recipe, as the pipeline runs it before fitting (the student for distillation)."""
    from seerlike import recipes

    distill = recipes.get("distill_tiny")
    return {"pretrain": recipes.get(f"tiny_{method}"), "clusterfit": recipes.get("clusterfit_tiny"),
            "distill": replace(distill, model=replace(distill.model, name=STUDENT))}


def stage_step_costs(method: str) -> tuple[dict[str, float], int]:
    """Predicted seconds per step of each stage at its recipe's views and batch, and the calibration steps.

    The recipes' own views are the cheapest any budget gets (``fit_data`` grows them only where the
    budget buys over 1,250 steps, where the warmup is ``WARMUP`` anyway), so the prediction bounds
    the steps of short stages from above.
    """
    from seerlike.recipes.fit_data import StepCost

    cost, cfgs = StepCost(), stage_recipes(method)
    step_s = {stage: cost.step_s(cfg, [v.size for v in cfg.data.augment.views], cfg.data.batch_size)
              for stage, cfg in cfgs.items()}
    return step_s, max(cfg.loop.calibrate_steps for cfg in cfgs.values())


def minimum_minutes(step_s: dict[str, float], calibrate_steps: int, stages=tuple(SHARES)) -> float:
    """The shortest ``--minutes`` (to 0.1) at which each of ``stages`` is predicted to buy ``SLOWDOWN_HELD`` x
    its shortest run (calibration steps + 1), its share of the training time after ``OVERHEAD_S``."""
    floor_steps = SLOWDOWN_HELD * (calibrate_steps + 1)
    steps_s = max((floor_steps * step_s[stage] / SHARES[stage] for stage in stages), default=0.0)
    return math.ceil((OVERHEAD_S + steps_s * (1.0 + MONITOR_SHARE)) / 6.0 - 1e-9) / 10.0


def budget_for(minutes: float, *, method: str = "swav", pretrain_seconds: float | None = None,
               followup_seconds: float | None = None, pretrain_steps: int | None = None,
               clusterfit_steps: int | None = None, distill_steps: int | None = None, k: int = K,
               clock: str = "wall") -> Budget:
    """Seconds of steps that, with each stage's kNN monitor and ``OVERHEAD_S``, fill ``minutes`` of wall time on
    2 cores; explicit seconds or step counts win. Minutes too short for a stage to hold its plan are refused."""
    if minutes <= 0:
        raise ConfigError(f"--minutes must be > 0, got {minutes}")
    step_s, calibrate = stage_step_costs(method)
    explicit = {"pretrain": pretrain_steps is not None or pretrain_seconds is not None,
                "clusterfit": clusterfit_steps is not None or followup_seconds is not None,
                "distill": distill_steps is not None or followup_seconds is not None}
    from_minutes = [stage for stage in SHARES if not explicit[stage]]
    least = minimum_minutes(step_s, calibrate, from_minutes)
    if from_minutes and minutes < least:
        raise ConfigError(
            f"--minutes {minutes:g} is too short for the quickstart to hold its plan: give --minutes {least:g} or "
            f"more. {OVERHEAD_S:.0f} s go to start-ups, ingest, extract, k-means and the kNN evaluations; the rest, "
            f"less the kNN monitor's {MONITOR_SHARE:.0%}, is shared {', '.join(f'{s} {v:.0%}' for s, v in SHARES.items())}, "
            f"and each stage's seconds must buy {SLOWDOWN_HELD * (calibrate + 1):.0f} steps on 2 idle cores "
            f"({calibrate + 1} timed steps at least, on a machine up to {SLOWDOWN_HELD:g}x slower); "
            "or set the stages' length with --pretrain-steps / --clusterfit-steps / --distill-steps")
    train_s = max(minutes * 60.0 - OVERHEAD_S, 0.0) / (1.0 + MONITOR_SHARE)
    seconds = {stage: train_s * share for stage, share in SHARES.items()}
    if pretrain_seconds is not None:
        seconds["pretrain"] = pretrain_seconds
    if followup_seconds is not None:
        seconds["clusterfit"] = seconds["distill"] = followup_seconds
    try:
        budget = Budget(pretrain_s=seconds["pretrain"], clusterfit_s=seconds["clusterfit"],
                        distill_s=seconds["distill"], pretrain_steps=pretrain_steps,
                        clusterfit_steps=clusterfit_steps, distill_steps=distill_steps, k=k,
                        step_s={stage: round(s, 4) for stage, s in step_s.items()}, calibrate_steps=calibrate,
                        clock=clock)
    except ValueError as e:
        raise ConfigError(f"seerlike quickstart: {e}") from None
    for stage in SHARES:
        predicted = budget.predicted_steps(stage)
        if getattr(budget, f"{stage}_steps") is None and predicted < calibrate + 1:
            log.warning("%s: %.0f s buy ~%d steps at the predicted %.3f s/step; the stage runs at least %d "
                        "(its timed calibration steps) and overruns its seconds", stage, seconds[stage], predicted,
                        step_s[stage], calibrate + 1)
    return budget


@dataclass(kw_only=True)
class DataFit:
    """The data-dependent settings of the pipeline: ``fit_data``'s choice per stage, or (the defaults) the
    tiny recipes' own CIFAR settings."""

    resolution: int = IMAGE_SIZE
    """Whole-image side of kNN, k-means features and the export."""
    ingest: tuple[str, ...] = ("shard_max_samples=200",)
    """Ingest overrides (shard size; the shorter side the images are resized to)."""
    train: dict[str, list[str]] = field(default_factory=dict)
    """Per training stage, the overrides of its views, batch and evaluation size."""
    summary: dict = field(default_factory=dict)
    """What was chosen and why (RUN_DIR/fit_data.json, the report)."""


def fit_stages(images: str, budget: Budget, method: str, nproc: int) -> DataFit:
    """``fit_data``'s choice for every training stage: pretraining sets the working resolution (it has the
    largest budget); ClusterFit and distillation size their views from their own seconds, on images at it."""
    from seerlike.recipes import fit_data

    stats = fit_data.data_stats(images)
    cfgs = {stage: (cfg, getattr(budget, f"{stage}_s")) for stage, cfg in stage_recipes(method).items()}
    fits, cap = {}, None
    for stage, (cfg, seconds) in cfgs.items():
        fits[stage] = fit_data.choose(stats, cfg, budget_s=seconds, ranks=nproc, max_resolution=cap)
        cap = cap or fits[stage].resolution
    pre = fits["pretrain"]
    return DataFit(
        resolution=pre.resolution,
        ingest=(f"shard_max_samples={pre.shard_samples}", f"resize_short_side={pre.resolution}"),
        train={stage: fit_data.overrides(f, cfgs[stage][0]) for stage, f in fits.items()},
        summary={"rule": "seerlike.recipes.fit_data (docs/fit_data.md)", "data": stats.describe(),
                 "resolution": pre.resolution, "stages": {stage: f.to_json() for stage, f in fits.items()}})


def fit_lines(fit: DataFit) -> list[str]:
    """The choice in words: one line for the data, one per stage with its reasons."""
    if not fit.summary:
        from seerlike.recipes.tiny import TRAIN_SIZE

        return [f"fit-data off: the tiny recipes' CIFAR settings (views {TRAIN_SIZE} px, kNN at {fit.resolution} px)"]
    lines = [f"data: {fit.summary['data']}",
             f"working resolution {fit.resolution} px (ingest, kNN, k-means, export), by {fit.summary['rule']}"]
    for stage, f in fit.summary["stages"].items():
        lines.append(f"{stage}: views {'+'.join(str(v) for v in f['view_sizes'])} px, batch {f['batch_size']}/rank, "
                     f"~{f['steps']} steps planned: " + "; ".join(f["reasons"][1:]))
    return lines


def fit_report(run_dir: Path) -> str:
    """The report's section on the resolution and views: which rule chose them and why."""
    path = run_dir / FIT_JSON
    fit = json.loads(path.read_text()) if path.is_file() else {"rule": "off"}
    if fit.get("rule") == "off":
        from seerlike.recipes.tiny import TRAIN_SIZE

        return (f"## Resolution and views\n\nFitting to the data was off (`--no-fit-data`): the tiny recipes' CIFAR "
                f"settings, {TRAIN_SIZE} px views, kNN / k-means / export on whole images at {IMAGE_SIZE} px.\n")
    rows = "\n".join(f"| {stage} | {' + '.join(str(v) for v in f['view_sizes'])} | {f['batch_size']} | {f['steps']} "
                     f"| {'; '.join(f['reasons'][1:])} |" for stage, f in fit["stages"].items())
    return f"""## Resolution and views

Chosen by {fit['rule']} from the images and each stage's seconds. Data: {fit['data']}. Working
resolution **{fit['resolution']} px**: the ingest resized the images' shorter side to it, and the kNN,
k-means features and export use whole images at it.

| stage | view sizes (px) | batch per rank | steps planned | why |
|---|---|---|---|---|
{rows}
"""


# ---------------------------------------------------------------- inputs


def default_images() -> Path:
    return SHARED_DATA / "cifar10-dev" / "train"


def _need(path: Path, what: str, flag: str) -> str:
    if not path.exists():
        if str(path).startswith(str(SHARED_DATA)) and not SOURCE_CHECKOUT:
            raise ConfigError(f"seerlike runs from an installed package, and the quickstart's default images "
                              f"(shared/data/cifar10-dev beside a source checkout) are not here; pass {flag} "
                              "(--images, --eval-train and --eval-val: a folder or a path,label CSV each)")
        hint = (f"the real images are expected in {SHARED_DATA} (the shared/ folder beside the repository); "
                if str(path).startswith(str(SHARED_DATA)) else "")
        raise ConfigError(f"{what} {path} does not exist; {hint}pass {flag} to use other images")
    return str(path.resolve())


def resolve_inputs(args: argparse.Namespace) -> tuple[str, str, str]:
    """(unlabeled images, labeled eval train, labeled eval val) as absolute paths."""
    cifar = SHARED_DATA / "cifar10-dev"
    images = _need(Path(args.images) if args.images else default_images(), "--images", "--images DIR")
    train = _need(Path(args.eval_train) if args.eval_train else cifar / "train.csv", "--eval-train",
                  "--eval-train CSV_OR_DIR")
    val = _need(Path(args.eval_val) if args.eval_val else cifar / "val.csv", "--eval-val", "--eval-val CSV_OR_DIR")
    return images, train, val


# ---------------------------------------------------------------- the pipeline


def knn_args(model: str, train: str, val: str, out: str, image_size: int = IMAGE_SIZE) -> list[str]:
    """`seerlike eval knn` arguments of every quickstart score: k 20, cosine, T 0.07, pooled features, whole images
    at ``image_size`` (the working resolution)."""
    return ["knn", "--model", model, "--train", train, "--val", val, "--out", out, "--layer", "pool",
            "--image-size", str(image_size), "--resize", str(image_size), "--k", "20", "--temperature", "0.07",
            "--batch-size", "256"]


def monitor_args(image_size: int) -> list[str]:
    """A training stage's kNN monitor on the quickstart's eval split, at the resolution of the final scores
    (docs/engine.md, "Watching it learn"; ``eval.max_per_class`` images per class, so its readings
    are close to the final scores, not equal to them)."""
    return ["eval.train={eval_train}", "eval.val={eval_val}", f"eval.image_size={image_size}",
            f"eval.resize={image_size}"]



def _literal(args: list[str]) -> list[str]:
    """Arguments taken as they are by the pipeline, whose ``{name}`` placeholders would read JSON's braces."""
    return [a.replace("{", "{{").replace("}", "}}") for a in args]


def _eval_stage(name: str, model: str, image_size: int) -> dict:
    return {"name": name, "command": "eval",
            "args": knn_args(model, "{eval_train}", "{eval_val}", "{out}", image_size)}


def build_pipeline(run_dir: str | Path, *, images: str, eval_train: str, eval_val: str, method: str = "swav",
                   budget: Budget, store: str = "", seed: int = 0, nproc: int = 2, fit: DataFit | None = None):
    """The quickstart as a Pipeline (stages, their arguments and resources); ``fit`` sets the resolution, views
    and batches (default: the tiny recipes' own CIFAR settings)."""
    from launchers.pipeline import pipeline_from_dict

    from seerlike.checkpoints import random_spec
    from seerlike.methods import METHODS, pretraining_methods

    if method not in pretraining_methods():
        raise ConfigError(f"--method {method!r} is not a pretraining method; choose one of {pretraining_methods()}")
    channels = METHODS[method].input_channels
    fit = fit or DataFit()
    size = str(fit.resolution)
    run_dir = Path(run_dir).absolute()
    data = store.rstrip("/") if store else str(run_dir / "ingest")
    ranks = {"tasks_per_node": nproc}
    # shards of 200: exact (non-resampled) reading needs a shard per rank x data worker, even for ~400 images
    stages = [
        {"name": "ingest", "command": "ingest",
         "args": ["{images}", "--out", "{data}", *fit.ingest]},
        _eval_stage("eval_random", f"random:{ARCH}", fit.resolution),
        # a trunk fed other than RGB (colorization: the lightness) is scored against random init fed the same
        *([_eval_stage(INPUT_BASELINE[1], random_spec(ARCH, channels), fit.resolution)] if channels != 3 else []),
        {"name": "pretrain", "command": "train", "submit": ranks,
         "args": ["--recipe", f"tiny_{method}", "--data", "{data}", "--run-dir", "{out}",
                  *budget.train_args("pretrain", seed, *_literal(fit.train.get("pretrain", []))),
                  *monitor_args(fit.resolution)]},
        _eval_stage("eval_pretrain", "{pretrain}", fit.resolution),
        {"name": "extract", "command": "extract",
         "args": ["--checkpoint", "{pretrain}", "--data", "{data}", "--layer", "res5", "--image-size",
                  size, "--resize", size, "--out", "{out}"]},
        {"name": "cluster", "command": "cluster",
         "args": ["{extract}", "--k", "{k}", "--out", "{out}", "--seed", str(seed), "--contact-sheets", "6",
                  "--images", "{data}"]},
        {"name": "clusterfit", "command": "train", "submit": ranks,
         "args": ["--recipe", "clusterfit_tiny", "--data", "{data}", "--run-dir", "{out}",
                  *budget.train_args("clusterfit", seed, "data.labels={cluster}", "method.num_classes={k}",
                                     *_literal(fit.train.get("clusterfit", []))),
                  *monitor_args(fit.resolution)]},
        _eval_stage("eval_clusterfit", "{clusterfit}", fit.resolution),
        {"name": "distill", "command": "distill", "submit": ranks,
         "args": ["--teacher", "{clusterfit}", "--student", STUDENT, "--data", "{data}", "--run-dir", "{out}",
                  *budget.train_args("distill", seed, *_literal(fit.train.get("distill", []))),
                  *monitor_args(fit.resolution)]},
        {"name": "export", "command": "export",
         "args": ["--checkpoint", "{distill}", "--format", "torchvision,safetensors", "--image-size",
                  size, "--out", "{out}"]},
        _eval_stage("eval_distilled", "{export}", fit.resolution),
        _eval_stage("eval_random_student", f"random:{STUDENT}", fit.resolution),
        {"name": "report", "command": "seerlike.quickstart:report_stage", "args": ["{dir}", method]},
    ]
    return pipeline_from_dict({
        "name": f"quickstart-{method}", "dir": str(run_dir),
        "vars": {"images": images, "data": data, "eval_train": eval_train, "eval_val": eval_val, "k": str(budget.k)},
        "stages": stages,
    }, source="seerlike quickstart")


#: results.json entry -> (eval stage, training stage whose seconds it reports, architecture)
MODELS = {
    "random_init": ("eval_random", None, ARCH),
    "pretrain": ("eval_pretrain", "pretrain", ARCH),
    "clusterfit": ("eval_clusterfit", "clusterfit", ARCH),
    "distilled": ("eval_distilled", "distill", STUDENT),
    "random_init_student": ("eval_random_student", None, STUDENT),
}
INPUT_BASELINE = ("random_init_input", "eval_random_input")
"""results.json entry and eval stage of the pretrained trunk's own baseline when the method feeds it other than RGB
(random init fed the same, ``random:ARCH:in_channels=C``): the pretrained model's gain is over it."""


# ---------------------------------------------------------------- report (the last stage)


def _train_stats(run: Path) -> dict:
    from seerlike.plots import read_metrics

    rows = [r for r in read_metrics(run) if "loss" in r]
    if not rows:
        return {}
    timed = [r for r in rows if "step_time_s" in r]
    return {"steps": rows[-1]["step"], "first_loss": rows[0]["loss"], "final_loss": rows[-1]["loss"],
            "step_time_s": round(sum(r["step_time_s"] for r in timed) / max(len(timed), 1), 4)}


#: training stages: run folder -> title in the report
TRAINING_STAGES = {"pretrain": "pretraining", "clusterfit": "ClusterFit", "distill": "distillation"}


def stage_timing(stage_dir: Path, stage_s: float | None) -> dict:
    """Planned vs actual seconds of a training stage (its timing.json and calibration row) and its kNN monitor readings.

    ``budget_s`` is the plan of its steps (loop.time_budget_s; None when the steps were given),
    ``monitor_planned_s`` the monitor's allowance on top (``MONITOR_SHARE`` of it, when the stage ran
    the monitor) and ``planned_s`` their sum; ``budget_used_s`` is what the budget's clock measured
    over the steps (the monitor's time left out), ``actual_s`` that plus the monitor's seconds (with a
    CPU-clock budget both are the steps' alone: the monitor is timed in wall seconds); ``stage_s``
    the whole stage (process start-up, data set-up and checkpoints included).
    """
    from seerlike.config import load
    from seerlike.engine.config import TrainConfig
    from seerlike.engine.timing import read
    from seerlike.plots import read_metrics

    rows = read_metrics(stage_dir) if (stage_dir / "metrics.jsonl").is_file() else []
    segments = read(stage_dir)
    recorded = stage_dir / "config.yaml"  # the dtype the engine trained in (precision.dtype=auto made concrete)
    dtype = load(recorded, TrainConfig).precision.dtype if recorded.is_file() else None
    calibrated = next((r for r in reversed(rows) if "calibrated_step_s" in r), {})
    budget = [s["budget_used_s"] for s in segments if s.get("budget_used_s") is not None]
    wall = sum(s.get("wall_s", 0.0) for s in segments)
    monitor = sum(s.get("monitor_s", 0.0) for s in segments)
    readings = [r for r in rows if "knn_top1" in r]
    budget_s = (calibrated.get("time_budget_s")
                or next((s["time_budget_s"] for s in segments if "time_budget_s" in s), None))
    clock = next((s["budget_clock"] for s in segments if "budget_clock" in s), None)
    monitor_planned = budget_s * MONITOR_SHARE if budget_s and (readings or monitor) else 0.0
    # the monitor is timed in wall seconds: with a CPU-clock budget the plan and the actual are the steps'
    on_clock = clock != "cpu"
    planned = budget_s + monitor_planned * on_clock if budget_s else None
    actual = sum(budget) + monitor * on_clock if budget else None
    return {
        "budget_s": budget_s, "monitor_planned_s": round(monitor_planned, 1) if budget_s else None,
        "planned_s": round(planned, 1) if planned else None,
        "calibrated_step_s": calibrated.get("calibrated_step_s"), "planned_steps": calibrated.get("planned_steps"),
        "steps": segments[-1]["end_step"] if segments else None,
        "budget_used_s": round(sum(budget), 1) if budget else None,
        "actual_s": round(actual, 1) if actual is not None else None,
        "vs_plan": round(actual / planned - 1.0, 4) if planned and actual is not None else None,
        "clock": clock, "dtype": dtype,
        "train_s": round(sum(s.get("train_s", 0.0) for s in segments), 1) if segments else None,
        "monitor_s": round(monitor, 1), "monitor_frac": round(monitor / wall, 4) if wall else None,
        "stage_s": stage_s, "segments": len(segments),
        "knn": [[round(r["elapsed_s"] / 60, 3), round(r["knn_top1"], 2)] for r in readings if "elapsed_s" in r],
        "knn_images": readings[-1].get("knn_images") if readings else None,
    }


def collect_results(run_dir: str | Path, method: str) -> dict:
    """results.json's content from the stage outputs."""
    from launchers.progress import stage_seconds

    run_dir = Path(run_dir)
    seconds = stage_seconds(run_dir)
    models: dict[str, dict] = {}
    entries = dict(MODELS)
    if (run_dir / INPUT_BASELINE[1] / "eval_knn.json").is_file():
        entries = {"random_init": MODELS["random_init"], INPUT_BASELINE[0]: (INPUT_BASELINE[1], None, ARCH), **MODELS}
    for entry, (eval_stage, train_stage, arch) in entries.items():
        ev = json.loads((run_dir / eval_stage / "eval_knn.json").read_text())
        if ev["arch"] != arch:
            raise RuntimeError(f"{eval_stage} evaluated {ev['arch']}, expected {arch}")
        name = method if entry == "pretrain" else entry
        row = {"arch": ev["arch"], "knn_top1": ev["metrics"]["top1"], "knn_top5": ev["metrics"].get("top5"),
               "seconds": seconds.get(train_stage, 0.0) if train_stage else 0.0,
               "eval_seconds": seconds.get(eval_stage), "model": ev["model"], "layer": ev["layer"],
               "num_train": ev["num_train"], "num_val": ev["num_val"],
               "confusion_png": ev.get("confusion_png")}
        if train_stage:
            row.update(_train_stats(run_dir / train_stage))
        models[name] = row
    for name, row in models.items():  # each model against random init of its architecture fed its own input
        own_input = name == method and INPUT_BASELINE[0] in models
        row["baseline"] = INPUT_BASELINE[0] if own_input else {ARCH: "random_init", STUDENT: "random_init_student"}[row["arch"]]
        row["gain_over_random"] = round(row["knn_top1"] - models[row["baseline"]]["knn_top1"], 2)
    cluster = json.loads((run_dir / "cluster" / "cluster_stats.json").read_text())
    summary = json.loads((run_dir / "ingest" / "summary.json").read_text()) if (run_dir / "ingest" / "summary.json").is_file() else {}
    training = {stage: stage_timing(run_dir / stage, seconds.get(stage)) for stage in TRAINING_STAGES}
    return {"method": method, "models": models, "stage_seconds": seconds, "training": training,
            "total_seconds": round(sum(seconds.values()), 1),
            "kmeans": {k: cluster.get(k) for k in ("num_features", "num_clusters", "empty_clusters", "size_min",
                                                    "size_median", "size_max", "effective_clusters")},
            "ingest": {k: summary.get(k) for k in ("seen", "written", "duplicates", "rejected", "shards") if k in summary}}


def write_plots(run_dir: Path, results: dict) -> list[Path]:
    """Loss and kNN-monitor curves of the three training runs, the confusion matrices and the cluster contact sheets."""
    from seerlike.plots import knn_curves, loss_curves

    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    titles = {**TRAINING_STAGES, "pretrain": f"{results['method']} pretraining"}
    made = [loss_curves([(titles[stage], run_dir / stage) for stage in TRAINING_STAGES], plots / "loss_curves.png"),
            knn_curves([(titles[stage] + (f" ({t['knn_images']} images)" if t.get("knn_images") else ""),
                         [tuple(p) for p in t["knn"]]) for stage, t in results["training"].items()],
                       plots / "knn_monitor.png")]
    for name, row in results["models"].items():
        if row.get("confusion_png") and Path(row["confusion_png"]).is_file():
            dst = plots / f"confusion_{name}.png"
            shutil.copyfile(row["confusion_png"], dst)
            row["confusion_png"] = str(dst.relative_to(run_dir))
            made.append(dst)
    for sheet in sorted((run_dir / "cluster" / "contact_sheets").glob("*.png")):
        dst = plots / f"clusters_{sheet.name}"
        shutil.copyfile(sheet, dst)
        made.append(dst)
    return made


def results_table(results: dict) -> str:
    lines = [f"{'model':20} {'arch':20} {'kNN top-1':>9} {'top-5':>6} {'vs random':>9} {'train s':>8}"]
    for name, r in results["models"].items():
        top5 = f"{r['knn_top5']:6.1f}" if r.get("knn_top5") is not None else f"{'-':>6}"
        lines.append(f"{name:20} {r['arch']:20} {r['knn_top1']:9.1f} {top5} {r['gain_over_random']:+9.1f} "
                     f"{r['seconds']:8.0f}")
    return "\n".join(lines)


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def timing_table(training: dict) -> str:
    """Markdown: the plan and what happened, per training stage."""
    lines = ["| stage | dtype | planned s | of which monitor | s/step (calibrated) | planned steps | steps | actual s "
             "| of which monitor | monitor % | actual vs plan | stage s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for stage, t in training.items():
        actual = t["actual_s"] if t["actual_s"] is not None else t["train_s"] + t["monitor_s"]
        frac = None if t["monitor_frac"] is None else 100 * t["monitor_frac"]
        off = None if t["vs_plan"] is None else 100 * t["vs_plan"]
        lines.append(f"| {TRAINING_STAGES[stage]} | {t.get('dtype') or '-'} | {_cell(t['planned_s'], '.0f')} | {_cell(t['monitor_planned_s'], '.1f')} "
                     f"| {_cell(t['calibrated_step_s'], '.3f')} | {_cell(t['planned_steps'], 'd')} | {_cell(t['steps'], 'd')} "
                     f"| {_cell(actual, '.0f')} | {_cell(t['monitor_s'], '.1f')} | {_cell(frac, '.1f')} "
                     f"| {_cell(off, '+.1f')}{'' if off is None else ' %'} | {_cell(t['stage_s'], '.0f')} |")
    return "\n".join(lines)


def timing_lines(training: dict) -> list[str]:
    """The plan against what happened, one printed line per training stage."""
    lines = []
    for stage, t in training.items():
        if t["planned_s"] is None:
            lines.append(f"{TRAINING_STAGES[stage]}: {t['steps']} steps given, {t['train_s'] + t['monitor_s']:.0f} s "
                         f"(monitor {t['monitor_s']:.1f} s)")
            continue
        if t["clock"] == "cpu":
            lines.append(f"{TRAINING_STAGES[stage]}: planned {t['budget_s']:.0f} CPU-s of steps, actual "
                         f"{_cell(t['budget_used_s'], '.1f')}, {_cell(100 * (t['vs_plan'] or 0), '+.1f')} % (monitor "
                         f"{t['monitor_s']:.1f} wall s, planned {t['monitor_planned_s']:.1f}); "
                         f"{_cell(t['steps'], 'd')} steps of {_cell(t['planned_steps'], 'd')} planned")
            continue
        lines.append(f"{TRAINING_STAGES[stage]}: planned {t['planned_s']:.0f} s ({t['budget_s']:.0f} s of steps + "
                     f"{t['monitor_planned_s']:.1f} s of monitor), actual {_cell(t['actual_s'], '.0f')} s "
                     f"({_cell(t['budget_used_s'], '.0f')} + {t['monitor_s']:.1f}), {_cell(100 * (t['vs_plan'] or 0), '+.1f')} %; "
                     f"{_cell(t['steps'], 'd')} steps of {_cell(t['planned_steps'], 'd')} planned")
    return lines


def write_report(run_dir: Path, results: dict) -> Path:
    from seerlike.engine.monitor import MonitorConfig

    m = results["models"]
    method = results["method"]
    stages = "\n".join(f"| {k} | {v:.0f} |" for k, v in results["stage_seconds"].items())
    rows = "\n".join(f"| {n} | {r['arch']} | {r['knn_top1']:.1f} | {r['knn_top5']:.1f} | {r['gain_over_random']:+.1f} "
                     f"| {r.get('steps', '-')} | {r['seconds']:.0f} |" for n, r in m.items())
    km = results["kmeans"]
    own_baseline = (f" ({method}'s trunk against `{INPUT_BASELINE[0]}`: the same random init fed what {method} "
                    "feeds it)" if INPUT_BASELINE[0] in m else "")
    text = f"""# seerlike quickstart report

{method.upper()} pretraining of `{ARCH}` on the unlabeled images, then ClusterFit on k-means
pseudo-labels ({km['num_clusters']} clusters of {km['num_features']} res5 features), then
distillation of the ClusterFit model into `{STUDENT}`. Every model is scored by kNN
(k 20, cosine, T 0.07, pooled features, {m['random_init']['num_train']} labeled train images as
the memory bank, {m['random_init']['num_val']} val images) against the same architecture at
random init{own_baseline}.

| model | arch | kNN top-1 | top-5 | vs random init | steps | train s |
|---|---|---|---|---|---|---|
{rows}

{method} gains {m[method]['gain_over_random']:+.1f} points over random init; ClusterFit
{m['clusterfit']['knn_top1'] - m[method]['knn_top1']:+.1f} over {method}; the distilled student
{m['distilled']['knn_top1'] - m['clusterfit']['knn_top1']:+.1f} vs its teacher and
{m['distilled']['gain_over_random']:+.1f} over its own random init.

![loss curves](plots/loss_curves.png)

## Learning while it trains (kNN monitor)

kNN top-1 of each stage's backbone on a subset of the eval split (at most
{MonitorConfig().max_per_class} images per class, fewer when the stage's time budget is short: the
plot titles give the count; the numbers above use all of it) against the wall-clock minutes of
the stage, measured by the training processes themselves (docs/engine.md, "Watching it learn").

![kNN top-1 while training](plots/knn_monitor.png)

Confusion matrices (kNN on val): {", ".join(f"[{n}]({r['confusion_png']})" for n, r in m.items() if r.get('confusion_png'))}.

Clusters (random members of the largest, smallest and random clusters):

![largest clusters](plots/clusters_largest.png)
![random clusters](plots/clusters_random.png)

## Planned vs actual time of the training stages

Each stage's plan is its share of `--minutes` ("-" when the steps were given): seconds of steps
and, on top, the kNN monitor's allowance ({100 * MONITOR_SHARE:.0f} % of them: the engine pauses its step
budget while the monitor reads). The stage times its first steps on this data and model and sets
its step count so that its steps take their seconds. "actual s" is what the same clock measured
over the steps plus the monitor's seconds; a stage held its plan within {100 * PLAN_TOLERANCE:.0f} % when the
machine kept the speed of its first steps ("actual vs plan"; with `--clock cpu`, CPU seconds of
the steps alone, the monitor being timed in wall seconds). "stage s" is the whole stage,
process start-up, data set-up and checkpoints included (docs/fit_data.md, "Planned vs actual time").
"dtype" is what the stage trained in: the CPU recipes ask for `auto`, bf16 where this CPU has it
natively and fp32 elsewhere (docs/engine.md, "bf16 on CPUs").

{timing_table(results["training"])}

{fit_report(run_dir)}

## Stage times (wall seconds)

| stage | seconds |
|---|---|
{stages}

Total: {results['total_seconds']:.0f} s. Exported student: `export/` (torchvision and safetensors).
"""
    path = run_dir / "report.md"
    storage.write_bytes(path, text.encode())
    return path


def report_stage(argv: list[str]) -> int:
    """Pipeline stage ``seerlike.quickstart:report_stage [RUN_DIR, METHOD]``: results.json, plots, report.md."""
    run_dir, method = Path(argv[0]), argv[1]
    results = collect_results(run_dir, method)
    write_plots(run_dir, results)
    storage.write_bytes(run_dir / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    write_report(run_dir, results)
    log.info("wrote %s, %s and %s", run_dir / "results.json", run_dir / "report.md", run_dir / "plots")
    return 0


# ---------------------------------------------------------------- progress


def metrics_line(stage_dir: Path) -> str:
    """The newest training metrics row of a stage, shortened, and its newest kNN monitor reading."""
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        return ""
    rows = []
    for line in path.read_text().strip().splitlines()[-50:]:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    row = next((r for r in reversed(rows) if isinstance(r, dict) and "loss" in r and "step" in r), None)
    knn = next((r for r in reversed(rows) if isinstance(r, dict) and "knn_top1" in r), None)
    parts = []
    if row:
        parts.append(f"step {row['step']}: loss {row['loss']:.4f}, lr {row.get('lr', 0):.4f}, "
                     f"{row.get('images_per_s', 0):.0f} img/s")
    if knn:
        parts.append(f"kNN top-1 {knn['knn_top1']:.1f} at step {knn.get('step')}")
    return "; ".join(parts)


# ---------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", help="unlabeled pretraining images: folder, list file or s3:// prefix "
                   "(default ../shared/data/cifar10-dev/train)")
    p.add_argument("--eval-train", help="labeled kNN memory bank: path,label CSV or class folders "
                   "(default cifar10-dev train.csv)")
    p.add_argument("--eval-val", help="labeled kNN queries (default cifar10-dev val.csv)")
    p.add_argument("--run-dir", default="runs/quickstart", help="where everything goes (rerun to resume)")
    from seerlike.methods import pretraining_methods

    p.add_argument("--method", choices=pretraining_methods(), default="swav",
                   help="self-supervised pretraining method (its tiny_METHOD recipe)")
    p.add_argument("--store", default="", help="s3://bucket/prefix for the shards (default: RUN_DIR/ingest)")
    p.add_argument("--cluster", choices=("local", "slurm"), default="local", help="local processes or Slurm jobs")
    p.add_argument("--minutes", type=float, default=15.0, help="wall-time budget on 2 CPU cores (sets the steps)")
    p.add_argument("--pretrain-seconds", type=float, help="training seconds of pretraining (instead of its share of --minutes)")
    p.add_argument("--followup-seconds", type=float, help="training seconds each of ClusterFit and distillation")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="what the stages' seconds count: wall seconds, or each rank's CPU seconds, which a busy "
                   "machine does not stretch (loop.budget_clock; the kNN monitor is timed in wall seconds)")
    p.add_argument("--pretrain-steps", type=int, help="override the pretraining steps")
    p.add_argument("--clusterfit-steps", type=int, help="override the ClusterFit steps")
    p.add_argument("--distill-steps", type=int, help="override the distillation steps")
    p.add_argument("--k", type=int, default=K, help=f"k-means clusters (ClusterFit classes; default {K})")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--nproc", type=int, default=2, help="ranks of each training stage")
    p.add_argument("--no-fit-data", dest="fit_data", action="store_false",
                   help="keep the tiny recipes' CIFAR settings (24 px views, kNN at 32 px) instead of fitting the "
                   "resolution, views and batch to the images and the budget (docs/fit_data.md)")
    p.add_argument("--quiet", action="store_true", help="no stage log lines, only stage changes and the results")


def run(args: argparse.Namespace) -> int:
    from launchers.pipeline import is_done, resolve, run_pipeline
    from launchers.progress import PipelineProgress
    from launchers.submit import SubmitConfig

    if args.store and not args.store.startswith("s3://"):
        raise ConfigError(f"--store {args.store!r}: expected s3://bucket/prefix (omit it to keep shards in the run dir)")
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    if args.cluster == "slurm" and not shutil.which("sbatch"):
        raise ConfigError("--cluster slurm: no sbatch on PATH (start infra/slurm or run on a login node); "
                          "omit --cluster to run the stages as local processes")
    images, eval_train, eval_val = resolve_inputs(args)
    budget = budget_for(args.minutes, method=args.method, pretrain_seconds=args.pretrain_seconds,
                        followup_seconds=args.followup_seconds, pretrain_steps=args.pretrain_steps,
                        clusterfit_steps=args.clusterfit_steps, distill_steps=args.distill_steps, k=args.k,
                        clock=args.clock)
    run_dir = Path(args.run_dir).absolute()
    fit = fit_stages(images, budget, args.method, args.nproc) if args.fit_data else DataFit()
    p = build_pipeline(run_dir, images=images, eval_train=eval_train, eval_val=eval_val, method=args.method,
                       budget=budget, store=args.store, seed=args.seed, nproc=args.nproc, fit=fit)
    run_dir.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(run_dir / FIT_JSON, (json.dumps(fit.summary or {"rule": "off"}, indent=2) + "\n").encode())
    names = [s.name for s in p.stages]
    base = SubmitConfig(cluster=args.cluster, log_dir=str(run_dir / "jobs"), time=60)
    print(f"seerlike quickstart: {args.method} on {images} -> {run_dir}", flush=True)
    print(f"budget: {json.dumps(asdict(budget))} ({args.minutes:g} min on 2 cores); stages: {' -> '.join(names)}",
          flush=True)
    print("plan: " + "; ".join(
        f"{stage} {budget.planned_s(stage):.0f} s ({getattr(budget, f'{stage}_s'):.0f} s of steps, warmup "
        f"{budget.warmup_steps(stage)} steps, + {MONITOR_SHARE:.0%} kNN monitor)" if budget.planned_s(stage)
        else f"{stage} {getattr(budget, f'{stage}_steps')} steps" for stage in SHARES)
        + f"; {OVERHEAD_S:.0f} s for the rest", flush=True)
    print("\n".join(fit_lines(fit)), flush=True)
    progress = PipelineProgress(run_dir, names, poll_s=1.0, bar_every_s=15.0, show_logs=not args.quiet,
                                status_line=metrics_line)
    skipped = []
    for stage, argv, _ in resolve(p):  # as run_pipeline decides: done stages up to the first one to run
        if not is_done(p, stage, argv):
            break
        skipped.append(stage.name)
    if skipped:
        print(f"already complete, skipped: {', '.join(skipped)}", flush=True)
    t0 = time.monotonic()
    progress.start()
    try:
        rows = run_pipeline(p, base, wait=True)
    except RuntimeError as e:  # a stage failed: its log lines were shown above
        print(f"seerlike quickstart: {e}", file=sys.stderr)
        return 1
    finally:
        progress.stop()
    bad = [r for r in rows if r["state"] not in ("DONE", "COMPLETED")]
    if bad:
        print(f"stages not completed: {', '.join(r['stage'] + '=' + r['state'] for r in bad)}", file=sys.stderr)
        return 1
    results = json.loads((run_dir / "results.json").read_text())
    print()
    print(results_table(results))
    print("\n".join(["", "planned vs actual (training stages):", *timing_lines(results["training"])]))
    print(f"\nwall time {time.monotonic() - t0:.0f} s (stages {results['total_seconds']:.0f} s); "
          f"report {run_dir / 'report.md'}, results {run_dir / 'results.json'}, plots {run_dir / 'plots'}")
    return 0
