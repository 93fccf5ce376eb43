"""Is the GPU fed? ``seerlike train`` images/s against the compute-only step, and the data-wait fraction.

    python benchmarks/gpu/bench_input_pipeline.py [--images 4096] [--steps 60] [--workers N] [--out DIR]

SwAV ResNet-50 multi-crop (2 x 224 + 6 x 96) and BYOL ResNet-50 (2 x 224), batch 64, bf16
autocast, channels_last, ``parallel.strategy=none`` (the fast one-GPU setting, docs/benchmarks.md
"Precision and memory format"), on JPEGs synthesised here (sides 224-500 px, quality 90:
a realistic decode load, unlike 32 px CIFAR images upscaled). Per method, three runs of the
engine's own loop (``seerlike.engine.loop.train``), each in a fresh process:

- compute: one fixed batch already on the GPU, fed every step (no data wait): the step alone;
- device augment: the configured pipeline (workers decode and cut uint8 crops, the
  photometric ops run on the GPU in the training process);
- cpu augment: the same workers, the photometric ops on the host CPU in the training
  process, then the float views are copied to the GPU.

Reported from ``metrics.jsonl`` after the first ``--warmup`` steps: images/s, their ratio to
compute (target >= 90%), and the data-wait fraction (target <= 5%). Writes ``results.json``
and ``results.md`` to ``--out`` (default ``$OUT``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

METHODS = {"swav": "swav_resnet50", "byol": "byol_resnet50"}
VARIANTS = ("compute", "device augment", "cpu augment")


def synthesise_jpegs(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` JPEGs with sides in [224, 500]: smooth colour fields, edges and noise (photo-like entropy)."""
    import simplejpeg
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = (int(s) for s in rng.integers(224, 501, 2))
        coarse = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC)).astype(np.int16)
        for _ in range(int(rng.integers(2, 6))):  # rectangles: hard edges
            x0, y0 = int(rng.integers(0, w - 16)), int(rng.integers(0, h - 16))
            img[y0:y0 + int(rng.integers(8, h // 2)), x0:x0 + int(rng.integers(8, w // 2))] = rng.integers(0, 256, 3)
        img += rng.normal(0, 6, img.shape).astype(np.int16)  # sensor-like noise
        data = simplejpeg.encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), quality=90, colorspace="RGB")
        (folder / f"{i:06d}.jpg").write_bytes(data)


def _config(method: str, source: str, args: argparse.Namespace):
    from seerlike import config, recipes

    return config.apply_overrides(recipes.get(METHODS[method]), [
        f"data.source={source}", f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
        f"data.prefetch_factor={args.prefetch}", "precision.dtype=bf16", "model.channels_last=true",
        "parallel.strategy=none", f"loop.max_steps={args.steps}", "loop.log_every=10", "loop.progress=false",
        "loop.tensorboard=false", "optim.warmup_steps=0", "checkpoint.every_steps=1000000",
        *([f"model.name={args.model}"] if args.model else [])])


class _FixedBatch:
    """One batch of random views on the GPU, every step: the compute-only step."""

    def __init__(self, views):
        self.views = views

    def __iter__(self):
        while True:
            yield SimpleNamespace(views=self.views, labels=None, keys=[])

    def state_dict(self):
        return {}

    def load_state_dict(self, _):
        pass


class _HostAugmented:
    """The configured pipeline with its photometric ops on the host CPU, views copied to ``device`` after."""

    def __init__(self, data, device):
        self.data, self.device = data, device

    def __iter__(self):
        for b in self.data:
            yield SimpleNamespace(views=[v.to(self.device, non_blocking=True) for v in b.views], labels=None,
                                  keys=b.keys)

    def state_dict(self):
        return self.data.state_dict()

    def load_state_dict(self, state):
        self.data.load_state_dict(state)


def run_one(method: str, variant: str, source: str, run_dir: str, args: argparse.Namespace) -> None:
    """One training run in this process (the child of ``main``)."""
    import torch

    from seerlike.data.pipeline import build_train_data
    from seerlike.engine.loop import train

    cfg = _config(method, source, args)
    dev = torch.device(args.device)
    data = None
    if variant == "compute":
        sizes = [v.size for v in cfg.data.augment.expanded()]
        data = _FixedBatch([torch.randn(cfg.data.batch_size, 3, s, s, device=dev) for s in sizes])
    elif variant == "cpu augment":
        data = _HostAugmented(build_train_data(cfg.data, seed=cfg.loop.seed, device="cpu"), dev)
    train(cfg, run_dir, data=data)


def summarise(run_dir: Path, warmup: int) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["step"] > warmup] or rows[-1:]
    return {"images_per_s": statistics.mean(r["images_per_s"] for r in rows),
            "data_wait_frac": statistics.mean(r["data_wait_frac"] for r in rows),
            "step_time_s": statistics.mean(r["step_time_s"] for r in rows),
            "peak_mem_mb": max(r["peak_mem_mb"] for r in rows), "steps_measured": 10 * len(rows)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4096, help="synthesised JPEGs")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the figures")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/seerlike-gpu")))
    ap.add_argument("--timeout", type=int, default=240, help="seconds per run")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--model", default="", help="backbone instead of the recipe's (smoke tests)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (every variant on the CPU)")
    ap.add_argument("--child", nargs=4, metavar=("METHOD", "VARIANT", "SOURCE", "RUN_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_one(*args.child, args)
        return {}
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "child")}}
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "jpegs"
        synthesise_jpegs(source, args.images)
        for method in args.methods:
            for variant in VARIANTS:
                run_dir = Path(tmp) / f"{method}-{variant.replace(' ', '-')}"
                cmd = [sys.executable, __file__, "--child", method, variant, str(source), str(run_dir),
                       *(a for k in ("steps", "workers", "prefetch", "batch", "model", "device")
                         for a in (f"--{k}", str(getattr(args, k))))]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                    ok = proc.returncode == 0
                    log = proc.stdout[-3000:] + proc.stderr[-3000:]
                except subprocess.TimeoutExpired as e:
                    ok, log = False, f"timed out after {args.timeout} s: {e}"
                (args.out / f"{run_dir.name}.log").write_text(log)
                results[f"{method}/{variant}"] = summarise(run_dir, args.warmup) if ok else {"error": log[-500:]}
                print(method, variant, results[f"{method}/{variant}"], flush=True)
    lines = [f"| method (batch {args.batch}, bf16, channels_last) | variant | images/s | vs compute | data wait "
             "| step s |",
             "|---|---|---|---|---|---|"]
    for method in args.methods:
        base = results[f"{method}/compute"].get("images_per_s")
        for variant in VARIANTS:
            r = results[f"{method}/{variant}"]
            if "error" in r:
                lines.append(f"| {METHODS[method]} | {variant} | failed | | | |")
                continue
            ratio = f"{r['images_per_s'] / base:.0%}" if base else "-"
            lines.append(f"| {METHODS[method]}{f' ({args.model})' if args.model else ''} | {variant} "
                         f"| {r['images_per_s']:.{0 if r['images_per_s'] >= 100 else 1}f} | {ratio} "
                         f"| {r['data_wait_frac']:.1%} | {r['step_time_s']:.3f} |")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
