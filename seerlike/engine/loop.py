"""The training loop: read it top to bottom.

Every rank runs :func:`train`. The method comes from the registry (seerlike.methods) by
``method.name``; the loop knows it only through the Method contract (seerlike.methods.base)
and trains it with :func:`seerlike.engine.step.train_step`. Exact resume holds because
everything a step depends on is restored from the checkpoint: parameters, optimizer state,
loss scale, method state (queues, momentum encoders, centres: buffers and submodules of the
method), per-rank buffers, per-rank torch and Python RNG, the data pipeline's position; the
LR is a function of the step.
"""

from __future__ import annotations

import logging
import os
import dataclasses
import random
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from seerlike import config as configlib
from seerlike import methods, models
from seerlike.engine.budget import StepBudget
from seerlike.engine.checkpoint import Checkpointer, prepare_run_dir
from seerlike.engine.config import TrainConfig
from seerlike.engine.dist import DistInfo, init_distributed, setup_logging, teardown
from seerlike.engine.metrics import MetricsLogger, Throughput, peak_memory_mb
from seerlike.engine.monitor import MakeScorer, build_monitor
from seerlike.engine.optim import LRSchedule, build_optimizer
from seerlike.engine.parallelize import parallelize
from seerlike.engine.precision import emulated_bf16_warning, grad_scaler
from seerlike.engine.step import NonFiniteLoss, train_step
from seerlike.engine.timing import SegmentClock
from seerlike.storage import DiskFullError

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75
"""Exit status after a SIGUSR1/SIGTERM checkpoint-and-stop (EX_TEMPFAIL: 'try again'); launchers requeue on it."""


def build_method(cfg: TrainConfig, num_samples: int | None = None) -> nn.Module:
    """The backbone wrapped by the configured method, on CPU, in fp32.

    ``num_samples`` (the training data's size) is passed to methods that declare ``needs_indices``.
    """
    backbone = models.build(cfg.model.name, zero_init_residual=cfg.model.zero_init_residual,
                            drop_path=cfg.model.drop_path)
    return methods.build(cfg.method, backbone, num_samples=num_samples)


