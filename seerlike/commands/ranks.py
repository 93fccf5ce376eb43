"""Start N local ranks of a command with torchrun's environment (``--nproc N`` of train/distill)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time

from seerlike.engine.loop import REQUEUE_EXIT_CODE

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], nproc: int) -> int:
    """Run ``argv`` as ``nproc`` ranks; if one fails, stop the others.

    SIGTERM/SIGUSR1 sent to the launcher are forwarded to every rank (they checkpoint and
    exit with REQUEUE_EXIT_CODE). The launcher returns the first non-zero exit status. Once
    every rank has exited 0 the run is finished: SIGTERM/SIGUSR1 are then only logged, for the
    rest of this process, so that one arriving while it exits does not turn it into status 143.
    """
    base = dict(os.environ, WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()))
    if "OMP_NUM_THREADS" not in base:
        base["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    procs = [subprocess.Popen(argv, env=dict(base, RANK=str(r), LOCAL_RANK=str(r))) for r in range(nproc)]

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    def after_finish(signum, _frame):
        log.warning("caught %s after every rank finished: nothing left to stop, exiting normally",
                    signal.Signals(signum).name)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    finished = False
    try:
        status = 0
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed and status == 0:
                status = failed[0][1]
                if status != REQUEUE_EXIT_CODE:
                    log.error("rank %d exited with status %d; stopping the other ranks", *failed[0])
                    _stop(procs)
            if all(c is not None for c in codes):
                finished = status == 0
                return status if status >= 0 else 128 - status
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, after_finish if finished and s != signal.SIGINT else h)


def _stop(procs: list[subprocess.Popen]) -> None:
    # SIGKILL, not SIGTERM: SIGTERM asks a rank for a checkpoint, which needs the dead peer;
    # whatever the survivors were writing stays invisible (no COMPLETE marker)
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()
