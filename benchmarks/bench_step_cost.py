"""Wall and CPU seconds per optimizer step of `seerlike train --nproc 2`, variants side by side.

Each variant runs twice from scratch, for ``--short`` and ``--long`` steps; the difference
over ``long - short`` steps cancels start-up, data set-up and the final checkpoint. CPU
seconds (user + sys of the launcher and its children) / 2 x 1.1 is what a step costs on 2
dedicated cores (1.1 for rank syncs), the figure `seerlike.quickstart.SECONDS_PER_STEP`
holds; wall seconds are what this machine gave. Medians over ``--repeats``; ratios against
the first variant.

    python benchmarks/bench_step_cost.py                     # the tiny_swav set-ups of docs/benchmarks.md
    python benchmarks/bench_step_cost.py --variants 'byol|--recipe tiny_byol' --repeats 2

A variant is ``name|seerlike arguments`` (the command, recipe and overrides, shell-quoted; the data,
run folder, --nproc 2, --max-steps and logging options are added). Run it alone on the
machine: other load changes wall time, and CPU time less so.
"""

from __future__ import annotations

import argparse
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-dev"

#: The comparison of docs/benchmarks.md, "24 px views, DDP without data workers, k 200": the tiny
#: recipes' set-up (DDP, the rank decodes) against a data worker per rank, FSDP2, and the earlier 32 px views.
DEFAULT_VARIANTS = [
    "ddp, no worker, 24 px|train --recipe tiny_swav",
    "ddp, 1 worker, 24 px|train --recipe tiny_swav data.num_workers=1",
    "fsdp, 1 worker, 24 px|train --recipe tiny_swav parallel.strategy=fsdp data.num_workers=1",
    "ddp, no worker, 32 px|train --recipe tiny_swav "
    """'data.augment.views=[{"count":2,"size":32,"scale":[0.25,1.0],"jitter":[0.4,0.4,0.4,0.1],"jitter_p":0.8,"grayscale_p":0.2,"blur_p":0.0}]'""",
]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed_run(args: list[str], data: str, run_dir: Path, steps: int) -> tuple[float, float]:
    """(wall s, CPU s) of one fresh `seerlike ...` run of ``steps`` steps."""
    command, rest = args[0], args[1:]
    options = [a for a in rest if "=" not in a or a.startswith("-")]
    overrides = [a for a in rest if a not in options]
    argv = [sys.executable, "-m", "seerlike", command, *options, "--data", data, "--run-dir", str(run_dir),
            "--nproc", "2", "--max-steps", str(steps), *overrides, "optim.warmup_steps=1", "checkpoint.every_steps=100000",
            "loop.tensorboard=false", "loop.progress=false", "loop.log_every=20"]
    cpu0, t0 = _children_cpu(), time.monotonic()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    wall, cpu = time.monotonic() - t0, _children_cpu() - cpu0
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed:\n{done.stderr[-3000:]}")
    return wall, cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, help="'name|seerlike arguments' each")
    p.add_argument("--data", help="shards to train on (default: cifar10-dev train, ingested into a temporary folder)")
    p.add_argument("--short", type=int, default=20)
    p.add_argument("--long", type=int, default=220)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.data:  # shards, as the quickstart trains on
            args.data = f"{tmp}/ds"
            subprocess.run([sys.executable, "-m", "seerlike", "ingest", str(CIFAR / "train"), "--out", args.data,
                            "--no-progress", "shard_max_samples=200"], cwd=ROOT, check=True, capture_output=True)
        for i, variant in enumerate(args.variants):
            name, _, command = variant.partition("|")
            walls, cpus = [], []
            for r in range(args.repeats):
                w0, c0 = timed_run(shlex.split(command), args.data, Path(tmp) / f"{i}_{r}_s", args.short)
                w1, c1 = timed_run(shlex.split(command), args.data, Path(tmp) / f"{i}_{r}_l", args.long)
                walls.append((w1 - w0) / (args.long - args.short))
                cpus.append((c1 - c0) / (args.long - args.short))
            rows.append((name, statistics.median(walls), statistics.median(cpus)))
            print(f"{name}: wall {', '.join(f'{w:.3f}' for w in walls)} s/step, CPU "
                  f"{', '.join(f'{c:.3f}' for c in cpus)} s/step", flush=True)
    base_wall, base_cpu = rows[0][1], rows[0][2]
    print(f"\nmedians of {args.repeats} repeat(s), steps {args.long} - {args.short}; ratios against '{rows[0][0]}'\n")
    print(f"{'variant':34} {'wall s/step':>11} {'CPU s/step':>10} {'budget s/step':>13} {'wall x':>7} {'CPU x':>6}")
    for name, wall, cpu in rows:
        print(f"{name:34} {wall:11.3f} {cpu:10.3f} {cpu / 2 * 1.1:13.3f} {wall / base_wall:7.2f} {cpu / base_cpu:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