class StopRequest:
    """SIGUSR1/SIGTERM set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.signum = 0
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGUSR1, signal.SIGTERM)}

    def _handle(self, signum, _frame):
        self.signum = signum

    def close(self, *, finished: bool = False) -> None:
        """Put the previous handlers back; once the run has finished, make stop signals harmless instead.

        A stop signal that arrives after the last checkpoint (a launcher forwarding SIGTERM while
        the ranks exit) has nothing left to stop; the default action would kill the process and
        turn a finished run into exit status 143. So the harmless handler stays for the rest of the process.
        """
        for s, h in self._old.items():
            signal.signal(s, _after_finish if finished else h)


def _after_finish(signum, _frame) -> None:
    log.warning("caught %s after training finished: nothing left to stop, exiting normally", signal.Signals(signum).name)


def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, data=None, scorer: MakeScorer | None = None) -> int:
    """Train on the ranks of the environment; returns 0, or REQUEUE_EXIT_CODE after a stop signal.

    ``data`` replaces the configured pipeline (tests); it must behave like ``TrainData``.
    ``scorer`` builds what the online monitor scores on its schedule (seerlike.engine.monitor): the
    entry points pass ``seerlike.eval.knn_monitor.knn_scorer(cfg.eval)``.
    """
    owns_group = not dist.is_initialized()  # a caller's process group is left to the caller
    info = init_distributed()
    if owns_group:
        setup_logging(info.rank)
    if cfg.loop.num_threads:
        torch.set_num_threads(cfg.loop.num_threads)
    try:
        return _train(cfg, Path(run_dir), info, data, scorer)
    except DiskFullError as e:  # says which file and what to do: no traceback needed
        log.error("training failed on rank %d: %s", info.rank, e)
        raise
    except Exception:
        log.exception("training failed on rank %d", info.rank)
        raise
    finally:
        if owns_group:
            teardown()


def _train(cfg: TrainConfig, run_dir: Path, info: DistInfo, data, scorer: MakeScorer | None) -> int:
    rank, world, device = info.rank, info.world_size, info.device
    if cfg.precision.dtype == "auto":  # made concrete before anything is recorded: config.yaml says which
        cfg = dataclasses.replace(cfg, precision=cfg.precision.resolved(device))
        if rank == 0:
            log.info("precision.dtype=auto -> %s on %s (%s)", cfg.precision.dtype, device.type,
                     "native bf16" if cfg.precision.dtype == "bf16" else "no native bf16: docs/engine.md, \"bf16 on CPUs\"")
    loop = cfg.loop
    run_dir.mkdir(parents=True, exist_ok=True)
    to_record = prepare_run_dir(cfg, run_dir, rank=rank)  # refuses a mismatched resume or a mixing fresh start
    if rank == 0:
        configlib.dump(to_record, run_dir / "config.yaml")

    if data is None:  # before the method: methods with a dataset-wide memory are sized by it
        from seerlike.data.pipeline import build_train_data

        data = build_train_data(cfg.data, rank=rank, world_size=world, seed=loop.seed, device=device)

    # ---------------------------------------------------------------- model, optimizer
    torch.manual_seed(loop.seed)  # identical init everywhere: FSDP2 shards local copies
    method = build_method(cfg, num_samples=getattr(data, "num_samples", None))
    if cfg.model.channels_last and cfg.parallel.strategy != "fsdp":  # FSDP2 shards contiguous params only
        method.to(memory_format=torch.channels_last)
    model = parallelize(method, cfg.parallel, compute_dtype=cfg.precision.torch_dtype, device=device)
    method.train()
    optimizer = build_optimizer(cfg.optim, method)
    global_batch = cfg.data.batch_size * world * loop.grad_accum
    schedule = LRSchedule(cfg.optim, global_batch, loop.max_steps)
    scaler = grad_scaler(cfg.precision, device)

    # ---------------------------------------------------------------- resume or start
    ckpt = Checkpointer(cfg.checkpoint, run_dir)
    start, data_state, exact = 0, None, False
    restored = ckpt.resume(model, optimizer, method=method, scaler=scaler)  # newest that verifies and loads
    if restored is not None:
        start, data_state, exact = restored.step, restored.data_state, restored.exact
    if not exact:  # fresh start (or a different world size): seeded per-rank RNG
        torch.manual_seed(loop.seed + 100_003 * (rank + 1))
        random.seed(loop.seed + 100_003 * (rank + 1))
    if data_state is not None:
        data.load_state_dict(data_state)
    budget = None
    if loop.time_budget_s > 0:
        if start < loop.calibrate_steps:
            budget = StepBudget(loop.time_budget_s, loop.calibrate_steps, loop.max_steps,
                                min_steps=max(cfg.optim.warmup_steps, loop.calibrate_steps + 1), clock=loop.budget_clock)
        else:  # calibrated before the restart: continue with the saved max_steps
            cfg = dataclasses.replace(cfg, loop=dataclasses.replace(loop, max_steps=_saved_max_steps(restored.path)))
            loop = cfg.loop
            schedule = LRSchedule(cfg.optim, global_batch, loop.max_steps)
            if rank == 0:
                configlib.dump(dataclasses.replace(to_record, loop=loop), run_dir / "config.yaml")
    if start >= loop.max_steps:
        log.info("run already at step %d of %d: nothing to do", start, loop.max_steps)
        return 0
    log.info("training %s/%s from step %d to %d on %d rank(s), global batch %d, %s, %s",
             cfg.method.name, cfg.model.name, start, loop.max_steps, world, global_batch,
             cfg.parallel.strategy, cfg.precision.dtype)
    if rank == 0 and (slow := emulated_bf16_warning(cfg.precision, device)):
        log.warning(slow)

    # ---------------------------------------------------------------- the loop
    stop = StopRequest()
    metrics = MetricsLogger(run_dir, rank=rank, start_step=start, max_steps=loop.max_steps,
                            tensorboard=loop.tensorboard, progress=loop.progress)
    meter = Throughput()
    batches = _batches(data)
    skipped, saved_at, step = 0, start, start
    finished = stopped = False
    clock = SegmentClock(start)
    monitor = None
    try:
        monitor = build_monitor(cfg, method, scorer, metrics=metrics, device=device, start_step=start, budget=budget)
        while step < loop.max_steps:
            lr = schedule.apply(optimizer, step)
            t_start = time.perf_counter()
            wait = [0.0]

            def timed():
                while True:
                    t0 = time.perf_counter()
                    batch = next(batches)
                    wait[0] += time.perf_counter() - t0
                    yield batch

            try:
                result = train_step(model, method, optimizer, scaler, timed(), num_micro=loop.grad_accum, step=step,
                                    max_steps=loop.max_steps, precision=cfg.precision, device=device,
                                    skip_nonfinite=loop.skip_nonfinite, channels_last=cfg.model.channels_last,
                                    stop=lambda: stop.signum != 0)
            except NonFiniteLoss as e:
                raise NonFiniteLoss(f"{e}; last good checkpoint: {ckpt.last_complete or 'none'}; lower optim.lr, "
                                    "use precision.dtype=bf16/fp32, or set loop.skip_nonfinite=true") from None
            if result.skipped:
                skipped += 1
                log.warning("non-finite loss at step %d on rank(s) %s: step skipped (%d so far)",
                            step, result.bad_ranks, skipped)
            step += 1
            meter.add(result.images, time.perf_counter() - t_start - wait[0], wait[0])
            metrics.advance()
            if budget is not None and budget.observe(step):
                cfg = dataclasses.replace(cfg, loop=dataclasses.replace(loop, max_steps=budget.plan(step, device)))
                loop = cfg.loop
                schedule = LRSchedule(cfg.optim, global_batch, loop.max_steps)
                metrics.set_total(loop.max_steps)
                metrics.log(step, {"calibrated_step_s": budget.step_s, "planned_steps": loop.max_steps,
                                   "time_budget_s": loop.time_budget_s})
                if rank == 0:
                    configlib.dump(dataclasses.replace(to_record, loop=loop), run_dir / "config.yaml")
            if monitor is not None and not result.stop:  # result.stop is the same on every rank
                monitor.after_step(step, final=step == loop.max_steps, budget=budget)

            if step % loop.log_every == 0 or step == loop.max_steps:
                row = {"loss": result.loss, "lr": lr, **meter.summary(),
                       "peak_mem_mb": peak_memory_mb(device), "skipped_steps": skipped,
                       **{k: float(v) for k, v in result.stats.items()}}
                if scaler is not None:
                    row["loss_scale"] = scaler.get_scale()
                metrics.log(step, row)
                meter.reset()
            if step % cfg.checkpoint.every_steps == 0 or step == loop.max_steps or result.stop:
                ckpt.save(step, model, optimizer, method=method, scaler=scaler,
                          data_state=data.state_dict(), train_config=cfg)
                saved_at = step
            if result.stop and step < loop.max_steps:
                ckpt.wait()
                stopped = True
                log.warning("stop requested (signal): checkpoint at step %d written, exiting with %d",
                            saved_at, REQUEUE_EXIT_CODE)
                return REQUEUE_EXIT_CODE
        ckpt.wait()
        finished = True
        if result.stop:
            log.warning("stop requested during the last step: the run is finished (checkpoint at step %d), exiting 0",
                        step)
    finally:
        stop.close(finished=finished)
        if rank == 0 and (finished or stopped):
            clock.record(run_dir, end_step=step, finished=finished, monitor_s=monitor.spent_s if monitor else 0.0,
                         budget=budget, time_budget_s=loop.time_budget_s, budget_clock=loop.budget_clock,
                         planned_steps=loop.max_steps)
        metrics.close()
    log.info("done: %d steps, last checkpoint %s", step, ckpt.last_complete)
    return 0


def _saved_max_steps(ckpt_dir) -> int:
    """``loop.max_steps`` in a checkpoint's saved config (a calibrated time budget lives there)."""
    import yaml

    return int(yaml.safe_load((Path(ckpt_dir) / "config.yaml").read_text())["loop"]["max_steps"])


def _batches(data):
    """Batches forever: a new pass over ``data`` whenever one ends."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the training data yielded no batch; check --data and data.batch_size")
