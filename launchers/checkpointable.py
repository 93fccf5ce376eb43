"""What runs inside a submitted job: one stage, checkpointable and requeued on preemption.

``StageJob(target, argv)`` is the pickled callable submitit runs on every task. ``target``
is a ``seerlike`` subcommand (``train``, ``extract``, ...) run in-process, or an importable
``"package.module:function"`` called as ``function(argv)`` (tests, custom stages).

Preemption and time limits. submitit asks Slurm to send ``USR2`` ``signal_delay_s`` before
the time limit, and ``job._interrupt()`` sends ``TERM`` then ``USR2`` (a preemption).
submitit's own handler would call ``checkpoint()`` from inside the signal handler, i.e. in
the middle of a training step, so this wrapper replaces it while the stage runs:

1. on ``USR2`` it calls the stage's ``SIGUSR1`` handler: the trainer then saves a checkpoint
   at the next step boundary and returns ``REQUEUE_EXIT_CODE`` (seerlike.engine.loop; ``SIGTERM``,
   sent first on preemption, does the same by itself). A stage with no Python ``SIGUSR1``
   handler (still starting, or not a trainer) is requeued at once, without a checkpoint, as
   submitit would;
2. when the stage returns ``REQUEUE_EXIT_CODE``, rank 0 writes the next submission
   (``checkpoint()``: the same stage with the requeue counter + 1) over the job's pickle and
   asks Slurm to requeue the job; the other ranks wait to be killed by the requeue;
3. the requeued job runs the same command; the trainer resumes from the newest complete
   checkpoint of its run dir.

At most ``max_requeues`` requeues; past that the job fails with a message saying how to
continue by hand. Every step is logged with the ``launchers.checkpointable`` logger, so the
job's stderr tells the whole story.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import submitit
from submitit.core import job_environment, utils

log = logging.getLogger(__name__)

#: Exit status of a local-executor task that asks to be restarted (submitit's convention).
LOCAL_REQUEUE_RETURN_CODE = 144
#: How long a non-zero rank waits for the requeue to kill it before giving up.
REQUEUE_WAIT_S = 300.0

_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class StageFailed(RuntimeError):
    """A stage returned a non-zero exit status."""


class MaxRequeuesReached(RuntimeError):
    """The job was preempted or timed out more often than ``max_requeues`` allows."""


def _export_dist_env() -> None:
    """Give the stage torchrun-style variables for this task (``init_distributed`` reads them).

    Variables inherited from the submitting shell (``sbatch --export=ALL``) must not win over
    the task's own identity, so they are replaced, not merely filled in.
    """
    env = submitit.JobEnvironment()
    _limit_threads(env)
    for k in _DIST_VARS:
        os.environ.pop(k, None)
    if env.cluster == "slurm":
        from seerlike.engine.dist import env_from_slurm

        os.environ.update(env_from_slurm())
    else:
        per_node = max(1, env.num_tasks // max(1, env.num_nodes))
        os.environ.update(
            RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
            LOCAL_WORLD_SIZE=str(per_node), MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            MASTER_PORT=os.environ.get("MASTER_PORT") or str(20000 + int(env.job_id) % 20000),
        )


def _limit_threads(env: submitit.JobEnvironment) -> None:
    """One intra-op thread pool per task sized to its CPUs (Slurm's cpus-per-task), not the node's.

    Without it every rank starts a thread per core of the node: the ranks oversubscribe the
    node, and the thread count (hence float summation order) changes with the node, which
    breaks bit-exact resume on a different machine.
    """
    if "OMP_NUM_THREADS" in os.environ:
        n = int(os.environ["OMP_NUM_THREADS"])
    else:
        per_node = max(1, env.num_tasks // max(1, env.num_nodes))
        n = int(os.environ.get("SLURM_CPUS_PER_TASK") or max(1, (os.cpu_count() or 1) // per_node))
        os.environ["OMP_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:  # already imported: the variable alone comes too late
        sys.modules["torch"].set_num_threads(n)


def _requeue_exit_code() -> int:
    """The trainer's checkpoint-and-stop exit status (imported when a stage runs: it pulls in torch)."""
    from seerlike.engine.loop import REQUEUE_EXIT_CODE

    return REQUEUE_EXIT_CODE


def run_target(target: str, argv: list[str]) -> Any:
    """Run a ``seerlike`` subcommand or a ``module:function`` in this process."""
    if ":" in target:
        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)(list(argv))
    from seerlike import cli

    if target not in cli.COMMANDS:
        raise ValueError(f"unknown stage {target!r}; choose a seerlike command ({', '.join(cli.COMMANDS)}) "
                         "or 'package.module:function'")
    code = cli.main([target, *argv])
    if code not in (0, _requeue_exit_code()):
        raise StageFailed(f"seerlike {target} exited with status {code}")
    return code


