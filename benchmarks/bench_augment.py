"""Multi-crop augmentation throughput per core: ours vs a VISSL-style Pillow pipeline vs plain decode.

    python benchmarks/bench_augment.py [--repeats 5] [--batch 32] [--large 224 --small 96 --n-large 2 --n-small 6]
                                       [--baseline DIR] [--split-repeats 3]

On ../shared/data/photos (real photos, mean ~1.6 MP, JPEG + PNG), side by side in one run,
interleaved, medians over repeats, each timed pass right after a short untimed one of the
same pipeline. Rates are per core: images per CPU second of this process (torch and
everything else on one thread), so they hold on a shared machine.

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

``--baseline DIR`` also runs the ``seerlike/data/augment.py`` of another checkout (e.g. an
older commit, ``git archive COMMIT seerlike | tar -x -C DIR``) through the same pipelines,
interleaved with ours in the same process, so that the comparison sees the same machine load.

Then the host CPU time of one batch, every batch going through plain decode and each
implementation in turn (the figure least moved by other jobs on the machine), split into:
crop (decode + crops + stacking, the worker side), sampling (drawing the parameters and the
host-side planning of the ops: everything before a pixel is touched) and photometric (the
pixel ops); medians over the batches of ``--split-repeats`` passes, and plain decode's time
over each implementation's total: the per-core ratio. ``--ops`` counts the torch ops and the
host arrays sent to the device per photometric call in the accelerator form (on CPU), and
``--profile N`` breaks ours down per image: decode, crops, stacking, and the photometric ops
with parts of the recipe switched off.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import io
import math
import random
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageEnhance, ImageFilter

from seerlike.data import augment as ours_module
from seerlike.data.augment import IMAGENET_MEAN, IMAGENET_STD

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos"
SAMPLING = ("sample_photometric", "_plan", "_chunk_ops", "_jitter_segments")  # host-side, before the pixel ops


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


# ---------------------------------------------------------------- the pipelines


class Impl:
    """One ``augment.py`` (ours, or a baseline checkout's) with its multi-crop config and photometric half."""

    def __init__(self, mod: ModuleType, args: argparse.Namespace):
        self.mod = mod
        self.cfg = mod.swav_multicrop(args.large, args.small, args.n_large, args.n_small)
        self.photometric = mod.Photometric(self.cfg)
        grouped = len(inspect.signature(mod.stack_views).parameters) == 2  # per view group (cfg) or per view

        def stack(crops):
            return mod.stack_views(crops, self.cfg) if grouped else mod.stack_views(crops)
        self.stack = stack

    def crops(self, blobs: list[bytes], first: int):
        return self.stack([self.mod.crop_sample(d, str(first + i), self.cfg, 0, 0) for i, d in enumerate(blobs)])

    def run(self, blobs: list[bytes], batch: int, photometric: bool = True) -> None:
        for start in range(0, len(blobs), batch):
            views = self.crops(blobs[start:start + batch], start)
            if photometric:
                self.photometric(views, seed=0, epoch=0, step=start, rank=0)

    def split_batch(self, blobs: list[bytes], first: int) -> dict[str, float]:
        """Host CPU seconds of one batch: crop (decode + crops + stacking), sampling (draws + host
        planning, everything before a pixel is touched) and photometric (the pixel ops)."""
        spent = [0.0]
        depth = [0]
        originals = {name: getattr(self.mod, name) for name in SAMPLING if hasattr(self.mod, name)}

        def timed(fn):
            def wrapper(*a, **k):
                depth[0] += 1
                c0 = time.process_time()
                try:
                    return fn(*a, **k)
                finally:
                    depth[0] -= 1
                    if depth[0] == 0:  # outermost only: _plan calls _jitter_segments
                        spent[0] += time.process_time() - c0
            return wrapper

        try:
            for name, fn in originals.items():
                setattr(self.mod, name, timed(fn))
            c0 = time.process_time()
            views = self.crops(blobs, first)
            c1 = time.process_time()
            out = self.photometric(views, seed=0, epoch=0, step=first, rank=0)
            c2 = time.process_time()
            del out
        finally:
            for name, fn in originals.items():
                setattr(self.mod, name, fn)
        return {"crop": c1 - c0, "sampling": spent[0], "photometric": c2 - c1 - spent[0]}


def split(impls: dict[str, Impl], blobs: list[bytes], batch: int, repeats: int) -> dict[str, dict[str, float]]:
    """Every batch through plain decode and each implementation in turn, so that they see the same
    moment's machine load: median host CPU ms per full batch of each part, and per pass over all
    the images the time of plain decode over each implementation's (median over ``repeats`` passes)."""
    rows: dict[str, dict[str, list[float]]] = {"decode": {"decode": []}}
    rows.update({name: {"crop": [], "sampling": [], "photometric": [], "total": []} for name in impls})
    ratios: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(repeats):
        passed = {"decode": 0.0, **{name: 0.0 for name in impls}}
        for start in range(0, len(blobs), batch):
            part = blobs[start:start + batch]
            c0 = time.process_time()
            run_decode(part)
            spent = {"decode": {"decode": time.process_time() - c0}}
            for name, impl in impls.items():
                spent[name] = impl.split_batch(part, start)
                spent[name]["total"] = sum(spent[name].values())
            for name, parts in spent.items():
                passed[name] += parts.get("total", parts.get("decode"))
                if len(part) == batch:
                    for k, v in parts.items():
                        rows[name][k].append(v)
        for name in impls:
            ratios[name].append(passed["decode"] / passed[name])
    out = {name: {k: 1000 * statistics.median(v) for k, v in r.items()} for name, r in rows.items()}
    for name in impls:
        out[name]["vs_decode"] = statistics.median(ratios[name])
    return out


def profile(blobs: list[bytes], args: argparse.Namespace, repeats: int) -> dict[str, float]:
    """Where ours spends its CPU time per image (ms, minimum over ``repeats``): the worker side by step,
    and the photometric ops with parts of the recipe switched off (differences = the parts' cost)."""
    import dataclasses

    from seerlike.data import augment as aug

    cfg = aug.swav_multicrop(args.large, args.small, args.n_large, args.n_small)
    stored = [aug.decode_stored(d, cfg.min_decode_side()) for d in blobs]

    def per_image(fn) -> float:
        best = math.inf
        for _ in range(repeats):
            c0 = time.process_time()
            fn()
            best = min(best, time.process_time() - c0)
        return 1000 * best / len(blobs)

    def crops() -> list[list[torch.Tensor]]:
        return [aug.crop_views(img, cfg, np.random.default_rng(i), o) for i, (img, o) in enumerate(stored)]

    out = {"decode at reduced size": per_image(lambda: [aug.decode_stored(d, cfg.min_decode_side()) for d in blobs]),
           "8 crops (resize, flip, upright)": per_image(crops)}
    samples = crops()
    batches = [aug.stack_views(samples[i:i + args.batch], cfg) for i in range(0, len(samples), args.batch)]
    out["stacking per view group"] = per_image(
        lambda: [aug.stack_views(samples[i:i + args.batch], cfg) for i in range(0, len(samples), args.batch)])
    variants = {"photometric: normalise only": dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0),
                "photometric: + jitter, grayscale": dict(blur_p=0.0), "photometric: + blur (the recipe)": {}}
    for name, change in variants.items():
        ph = aug.Photometric(aug.AugmentConfig(views=[dataclasses.replace(v, **change) for v in cfg.views]))
        out[name] = per_image(lambda ph=ph: [ph(b, seed=0, epoch=0, step=i, rank=0) for i, b in enumerate(batches)])
    return out


