"""A finished run exits 0, even when a stop signal (SIGTERM) reaches it in its last moments.

The signals are sent at fixed points through hooks, not after a sleep: a ``sitecustomize``
module on the children's path wraps ``seerlike.engine.loop.train`` (or the data iterator) in
every process, and the command itself is a small wrapper around ``seerlike.cli.main``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

HOOKS = r'''
import os, signal, time

MODE = os.environ.get("SEERLIKE_TEST_HOOK")

if MODE == "rank_after_loop" and "RANK" in os.environ:
    import seerlike.engine.loop as loop
    real_train = loop.train

    def wait_for(what, done, deadline_s=120):
        deadline = time.monotonic() + deadline_s
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"waited {deadline_s} s for {what}")
            time.sleep(0.01)

    def train(*args, **kwargs):
        code = real_train(*args, **kwargs)
        # the loop has returned: every rank holds SIGTERM (it stays pending) and says so with a file;
        # once all ranks hold it, rank 0 sends the launcher SIGTERM. Without that handshake a rank
        # still leaving train() when the launcher forwards would take the signal unblocked, then
        # wait for a second one that never comes.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        ready = os.environ["SEERLIKE_TEST_READY_DIR"]
        open(os.path.join(ready, f"rank{os.environ['RANK']}"), "w").close()
        if os.environ["RANK"] == "0":
            world = int(os.environ["WORLD_SIZE"])
            wait_for("every rank to hold SIGTERM",
                     lambda: all(os.path.exists(os.path.join(ready, f"rank{r}")) for r in range(world)))
            os.kill(os.getppid(), signal.SIGTERM)
        wait_for("the launcher to forward SIGTERM", lambda: signal.SIGTERM in signal.sigpending())
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        return code

    loop.train = train

if MODE == "last_step":
    from seerlike.data import pipeline
    real_iter = pipeline.TrainData.__iter__

    def batches(self):
        last = int(os.environ["MAX_STEPS"]) - 1
        for i, batch in enumerate(real_iter(self)):
            if i == last:  # SIGTERM while the last step fetches its batch
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    pipeline.TrainData.__iter__ = batches
'''

# `seerlike ...`, then one more SIGTERM to this process after the command returned, while it exits
WRAPPER = ("import os, signal, sys\n"
           "from seerlike.cli import main\n"
           "code = main(sys.argv[1:])\n"
           "os.kill(os.getpid(), signal.SIGTERM)\n"
           "sys.exit(code)\n")


def _subset_csv(cifar_dir: Path, out: Path, n: int = 48) -> Path:
    with open(cifar_dir / "train.csv") as f:
        rows = list(csv.DictReader(f))[::50][:n]
    out.write_text("path,label\n" + "".join(f"{(cifar_dir / r['path']).resolve()},{r['label']}\n" for r in rows))
    return out


def _run(tmp_path: Path, cifar_dir: Path, hook: str, nproc: int, steps: int = 3) -> tuple[subprocess.CompletedProcess, Path]:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOOKS)
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    (tmp_path / "ready").mkdir()
    env.update(SEERLIKE_TEST_HOOK=hook, MAX_STEPS=str(steps), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               SEERLIKE_TEST_READY_DIR=str(tmp_path / "ready"),
               PYTHONPATH=os.pathsep.join([str(hooks), str(ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-c", WRAPPER, "train", "--recipe", "tiny_swav", "--data",
           str(_subset_csv(cifar_dir, tmp_path / "sub.csv")), "--run-dir", str(run_dir), "--nproc", str(nproc),
           "--max-steps", str(steps), "optim.warmup_steps=1", "data.batch_size=8", "checkpoint.every_steps=100",
           "loop.progress=false", "loop.tensorboard=false"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return out, run_dir / "checkpoints" / f"step_{steps:08d}"


def test_sigterm_while_a_finished_two_rank_run_exits_gives_status_0(tmp_path, cifar_dir):
    out, final = _run(tmp_path, cifar_dir, "rank_after_loop", nproc=2)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (final / "COMPLETE").is_file()
    # both ranks got the forwarded SIGTERM after their loop, and the launcher its own after it returned
    assert out.stderr.count("caught SIGTERM after training finished") == 2, out.stderr[-4000:]
    assert out.stderr.count("caught SIGTERM after every rank finished") == 1, out.stderr[-4000:]


def test_sigterm_in_the_last_step_finishes_the_run_with_status_0(tmp_path, cifar_dir):
    out, final = _run(tmp_path, cifar_dir, "last_step", nproc=1)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (final / "COMPLETE").is_file() and not (final.parent / "step_00000002").exists()
    assert "stop requested during the last step: the run is finished" in out.stderr, out.stderr[-4000:]
    assert out.stderr.count("caught SIGTERM after training finished") == 1, out.stderr[-4000:]
