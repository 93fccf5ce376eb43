"""The training loop: read it top to bottom.

Every rank runs :func:`train`. Exact resume holds because everything a step depends on is
restored from the checkpoint: parameters, optimizer state, loss scale, method state (SwAV
queue, BYOL target: buffers and submodules of the method), per-rank buffers, per-rank torch
and Python RNG, the data pipeline's position; the LR is a function of the step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from seerlike import config as configlib
from seerlike import models
from seerlike.engine.checkpoint import Checkpointer
from seerlike.engine.dist import DistInfo, init_distributed, setup_logging, teardown
from seerlike.engine.metrics import MetricsLogger, Throughput, peak_memory_mb
from seerlike.engine.optim import LRSchedule, build_optimizer
from seerlike.engine.parallelize import parallelize
from seerlike.engine.precision import autocast, grad_scaler
from seerlike.engine.train import REQUEUE_EXIT_CODE, TrainConfig

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite and the run is configured to stop on it."""


def build_method(cfg: TrainConfig) -> nn.Module:
    """The backbone wrapped by the configured method (SwAV or BYOL), on CPU, in fp32."""
    backbone = models.build(cfg.model.name, zero_init_residual=cfg.model.zero_init_residual,
                            drop_path=cfg.model.drop_path)
    if cfg.method.name == "swav":
        from seerlike.methods.swav import SwAV

        return SwAV(cfg.method.swav, backbone)
    if cfg.method.name == "clusterfit":
        from seerlike.methods.clusterfit import ClusterFit

        return ClusterFit(cfg.method.clusterfit, backbone)
    if cfg.method.name == "distill":
        from seerlike.methods.distill import Distill

        return Distill(cfg.method.distill, backbone)
    from seerlike.methods.byol import BYOL

    return BYOL(cfg.method.byol, backbone)


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


def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, data=None) -> int:
    """Train on the ranks of the environment; returns 0, or REQUEUE_EXIT_CODE after a stop signal.

    ``data`` replaces the configured pipeline (tests); it must behave like ``TrainData``.
    """
    owns_group = not dist.is_initialized()  # a caller's process group is left to the caller
    info = init_distributed()
    if owns_group:
        setup_logging(info.rank)
    if cfg.loop.num_threads:
        torch.set_num_threads(cfg.loop.num_threads)
    try:
        return _train(cfg, Path(run_dir), info, data)
    except Exception:
        log.exception("training failed on rank %d", info.rank)
        raise
    finally:
        if owns_group:
            teardown()


