"""Ingest throughput per core vs the decode + resize + encode floor, and the 1 -> 2 worker speed-up.

    python benchmarks/bench_ingest.py [--repeats 3] [--cifar-limit 5000]

For ../shared/data/photos and the cifar10-dev train images, measured side by side in one
run (interleaved, medians over repeats):

- floor: decode + resize + encode alone, on bytes already in memory, with the very calls
  the ingest uses (simplejpeg reduced-size decode for JPEG, Pillow otherwise, Pillow
  bicubic resize, simplejpeg encode) and nothing else;
- ingest: the whole `sharding.ingest.ingest` (listing, file reads, sha256, validation,
  EXIF, keep-original shortcut, tar shards, parquet parts, merge, summary), workers=1,
  and again with keep_original=false (every image re-encoded, like the floor).

Rates are per core: images / CPU seconds of the process (all its threads), so the numbers
hold on a machine shared with other jobs; wall-clock rates are printed beside them.
The worker table runs photos + cifar (photos spread evenly) in 8 chunks with workers=1 and
workers=2: wall time end to end (plan, worker start-up, chunks, merge) and the CPU seconds
spent inside the chunks (from the done markers).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import simplejpeg
from PIL import Image

from sharding.config import IngestConfig
from sharding.ingest import ingest
from sharding.process import encode_jpeg, resize, target_size, to_rgb

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def floor_one(data: bytes, short_side: int, quality: int) -> bytes:
    im = Image.open(io.BytesIO(data))
    tw, th = target_size(*im.size, short_side)
    if im.format == "JPEG" and im.mode in ("RGB", "L"):
        out = Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=tw, min_height=th))
    else:
        if im.format == "JPEG":
            im.draft(None, (tw, th))
        im.load()
        out = to_rgb(im)
    return encode_jpeg(resize(out, (tw, th)), quality)


def measure_floor(blobs: list[bytes], cfg: IngestConfig) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of decode + resize + encode over all blobs."""
    c0, t0 = time.process_time(), time.perf_counter()
    for data in blobs:
        floor_one(data, cfg.resize_short_side, cfg.jpeg_quality)
    return time.process_time() - c0, time.perf_counter() - t0


def measure_ingest(listing: Path, cfg: IngestConfig) -> tuple[float, float, dict]:
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as out:
        c0, t0 = time.process_time(), time.perf_counter()
        summary = ingest(cfg.replace(inputs=(str(listing),), out=out))
        cpu = time.process_time() - c0  # workers=1: everything runs in this process
        return cpu, time.perf_counter() - t0, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cifar-limit", type=int, default=5000)
    args = ap.parse_args()

    photos = sorted(p for p in (DATA / "photos").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    cifar = sorted((DATA / "cifar10-dev" / "train").rglob("*.jpg"))[: args.cifar_limit]
    with tempfile.TemporaryDirectory(prefix="bench-ingest-lists-") as tmp:
        run(photos, cifar, Path(tmp), args.repeats)


def run(photos: list[Path], cifar: list[Path], tmp: Path, repeats: int) -> None:
    base = IngestConfig(progress=False, workers=1)
    rows = []
    for name, files in (("photos", photos), ("cifar10-dev train", cifar)):
        listing = tmp / f"{name.split()[0]}.txt"
        listing.write_text("\n".join(map(str, files)) + "\n")
        blobs = [p.read_bytes() for p in files]
        measure_floor(blobs, base)  # warm-up: page cache, imports, allocator
        n_written = measure_ingest(listing, base)[2]["written"]
        res: dict[str, list[tuple[float, float]]] = {"floor": [], "ingest": [], "ingest_reencode": []}
        for _ in range(repeats):  # interleaved, so load changes hit all three alike
            res["floor"].append(measure_floor(blobs, base))
            res["ingest"].append(measure_ingest(listing, base)[:2])
            res["ingest_reencode"].append(measure_ingest(listing, base.replace(keep_original=False))[:2])
        med = {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in res.items()}
        n = len(files)
        rows.append((name, n, n_written, med))

    print(f"\n## Ingest throughput per core (median of {repeats}; resize_short_side=512, q90)\n")
    print("| images | n (written) | floor img/s/core (wall) | ingest img/s/core (wall) | ingest/floor | ingest, keep_original=false (wall) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, n, nw, med in rows:
        f, i, r = (n / med[k][0] for k in ("floor", "ingest", "ingest_reencode"))
        fw, iw, rw = (n / med[k][1] for k in ("floor", "ingest", "ingest_reencode"))
        print(f"| {name} | {n} ({nw}) | {f:.1f} ({fw:.1f}) | {i:.1f} ({iw:.1f}) | {i / f:.2f} | {r:.1f} ({rw:.1f}) | {r / f:.2f} |")

    listing = tmp / "both.txt"
    # photos spread evenly through cifar, so the 8 chunks carry similar work
    spread = [((i + 0.5) / len(group), str(p)) for group in (photos, cifar) for i, p in enumerate(group)]
    both = [p for _, p in sorted(spread)]
    listing.write_text("\n".join(map(str, both)) + "\n")
    chunk = -(-len(both) // 8)
    walls: dict[int, list[float]] = {1: [], 2: []}
    cpus: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for w in (1, 2):
            _, wall, summary = measure_ingest(listing, base.replace(workers=w, chunk_size=chunk))
            walls[w].append(wall)
            cpus[w].append(summary["chunk_cpu_seconds"])
    w1, w2 = statistics.median(walls[1]), statistics.median(walls[2])
    load = os.getloadavg()[0]
    print(f"\n## Workers (photos + cifar, {len(both)} images in 8 chunks; median of {repeats}; "
          f"{os.cpu_count()} cores, load average {load:.1f})\n")
    print("| workers | wall s | img/s | chunk CPU s | speed-up |")
    print("|---|---|---|---|---|")
    for w, wall in ((1, w1), (2, w2)):
        print(f"| {w} | {wall:.2f} | {len(both) / wall:.1f} | {statistics.median(cpus[w]):.2f} | {w1 / wall:.2f} |")


if __name__ == "__main__":
    main()