class StageJob(submitit.helpers.Checkpointable):
    """One stage as a submitit job: see the module docstring."""

    def __init__(self, target: str, argv: list[str] | tuple[str, ...] = (), *, max_requeues: int = 3,
                 env: dict[str, str] | None = None, done_marker: str | None = None,
                 marker_payload: dict | None = None):
        self.target = target
        self.argv = list(argv)
        self.max_requeues = max_requeues
        self.env = dict(env or {})
        self.done_marker = done_marker
        self.marker_payload = dict(marker_payload or {})
        self.requeues = 0
        self._stop_signal: int | None = None

    def __repr__(self) -> str:
        return f"StageJob({self.target!r}, {self.argv!r}, requeues={self.requeues}/{self.max_requeues})"

    # submitit calls this (possibly from its own USR2 handler) to get the next submission
    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        nxt = copy.copy(self)
        nxt.requeues = self.requeues + 1
        nxt._stop_signal = None
        log.info("checkpoint(): the requeued job will run %r (requeue %d of at most %d)",
                 self.target, nxt.requeues, self.max_requeues)
        return submitit.helpers.DelayedSubmission(nxt, *args, **kwargs)

    def __call__(self) -> Any:
        os.environ.update(self.env)
        _export_dist_env()
        env = submitit.JobEnvironment()
        if not logging.getLogger().handlers:
            from seerlike.logs import setup_logging

            setup_logging(rank=env.global_rank)
        log.info("%s: task %d/%d of job %s (Slurm restart count %s, %s threads)", self, env.global_rank,
                 env.num_tasks, env.job_id, os.environ.get("SLURM_RESTART_COUNT", "0"), os.environ["OMP_NUM_THREADS"])
        if self.requeues > self.max_requeues:
            raise MaxRequeuesReached(f"{self} was requeued more than max_requeues={self.max_requeues} times")
        self._stop_signal = None
        usr_sig = job_environment.JobEnvironment._usr_sig()
        previous = signal.signal(usr_sig, self._on_preempt_signal)
        try:
            result = run_target(self.target, self.argv)
        except BaseException:
            signal.signal(usr_sig, previous)
            raise
        if result == _requeue_exit_code():
            # Slurm's SIGTERM can stop the stage before submitit's USR2 arrives; that USR2 must
            # not reach submitit's own handler, which would requeue the job a second time
            signal.signal(usr_sig, self._on_late_signal)
            cause = signal.Signals(self._stop_signal).name if self._stop_signal else "a stop signal"
            log.warning("%s checkpointed and stopped after %s", self, cause)
            self._requeue_or_fail(env)
        signal.signal(usr_sig, previous)
        if self.done_marker and env.global_rank == 0:
            _write_marker(self.done_marker, {"target": self.target, "argv": self.argv, **self.marker_payload})
        log.info("%s finished", self)
        return result

    # ------------------------------------------------------------------ signals

    def _on_preempt_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum
        env = submitit.JobEnvironment()
        trainer_handler = signal.getsignal(signal.SIGUSR1)
        if callable(trainer_handler):
            log.warning("caught %s: asking the stage to checkpoint at its next step boundary (SIGUSR1)",
                        signal.Signals(signum).name)
            trainer_handler(signal.SIGUSR1, frame)
            return
        # nothing in the stage can checkpoint: requeue now, like submitit's own handler
        log.warning("caught %s and the stage has no SIGUSR1 handler: requeueing without a checkpoint",
                    signal.Signals(signum).name)
        self._requeue_or_fail(env)

    def _on_late_signal(self, signum: int, frame: Any) -> None:
        log.warning("caught %s after the stage had checkpointed and stopped: the job is requeued once, not again",
                    signal.Signals(signum).name)

    def _requeue_or_fail(self, env: submitit.JobEnvironment) -> None:
        if env.global_rank != 0:
            log.info("rank %d: waiting for rank 0 to requeue the job", env.global_rank)
            if env.cluster == "local":
                sys.exit(LOCAL_REQUEUE_RETURN_CODE)
            time.sleep(REQUEUE_WAIT_S)
            raise MaxRequeuesReached(f"rank {env.global_rank}: the job was not requeued within {REQUEUE_WAIT_S:.0f} s")
        if self.requeues >= self.max_requeues:
            raise MaxRequeuesReached(
                f"{self}: preempted/timed out after {self.requeues} requeues (max_requeues={self.max_requeues}); "
                "its last complete checkpoint is kept: submit the same command again to resume")
        paths = env.paths
        submitted = utils.DelayedSubmission.load(paths.submitted_pickle)
        nxt = self.checkpoint()
        nxt.set_timeout(submitted._timeout_min, submitted._timeout_countdown)
        with utils.temporary_save_path(paths.submitted_pickle) as tmp:
            nxt.dump(tmp)
        log.warning("requeueing job %s (requeue %d of at most %d)", env.job_id, self.requeues + 1, self.max_requeues)
        try:
            env._requeue(self.max_requeues - self.requeues - 1)
        except Exception as e:  # e.g. Slurm is already requeueing a preempted job itself
            log.error("scontrol requeue %s failed: %s", env.job_id, e)
        logging.shutdown()
        sys.exit(-1)  # not an Exception: submitit writes no result, the requeued run will


def _write_marker(path: str, payload: dict) -> None:
    """The stage's completion marker, written atomically (a pipeline skips stages that have one)."""
    from seerlike.storage import write_bytes

    write_bytes(path, (json.dumps({**payload, "finished_at": time.time()}, sort_keys=True) + "\n").encode())
