"""Multi-crop augmentation throughput per core: ours vs a VISSL-style Pillow pipeline vs plain decode.

    python benchmarks/bench_augment.py [--repeats 5] [--batch 32] [--large 224 --small 96 --n-large 2 --n-small 6]

On ../shared/data/photos (real photos, mean ~1.9 MP, JPEG + PNG), side by side in one run,
interleaved, medians over repeats. Rates are per core: images per CPU second of this
process (torch and everything else on one thread), so they hold on a shared machine.

- decode: plain full-size decode only (simplejpeg for JPEG, Pillow otherwise), the floor
  any pipeline that looks at every pixel of the full image pays;
- reference: per image the way VISSL's SwAV transforms do it: full-size Pillow decode, then
  per crop RandomResizedCrop, flip, ColorJitter (Pillow ImageEnhance + HSV hue shift, random
  order, p 0.8), RandomGrayscale (p 0.2), PIL ImageFilter.GaussianBlur (p 0.5), ToTensor +
  Normalize;
- ours: ``augment.crop_sample`` (reduced-size decode + uint8 crops, what a worker does) per
  image plus ``augment.Photometric`` over batches of ``--batch`` (what the training device
  does; here the same CPU core), and its worker side alone (what the CPU cores pay when
  the photometric ops run on a GPU).
"""

from __future__ import annotations

import argparse
import io
import math
import random
import statistics
import time
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageEnhance, ImageFilter

from seerlike.data.augment import IMAGENET_MEAN, IMAGENET_STD, Photometric, crop_sample, stack_views, swav_multicrop

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos"


# ---------------------------------------------------------------- the per-image reference


def _rrc_params(rng: random.Random, w: int, h: int, scale, ratio=(3 / 4, 4 / 3)):
    area = w * h
    for _ in range(10):
        t = area * rng.uniform(*scale)
        a = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(t * a))), int(round(math.sqrt(t / a)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch
    s = min(w, h)
    return (w - s) // 2, (h - s) // 2, s, s


def _hue(img: Image.Image, f: float) -> Image.Image:
    h, s, v = img.convert("HSV").split()
    arr = np.array(h, dtype=np.uint8)
    arr += np.uint8(int(f * 255) % 256)  # torchvision's PIL hue: shift the H channel modulo 256
    return Image.merge("HSV", (Image.fromarray(arr, "L"), s, v)).convert("RGB")


def reference_one(data: bytes, views, rng: random.Random) -> list[torch.Tensor]:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    out = []
    for v in views:
        x, y, w, h = _rrc_params(rng, img.width, img.height, v.scale)
        crop = img.resize((v.size, v.size), Image.BILINEAR, box=(x, y, x + w, y + h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < v.jitter_p:
            b, c, s, hh = v.jitter
            ops = [lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(1 - b, 1 + b)),
                   lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(1 - c, 1 + c)),
                   lambda im: ImageEnhance.Color(im).enhance(rng.uniform(1 - s, 1 + s)),
                   lambda im: _hue(im, rng.uniform(-hh, hh))]
            rng.shuffle(ops)
            for op in ops:
                crop = op(crop)
        if rng.random() < v.grayscale_p:
            crop = crop.convert("L").convert("RGB")
        if rng.random() < v.blur_p:
            crop = crop.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*v.blur_sigma)))
        t = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).float().div(255)
        out.append((t - mean) / std)
    return out


# ---------------------------------------------------------------- the three pipelines


def run_decode(blobs: list[bytes]) -> None:
    for d in blobs:
        if d[:2] == b"\xff\xd8":
            try:
                simplejpeg.decode_jpeg(d, colorspace="RGB")
                continue
            except ValueError:
                pass
        np.asarray(Image.open(io.BytesIO(d)).convert("RGB"))


def run_reference(blobs: list[bytes], cfg) -> None:
    rng = random.Random(0)
    views = cfg.expanded()
    for d in blobs:
        reference_one(d, views, rng)


def run_ours(blobs: list[bytes], cfg, batch: int, photometric: bool = True) -> None:
    ph = Photometric(cfg)
    for start in range(0, len(blobs), batch):
        crops = [crop_sample(d, str(start + i), cfg, 0, 0) for i, d in enumerate(blobs[start:start + batch])]
        views = stack_views(crops)
        if photometric:
            ph(views, seed=0, epoch=0, step=start, rank=0)


def per_core(fn, n: int) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return n / (time.process_time() - c0), n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--large", type=int, default=224)
    ap.add_argument("--small", type=int, default=96)
    ap.add_argument("--n-large", type=int, default=2)
    ap.add_argument("--n-small", type=int, default=6)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    files = sorted(p for p in DATA.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    blobs = [p.read_bytes() for p in files]
    mp = np.mean([np.prod(Image.open(io.BytesIO(b)).size) for b in blobs]) / 1e6
    cfg = swav_multicrop(args.large, args.small, args.n_large, args.n_small)
    pipelines = {
        "decode (full size, simplejpeg/Pillow)": lambda: run_decode(blobs),
        "reference (VISSL-style, Pillow per image)": lambda: run_reference(blobs, cfg),
        "ours (reduced decode + uint8 crops + batched photometric)": lambda: run_ours(blobs, cfg, args.batch),
        "ours, worker side only (photometric on the accelerator)": lambda: run_ours(blobs, cfg, args.batch, False),
    }
    rates = {k: [] for k in pipelines}
    walls = {k: [] for k in pipelines}
    run_ours(blobs[: args.batch], cfg, args.batch)  # warm-up (allocator, kernels)
    for _ in range(args.repeats):
        for name, fn in pipelines.items():
            r, w = per_core(fn, len(blobs))
            rates[name].append(r)
            walls[name].append(w)
    med = {k: statistics.median(v) for k, v in rates.items()}
    dec, ref, ours, worker = (med[k] for k in pipelines)
    views = f"{args.n_large}x{args.large} + {args.n_small}x{args.small}"
    print(f"multi-crop {views} on {len(blobs)} images of {DATA} (mean {mp:.2f} MP), "
          f"medians of {args.repeats}, batch {args.batch}, 1 thread")
    print(f"{'pipeline':60s} {'img/s per core':>15s} {'(wall img/s)':>13s}")
    for k in pipelines:
        print(f"{k:60s} {med[k]:15.1f} {statistics.median(walls[k]):13.1f}")
    print(f"ours / reference = {ours / ref:.2f}x (target >= 2)")
    print(f"ours / full decode = {ours / dec:.0%} (target >= 60%)")
    print(f"ours, worker side only / full decode = {worker / dec:.0%}")
    return {"decode": dec, "reference": ref, "ours": ours, "worker": worker}


if __name__ == "__main__":
    main()
