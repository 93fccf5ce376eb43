"""Small importable stages for the launcher tests (submitit pickles them by reference).

The training tests run the real ``seerlike train``; these cover what needs no model: rank
wiring, arrays, dependency order, cancellation and multi-stage pipelines.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from seerlike.engine.dist import init_distributed, teardown


def world_info(argv: list[str]) -> dict:
    """Join the process group and report who we are plus an all-reduced number."""
    info = init_distributed()
    t = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(t)
    out = {"rank": info.rank, "world": info.world_size, "sum": float(t.item()), "argv": list(argv),
           "job": os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")}
    teardown()
    return out


def write_file(argv: list[str]) -> str:
    """``write_file PATH TEXT [SLEEP_S]``: append TEXT to PATH (dependency-order tests)."""
    path, text = argv[0], argv[1]
    if len(argv) > 2:
        time.sleep(float(argv[2]))
    with open(path, "a") as f:
        f.write(text + "\n")
    return text


def sleep_for(argv: list[str]) -> None:
    time.sleep(float(argv[0]))


def numbers_stage(argv: list[str]) -> int:
    """``numbers_stage OP --out DIR [--in DIR]``: a pipeline stage that reads the previous stage's output.

    make: writes [1..5]; square: squares the input list; total: sums it. Each writes
    ``OUT/data.json``; a missing input fails the stage like a real one would.
    """
    p = argparse.ArgumentParser()
    p.add_argument("op", choices=("make", "square", "total", "fail"))
    p.add_argument("--out", required=True)
    p.add_argument("--in", dest="inp")
    args = p.parse_args(argv)
    if args.op == "fail":
        raise RuntimeError("this stage fails on purpose")
    data = [1, 2, 3, 4, 5] if args.op == "make" else json.loads((Path(args.inp) / "data.json").read_text())
    if args.op == "square":
        data = [x * x for x in data]
    elif args.op == "total":
        data = [sum(data)]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "data.json").write_text(json.dumps(data))
    with open(Path(args.out).parent / "order.txt", "a") as f:
        f.write(args.op + "\n")
    return 0


def numbers_pipeline(dir: str, cluster: str, log_dir: str, square_op: str = "square") -> dict:
    """The pipeline both launcher tiers run: make -> square -> total under one folder."""
    return {
        "name": "numbers", "dir": dir,
        "submit": {"cluster": cluster, "log_dir": log_dir, "time": 5, "signal_delay_s": 30},
        "stages": [
            {"name": "make", "command": "tests.integration.launch_helpers:numbers_stage", "args": ["make", "--out", "{out}"]},
            {"name": "square", "command": "tests.integration.launch_helpers:numbers_stage",
             "args": [square_op, "--in", "{make}", "--out", "{out}"], "submit": {"tasks_per_node": 1}},
            {"name": "total", "command": "tests.integration.launch_helpers:numbers_stage",
             "args": ["total", "--in", "{square}", "--out", "{out}"]},
        ],
    }