def accelerator_ops(impls: dict[str, Impl], batches: tuple[int, ...]) -> dict[str, dict[int, tuple[int, int]]]:
    """Per implementation and batch size: torch ops dispatched and host arrays sent to the device
    (``torch.from_numpy`` calls) by one photometric call in its accelerator form, run here on CPU.
    Ours: ``every_row``; an older ``augment.py``: each view one chunk (what it did on CUDA)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    out: dict[str, dict[int, tuple[int, int]]] = {}
    for name, impl in impls.items():
        grouped = "every_row" in inspect.signature(impl.mod.Photometric).parameters
        saved = getattr(impl.mod, "CPU_CHUNK_BYTES", None)
        if not grouped:
            impl.mod.CPU_CHUNK_BYTES = 1 << 40
        ph = impl.mod.Photometric(impl.cfg, every_row=True) if grouped else impl.mod.Photometric(impl.cfg)
        out[name] = {}
        real_from_numpy = torch.from_numpy
        try:
            for b in batches:
                views = [torch.randint(0, 256, (v.count * b if grouped else b, 3, v.size, v.size), dtype=torch.uint8)
                         for v in (impl.cfg.views if grouped else impl.cfg.expanded())]
                ph(views, seed=0, epoch=0, step=0, rank=0)  # warm-up: workspace
                sent = [0]

                def counting(a, sent=sent):
                    sent[0] += 1
                    return real_from_numpy(a)
                torch.from_numpy = counting
                with Count() as c:
                    ph(views, seed=0, epoch=0, step=1, rank=0)
                torch.from_numpy = real_from_numpy
                out[name][b] = (c.ops, sent[0])
        finally:
            torch.from_numpy = real_from_numpy
            if saved is not None:
                impl.mod.CPU_CHUNK_BYTES = saved
    return out


def load_baseline(root: Path) -> ModuleType:
    """The ``seerlike/data/augment.py`` under ``root`` as a module of its own (it imports no other seerlike module)."""
    path = root / "seerlike" / "data" / "augment.py"
    spec = importlib.util.spec_from_file_location("baseline_augment", path)
    if spec is None or not path.is_file():
        raise SystemExit(f"--baseline {root}: no seerlike/data/augment.py there")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


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
    ap.add_argument("--baseline", type=Path, default=None, help="a checkout whose augment.py runs alongside ours")
    ap.add_argument("--split-repeats", type=int, default=3, help="passes for the per-batch split (0: skip it)")
    ap.add_argument("--ops", action="store_true",
                    help="count torch ops and host->device arrays per call in the accelerator form (batch 16, 64)")
    ap.add_argument("--profile", type=int, default=0, metavar="REPEATS",
                    help="also print where ours spends its time per image (minimum over REPEATS passes)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    files = sorted(p for p in DATA.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    blobs = [p.read_bytes() for p in files]
    mp = np.mean([np.prod(Image.open(io.BytesIO(b)).size) for b in blobs]) / 1e6
    impls = {"ours": Impl(ours_module, args)}
    if args.baseline is not None:
        impls["baseline"] = Impl(load_baseline(args.baseline), args)
    cfg = impls["ours"].cfg
    pipelines = {  # name -> run on a list of images
        "decode (full size, simplejpeg/Pillow)": run_decode,
        "reference (VISSL-style, Pillow per image)": lambda b: run_reference(b, cfg),
    }
    for name, impl in impls.items():
        pipelines[f"{name} (reduced decode + uint8 crops + batched photometric)"] = (
            lambda b, impl=impl: impl.run(b, args.batch))
        pipelines[f"{name}, worker side only (photometric on the accelerator)"] = (
            lambda b, impl=impl: impl.run(b, args.batch, photometric=False))
    rates = {k: [] for k in pipelines}
    walls = {k: [] for k in pipelines}
    for _ in range(args.repeats):
        for name, fn in pipelines.items():
            # a short untimed run first, so that the allocator and the caches hold this pipeline's
            # working set rather than the previous one's (fresh pages are costly here)
            fn(blobs[: args.batch])
            r, w = per_core(lambda: fn(blobs), len(blobs))
            rates[name].append(r)
            walls[name].append(w)
    med = {k: statistics.median(v) for k, v in rates.items()}
    names = list(pipelines)
    dec, ref = med[names[0]], med[names[1]]
    views = f"{args.n_large}x{args.large} + {args.n_small}x{args.small}"
    print(f"multi-crop {views} on {len(blobs)} images of {DATA} (mean {mp:.2f} MP), "
          f"medians of {args.repeats}, batch {args.batch}, 1 thread")
    print(f"{'pipeline':68s} {'img/s per core':>15s} {'(wall img/s)':>13s}")
    for k in pipelines:
        print(f"{k:68s} {med[k]:15.1f} {statistics.median(walls[k]):13.1f}")
    result = {"decode": dec, "reference": ref}
    for name in impls:
        full, worker = med[names[names.index(f'{name} (reduced decode + uint8 crops + batched photometric)')]], \
            med[f"{name}, worker side only (photometric on the accelerator)"]
        print(f"{name}: / reference = {full / ref:.2f}x (target >= 2); / full decode = {full / dec:.0%} "
              f"(target >= 85%); worker side only / full decode = {worker / dec:.0%}")
        result[name] = full
        result[f"{name}_worker"] = worker
    if args.split_repeats:
        res = split(impls, blobs, args.batch, args.split_repeats)
        dec = res["decode"]["decode"]
        print(f"\nhost CPU ms per batch of {args.batch}, each batch through every pipeline in turn "
              f"(medians over full batches x {args.split_repeats} passes); plain full decode {dec:.1f} ms; "
              f"/ decode: plain decode's time over the pipeline's, all images, median over passes")
        print(f"{'':10s} {'crop':>8s} {'sampling':>9s} {'photometric':>12s} {'total':>8s} {'/ decode':>9s}")
        for name in impls:
            r = res[name]
            print(f"{name:10s} {r['crop']:8.1f} {r['sampling']:9.2f} {r['photometric']:12.1f} {r['total']:8.1f} "
                  f"{r['vs_decode']:9.0%}")
        result["split"] = res
    if args.ops:
        result["ops"] = accelerator_ops(impls, (16, 64))
        print("\naccelerator form, per photometric call (batch: torch ops dispatched / host arrays sent to the device)")
        for name, per_batch in result["ops"].items():
            print(f"{name:10s} " + "   ".join(f"batch {b}: {o} / {h}" for b, (o, h) in per_batch.items()))
    if args.profile:
        print(f"\nours, CPU ms per image (minimum over {args.profile} passes)")
        result["profile"] = profile(blobs, args, args.profile)
        for k, v in result["profile"].items():
            print(f"  {k:40s} {v:6.3f}")
    return result


if __name__ == "__main__":
    main()
