"""The device half of the augmentation (``augment.Photometric``) on a CUDA GPU vs one CPU thread.

    python benchmarks/bench_photometric_cuda.py [--batches 64 256] [--repeats 20]

SwAV multi-crop 2 x 224 + 6 x 96 and BYOL's 2 x 224 views, on uint8 crops as the workers
deliver them (random pixels: the cost does not depend on the content), side by side in one
run: images per second (all views of an image) on the GPU, medians over repeats after a
warm-up, and on one CPU thread (medians of 3), the way ``bench_augment.py`` measures it. The
host CPU time per GPU call shows whether the GPU path is bound by kernel launches and the
parameter sampling on the host rather than by the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seerlike.data.augment import Photometric, byol_views, swav_multicrop  # noqa: E402


def _rate(ph: Photometric, views: list[torch.Tensor], repeats: int) -> tuple[float, float]:
    """Images/s and the host's CPU seconds per call (medians; the first call warms up)."""
    cuda = views[0].is_cuda
    walls, cpus = [], []
    for step in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        ph(views, seed=0, epoch=0, step=step, rank=0)
        if cuda:
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return views[0].shape[0] / statistics.median(walls[1:]), statistics.median(cpus[1:])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.set_num_threads(1)
    configs = {"SwAV 2x224 + 6x96": swav_multicrop(224, 96, 2, 6), "BYOL 2x224": byol_views(224)}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; images/s (all views of an image)\n")
    print("| views | batch | GPU images/s | GPU: wall / host CPU ms per batch | 1 CPU thread images/s | GPU / CPU thread |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for name, cfg in configs.items():
        ph = Photometric(cfg)
        for batch in args.batches:
            views = [torch.randint(0, 256, (batch, 3, v.size, v.size), dtype=torch.uint8, generator=g)
                     for v in cfg.expanded()]
            cpu = _rate(ph, views, 3)[0] if batch == args.batches[0] else None
            gpu, host_s = _rate(ph, [v.cuda() for v in views], args.repeats)
            cpu_s = f"{cpu:.0f}" if cpu else "-"
            ratio = f"{gpu / cpu:.0f}x" if cpu else "-"
            print(f"| {name} | {batch} | {gpu:.0f} | {batch / gpu * 1000:.1f} / {host_s * 1000:.1f} | {cpu_s} | {ratio} |",
                  flush=True)


if __name__ == "__main__":
    main()
