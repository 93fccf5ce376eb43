"""Shard streaming from S3 (loopback server) vs local disk, and the data-wait fraction of a step.

    python benchmarks/bench_stream.py [--repeats 5] [--copies 3] [--step-ms 180]

Part 1, side by side in one run (interleaved, medians over repeats): the same WebDataset
shards (the real photos of ../shared/data/photos, ``--copies`` times, ~1 MB per sample,
and the cifar10-dev train images, ~1 KB per sample) read from local disk and from a moto S3
server in its own process on 127.0.0.1, through the reader the trainer uses
(``shards.shard_records``: one streaming GET per shard read ahead in a thread, tar
parsing), once with what a worker does per sample (reduced-size decode + SwAV crops) and
once records only (no decode: the raw I/O ceiling). Samples/s and MB/s, S3 / local.

Part 2: the data-wait fraction of training steps. ``TrainData`` over the cifar shards with
the tiny_swav views (2 x 32 px) at batch 128, one worker, while the "step" sleeps
``--step-ms`` (the measured CPU step of the tiny recipe, ResNet-10 at 711 img/s); the
fraction of wall time spent waiting for the next batch. Also the loader's ceiling (batches
per second with a zero-time step).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from seerlike import storage
from seerlike.data import DataConfig, build_train_data
from seerlike.data.augment import AugmentConfig, ViewConfig, crop_sample, swav_multicrop
from seerlike.data.shards import ShardReaderOptions, shard_records
from seerlike.data.sources import count_tar

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
from tests.data_fixtures import write_shards  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def read_all(urls: list[str], counts: list[int], endpoint: str | None, decode: bool) -> tuple[int, int, float]:
    opts = ShardReaderOptions(endpoint_url=endpoint)
    cfg = swav_multicrop()
    n = nbytes = 0
    t0 = time.perf_counter()
    for url, c in zip(urls, counts):
        for rec in shard_records(url, c, 0, opts):
            n += 1
            nbytes += len(rec.data or b"")
            if decode:
                crop_sample(rec.data, rec.key, cfg, 0, 0)
    return n, nbytes, time.perf_counter() - t0


def streaming(tmp: Path, repeats: int, copies: int) -> None:
    photos = sorted(p for p in (DATA / "photos").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    cifar = sorted((DATA / "cifar10-dev" / "train").rglob("*.jpg"))
    sets = {"photos": write_shards(photos * copies, tmp / "photos", 32),
            "cifar": write_shards(cifar, tmp / "cifar", 1000)}
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    proc, endpoint = start_s3()
    try:
        storage.s3_client(endpoint).create_bucket(Bucket="bench")
        remote = {}
        for name, paths in sets.items():
            remote[name] = []
            for p in paths:
                url = f"s3://bench/{name}/{p.name}"
                storage.put_file(p, url, endpoint_url=endpoint)
                remote[name].append(url)
        print(f"shards: photos x{copies} ({len(sets['photos'])} shards, "
              f"{sum(p.stat().st_size for p in sets['photos']) / 1e6:.0f} MB), "
              f"cifar ({len(sets['cifar'])} shards, {sum(p.stat().st_size for p in sets['cifar']) / 1e6:.1f} MB); "
              f"moto S3 server in its own process on loopback; medians of {repeats}")
        print(f"{'shards':8s} {'consumer':28s} {'where':6s} {'samples/s':>10s} {'MB/s':>8s} {'s3/local':>9s}")
        for name, paths in sets.items():
            counts = [count_tar(str(p)) for p in paths]
            for decode in (True, False):
                rates = {"local": [], "s3": []}
                mbs = {"local": [], "s3": []}
                for _ in range(repeats):
                    for where, urls, ep in (("local", [str(p) for p in paths], None), ("s3", remote[name], endpoint)):
                        n, nbytes, dt = read_all(urls, counts, ep, decode)
                        rates[where].append(n / dt)
                        mbs[where].append(nbytes / dt / 1e6)
                ratio = statistics.median(rates["s3"]) / statistics.median(rates["local"])
                what = "decode + 2x224/6x96 crops" if decode else "records only (no decode)"
                for where in rates:
                    r = f"{ratio:9.0%}" if where == "s3" else ""
                    print(f"{name:8s} {what:28s} {where:6s} {statistics.median(rates[where]):10.0f} "
                          f"{statistics.median(mbs[where]):8.1f} {r}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def data_wait(tmp: Path, step_ms: float, steps: int) -> None:
    shards = sorted((tmp / "cifar").glob("*.tar"))
    views = AugmentConfig(views=[ViewConfig(count=2, size=32, scale=(0.14, 1.0), jitter=(0.4, 0.4, 0.4, 0.1))])
    cfg = DataConfig(source=str(tmp / "cifar" / f"{{000000..{len(shards) - 1:06d}}}.tar"), batch_size=128,
                     num_workers=1, augment=views)
    print(f"\ndata wait: cifar shards, 2 x 32 px views, batch 128, 1 worker, {steps} steps")
    print(f"{'step':>22s} {'wait fraction':>14s} {'batches/s':>10s}")
    for label, sleep_s in ((f"{step_ms:.0f} ms (tiny recipe)", step_ms / 1000), ("0 ms (loader ceiling)", 0.0)):
        data = build_train_data(cfg, seed=0)
        it = iter(data)
        next(it)  # worker start-up is not a step
        wait = 0.0
        t0 = time.perf_counter()
        for _ in range(steps):
            w0 = time.perf_counter()
            next(it)
            wait += time.perf_counter() - w0
            time.sleep(sleep_s)
        total = time.perf_counter() - t0
        print(f"{label:>22s} {wait / total:14.1%} {steps / total:10.2f}")
        del it


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--step-ms", type=float, default=180.0)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        streaming(Path(tmp), args.repeats, args.copies)
        data_wait(Path(tmp), args.step_ms, args.steps)


if __name__ == "__main__":
    main()
