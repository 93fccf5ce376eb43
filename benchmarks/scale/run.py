"""Peak memory and time of every corpus-wide step at 1M / 10M / 100M synthetic rows.

    python -m benchmarks.scale.run prepare 1M              # corpus under $SCALE_DIR/1M (default /tmp/seerlike-scale)
    python -m benchmarks.scale.run measure merge 1M --tag after
    python -m benchmarks.scale.run table                   # results/*.jsonl -> the docs/scale.md table

``prepare`` writes what the steps read (see ``corpus.py``): the listing, an ingest output
whose chunks are done, its merged manifest, a features directory and pseudo-labels.
``measure`` runs one step in a child process under ``nice`` and records the child's peak
RSS (``wait4``), its RSS when the step started (imports done, inputs opened) and the wall
time; measurements run one at a time, so the machine's other load is the only noise.
Results append to ``benchmarks/scale/results/TAG.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.scale import corpus

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def scale_dir() -> Path:
    return Path(os.environ.get("SCALE_DIR", "/tmp/seerlike-scale"))


def prepare(size: str, what: list[str]) -> Path:
    n = corpus.size_of(size)
    spec = corpus.Spec(n=n)
    root = scale_dir() / size
    root.mkdir(parents=True, exist_ok=True)
    (root / "size.json").write_text(json.dumps({"n": n, "size": size}))
    for item in what:
        t0 = time.perf_counter()
        if item == "listing":
            corpus.write_listing(spec, root / "listing.parquet")
        elif item == "ingest":
            corpus.write_ingest_output(spec, root / "ingest")
        elif item == "merged":
            run_step("merge", root)  # the manifest the readers read is the merge's own output
        elif item == "features":
            corpus.write_features(spec, root / "features")
            run_step("feature_index", root)
        elif item == "labels":
            corpus.write_pseudo_labels(spec, root / "cluster")
        else:
            raise SystemExit(f"unknown item {item!r}")
        print(f"{size} {item}: {time.perf_counter() - t0:.1f}s", flush=True)
    return root


def run_step(step: str, root: Path, timeout: float = 3600) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = ["nice", "-n", "10", sys.executable, "-m", "benchmarks.scale.steps", step, str(root), str(result)]
        # SCALE_CODE: the checkout whose code is measured (e.g. an export of an older commit)
        code = os.environ.get("SCALE_CODE", str(REPO))
        env = {**os.environ, "PYTHONPATH": f"{code}:{REPO}", "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=code, env=env)  # python -m puts the cwd first on the path
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"step {step} on {root} failed with exit code {proc.returncode}")
        got = json.loads(result.read_text())
    peak = usage.ru_maxrss * 1024
    return {**got, "peak_rss": peak, "growth_rss": peak - got["start_rss"], "wall": wall}


def measure(step: str, size: str, tag: str) -> dict:
    root = scale_dir() / size
    got = run_step(step, root)
    row = {"step": step, "size": size, "n": corpus.size_of(size), "tag": tag, **got}
    out = HERE / "results" / f"{tag}.jsonl"
    out.parent.mkdir(exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


# ---------------------------------------------------------------- the table


def load(tag: str) -> dict[tuple[str, int], dict]:
    """Last measurement per (step, n) of a tag."""
    rows = {}
    path = HERE / "results" / f"{tag}.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            rows[(r["step"], r["n"])] = r
    return rows


def exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(value) on log(n): 1.0 is linear growth, 0 is constant."""
    pts = [(math.log(n), math.log(v)) for n, v in points if v > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


def extrapolate(points: list[tuple[int, float]], n: int = 10**9) -> float | None:
    """Value at ``n``: a straight line through the two largest sizes (a + b N, b >= 0).

    A step's cost is a fixed part plus a part per row, and a power law through that sum
    understates the per-row part (the fixed part flattens the small sizes); the line keeps
    it. Steps growing faster than N (fitted exponent above 1.2) follow their power law.
    """
    if len(points) < 2:
        return None
    b = exponent(points)
    (n1, v1), (n2, v2) = sorted(points)[-2:]
    if b is not None and b > 1.2:
        return v2 * (n / n2) ** min(b, 2.0)
    return v2 + max((v2 - v1) / (n2 - n1), 0.0) * (n - n2)


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if abs(b) >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{max(b, 0) / 1e6:.2g} MB"


def fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 86400:
        return f"{s / 86400:.3g} d"
    if s >= 3600:
        return f"{s / 3600:.3g} h"
    if s >= 60:
        return f"{s / 60:.3g} min"
    return f"{s:.3g} s"


def machine(mem_1b: float | None) -> str:
    """What one process of the step needs at a billion rows."""
    if mem_1b is None:
        return "-"
    if mem_1b <= 4e9:
        return "any node"
    if mem_1b <= 32e9:
        return "a 32 GB node"
    return f"**{mem_1b / 1e9:,.0f} GB: none**"


def table(tags: list[str]) -> str:
    """One row per (step, tag): memory growth (peak RSS - RSS at the step's start) and CPU time.

    CPU seconds, not wall time: the machine is shared, and its load changes the wall time
    of a single-threaded step but not its CPU time. Fits are least squares of log value on
    log N over the sizes measured; the 1B column extends the largest measurement along it.
    """
    sizes = sorted({n for tag in tags for (_, n) in load(tag)})
    names = " / ".join(k for k, v in corpus.SIZES.items() if v in sizes)
    lines = [f"| step | code | memory {names} | fit | at 1B | CPU time {names} | fit | at 1B | one process at 1B |",
             "|---|---|---|---|---|---|---|---|---|"]
    steps: list[str] = []
    for tag in tags:
        for step, _ in load(tag):
            if step not in steps:
                steps.append(step)
    for step in steps:
        for tag in tags:
            rows = {n: r for (s, n), r in load(tag).items() if s == step}
            if not rows:
                continue
            mem = [(n, max(rows[n]["growth_rss"], 1e6)) for n in sorted(rows)]
            tim = [(n, max(rows[n].get("cpu_seconds", rows[n]["seconds"]), 1e-3)) for n in sorted(rows)]

            def cells(pts, f):
                got = dict(pts)
                return " / ".join(f(got[n]) if n in got else "-" for n in sizes)

            bm, bt = exponent(mem), exponent(tim)
            m1b = extrapolate(mem)
            lines.append(f"| {step} | {tag} | {cells(mem, fmt_bytes)} | "
                         f"{'-' if bm is None else f'N^{bm:.2f}'} | {fmt_bytes(m1b)} | "
                         f"{cells(tim, fmt_s)} | {'-' if bt is None else f'N^{bt:.2f}'} | "
                         f"{fmt_s(extrapolate(tim))} | {machine(m1b)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale.run")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("size")
    p.add_argument("--what", default="listing,ingest,merged,features,labels")
    m = sub.add_parser("measure")
    m.add_argument("step")
    m.add_argument("size")
    m.add_argument("--tag", default="after")
    t = sub.add_parser("table")
    t.add_argument("--tags", default="before,after")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.size, args.what.split(","))
    elif args.cmd == "measure":
        from benchmarks.scale.steps import STEPS

        for step in args.step.split(","):
            if step not in STEPS:
                raise SystemExit(f"unknown step {step!r}; choose from {', '.join(STEPS)}")
            measure(step, args.size, args.tag)
    else:
        print(table(args.tags.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