def _train(cfg: TrainConfig, run_dir: Path, info: DistInfo, data) -> int:
    rank, world, device = info.rank, info.world_size, info.device
    loop = cfg.loop
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        configlib.dump(cfg, run_dir / "config.yaml")

    # ---------------------------------------------------------------- model, optimizer
    torch.manual_seed(loop.seed)  # identical init everywhere: FSDP2 shards local copies
    method = build_method(cfg)
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
    found = ckpt.find_latest()
    if found is not None:
        restored = ckpt.restore(found, model, optimizer, method=method, scaler=scaler)
        start, data_state, exact = restored.step, restored.data_state, restored.exact
    if not exact:  # fresh start (or a different world size): seeded per-rank RNG
        torch.manual_seed(loop.seed + 100_003 * (rank + 1))
        random.seed(loop.seed + 100_003 * (rank + 1))
    if data is None:
        from seerlike.data.pipeline import build_train_data

        data = build_train_data(cfg.data, rank=rank, world_size=world, seed=loop.seed, device=device)
    if data_state is not None:
        data.load_state_dict(data_state)
    if start >= loop.max_steps:
        log.info("run already at step %d of %d: nothing to do", start, loop.max_steps)
        return 0
    log.info("training %s/%s from step %d to %d on %d rank(s), global batch %d, %s, %s",
             cfg.method.name, cfg.model.name, start, loop.max_steps, world, global_batch,
             cfg.parallel.strategy, cfg.precision.dtype)

    # ---------------------------------------------------------------- the loop
    stop = StopRequest()
    metrics = MetricsLogger(run_dir, rank=rank, start_step=start, max_steps=loop.max_steps,
                            tensorboard=loop.tensorboard, progress=loop.progress)
    meter = Throughput()
    batches = _batches(data)
    skipped, saved_at, step = 0, start, start
    finished = False
    try:
        while step < loop.max_steps:
            lr = schedule.apply(optimizer, step)
            t_start = time.perf_counter()
            wait_s, images, loss_sum, stats = 0.0, 0, torch.zeros((), device=device), {}
            for micro in range(loop.grad_accum):
                t0 = time.perf_counter()
                batch = next(batches)
                views = batch.views
                wait_s += time.perf_counter() - t0
                if cfg.model.channels_last:
                    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                images += views[0].shape[0] * world
                last = micro == loop.grad_accum - 1
                with _grad_sync(model, last), autocast(cfg.precision, device):
                    # methods with uses_labels (ClusterFit) also get the batch's (pseudo-)labels
                    loss, stats = model(views, batch.labels) if getattr(method, "uses_labels", False) else model(views)
                scaled = loss / loop.grad_accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_sum += loss.detach().float()
            method.on_after_backward(step)

            # one small all-reduce: stop signal, mean loss, which ranks saw a non-finite loss
            finite = bool(torch.isfinite(loss_sum))
            flags = torch.zeros(2 + world, dtype=torch.float64, device=device)
            flags[0] = float(stop.signum != 0)
            flags[1] = loss_sum / loop.grad_accum if finite else 0.0
            flags[2 + rank] = 0.0 if finite else 1.0
            if world > 1:
                dist.all_reduce(flags)
            bad_ranks = [r for r in range(world) if flags[2 + r] > 0]
            if bad_ranks:
                if not loop.skip_nonfinite:
                    raise NonFiniteLoss(
                        f"non-finite loss at step {step} on rank(s) {bad_ranks} (this is rank {rank}); "
                        f"last good checkpoint: {ckpt.last_complete or 'none'}; "
                        f"lower optim.lr, use precision.dtype=bf16/fp32, or set loop.skip_nonfinite=true")
                skipped += 1
                log.warning("non-finite loss at step %d on rank(s) %s: step skipped (%d so far)", step, bad_ranks, skipped)
                optimizer.zero_grad(set_to_none=True)
            else:
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                method.on_step_end(step, loop.max_steps)
            step += 1
            meter.add(images, time.perf_counter() - t_start - wait_s, wait_s)
            metrics.advance()

            if step % loop.log_every == 0 or step == loop.max_steps:
                row = {"loss": float(flags[1]) / world, "lr": lr, **meter.summary(),
                       "peak_mem_mb": peak_memory_mb(device), "skipped_steps": skipped,
                       **{k: float(v) for k, v in stats.items()}}
                if scaler is not None:
                    row["loss_scale"] = scaler.get_scale()
                metrics.log(step, row)
                meter.reset()
            if step % cfg.checkpoint.every_steps == 0 or step == loop.max_steps or flags[0] > 0:
                ckpt.save(step, model, optimizer, method=method, scaler=scaler,
                          data_state=data.state_dict(), train_config=cfg)
                saved_at = step
            if flags[0] > 0 and step < loop.max_steps:
                ckpt.wait()
                log.warning("stop requested (signal): checkpoint at step %d written, exiting with %d",
                            saved_at, REQUEUE_EXIT_CODE)
                return REQUEUE_EXIT_CODE
        ckpt.wait()
        finished = True
        if flags[0] > 0:
            log.warning("stop requested during the last step: the run is finished (checkpoint at step %d), exiting 0",
                        step)
    finally:
        stop.close(finished=finished)
        metrics.close()
    log.info("done: %d steps, last checkpoint %s", step, ckpt.last_complete)
    return 0


def _batches(data):
    """Batches forever: a new pass over ``data`` whenever one ends."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the training data yielded no batch; check --data and data.batch_size")


def _grad_sync(model: nn.Module, sync: bool):
    """Skip the gradient reduction on all but the last micro-batch of an accumulated step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()

