"""Engine benchmarks, each measured side by side in one run (CPU; a --cuda section for GPUs).

    python benchmarks/bench_engine.py            # all CPU sections
    python benchmarks/bench_engine.py --only fsdp ac overhead bf16
    python benchmarks/bench_engine.py --cuda     # on a GPU: fp32 / bf16 / fp16 steps, AC memory and time

1. fsdp:     per-rank parameter + gradient + optimizer-state bytes, FSDP2 on 2 gloo ranks vs 1 rank.
2. ac:       RegNetY-1.6GF, batch 32 at 128 px: peak activation memory (peak bytes of live tensors
             created during forward + backward, minus the gradients) and step time, without / with
             per-block activation checkpointing.
3. overhead: the engine's step (seerlike.engine.loop.train) vs a bare torch loop on the same model,
             batch and optimizer; medians of per-step process CPU time (and wall time), blocks
             alternated. CPU time is the robust figure on a machine shared with other jobs.
4. bf16:     engine step time with bf16 autocast vs fp32 on CPU.

--cuda (world-1 NCCL, FSDP2, SwAV multi-crop 2 x 224 + 6 x 96, LARC): step time, images/s and
peak allocated memory of fp32 vs bf16 vs fp16 + loss scaler on ResNet-50, and without / with
per-block activation checkpointing on ResNet-50, RegNetY-1.6GF and RegNetY-16GF.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from seerlike import config, models, recipes  # noqa: E402
from seerlike.engine.optim import OptimConfig, build_optimizer  # noqa: E402
from seerlike.engine.parallelize import ParallelConfig, parallelize  # noqa: E402
from seerlike.methods.swav import SwAV  # noqa: E402
from seerlike.testing import run_on_ranks  # noqa: E402


def _swav(backbone: str = "resnet10_cifar", crops: int = 2) -> SwAV:
    return SwAV(SwAV.Config(head_dims=(2048, 128), num_prototypes=100, num_crops=crops,
                            freeze_prototypes_steps=0), models.build(backbone))


# ---------------------------------------------------------------- 1. FSDP bytes


def _local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _fsdp_bytes(rank: int, world: int, backbone: str) -> dict:
    torch.manual_seed(0)
    method = _swav(backbone)
    model = parallelize(method, ParallelConfig(strategy="fsdp"))
    opt = build_optimizer(OptimConfig(name="larc", lr=0.1), method)
    loss, _ = model([torch.randn(4, 3, 32, 32) for _ in range(2)])
    loss.backward()
    opt.step()
    params = sum(_local_bytes(p) for p in method.parameters())
    grads = sum(_local_bytes(p.grad) for p in method.parameters() if p.grad is not None)
    state = sum(_local_bytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    return {"params": params, "grads": grads, "optim": state}


def bench_fsdp(backbone: str = "resnet18_cifar") -> list[str]:
    one = run_on_ranks(_fsdp_bytes, 1, backbone)[0]
    two = run_on_ranks(_fsdp_bytes, 2, backbone)
    worst = max(sum(r.values()) for r in two)
    rows = ["| per-rank bytes (SwAV, %s, LARC) | 1 rank | 2 ranks (max) | ratio |" % backbone, "|---|---|---|---|"]
    for k in ("params", "grads", "optim"):
        m = max(r[k] for r in two)
        rows.append(f"| {k} | {one[k] / 2**20:.2f} MiB | {m / 2**20:.2f} MiB | {m / one[k]:.3f} |")
    total = sum(one.values())
    rows.append(f"| **total** | {total / 2**20:.2f} MiB | {worst / 2**20:.2f} MiB | **{worst / total:.3f}** |")
    return rows


# ---------------------------------------------------------------- 2. activation checkpointing


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage created under it and still alive; ``peak`` is the maximum.

    Exact where RSS is not (the CPU allocator keeps freed memory), and it sees the backward
    pass and the recomputation of checkpointed blocks, which run in the same thread on CPU.
    """

    def __init__(self):
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for k in [k for k, (r, _) in self.refs.items() if r.expired()]:
            self.live -= self.refs.pop(k)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.refs:
                    n = t.untyped_storage().nbytes()
                    self.refs[ref.cdata] = (ref, n)
                    self.live += n
        self.peak = max(self.peak, self.live)
        return out


def _ac_run(ac: str, backbone: str, batch: int, px: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = models.build(backbone)
    parallelize(model, ParallelConfig(strategy="none", ac=ac))
    x = torch.randn(batch, 3, px, px)
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    with LiveTensorBytes() as mem:
        model(x).square().mean().backward()
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        t0 = time.process_time()
        model(x).square().mean().backward()
        times.append(time.process_time() - t0)
    return {"act_bytes": mem.peak - grads, "peak": mem.peak, "step_s": statistics.median(times)}


def bench_ac(backbone: str = "regnet_y_1_6gf", batch: int = 32, px: int = 128, steps: int = 2) -> list[str]:
    torch.set_num_threads(1)
    n, b = (_ac_run(ac, backbone, batch, px, steps) for ac in ("none", "block"))
    return [f"| {backbone}, batch {batch} at {px} px, fp32, 1 thread | peak activation memory (peak incl. grads) "
            f"| step CPU time (median of {steps}) |",
            "|---|---|---|",
            f"| no checkpointing | {n['act_bytes'] / 2**20:.0f} MiB ({n['peak'] / 2**20:.0f}) | {n['step_s']:.2f} s |",
            f"| per-block checkpointing | {b['act_bytes'] / 2**20:.0f} MiB ({b['peak'] / 2**20:.0f}) | {b['step_s']:.2f} s |",
            f"| **ratio** | **{n['act_bytes'] / b['act_bytes']:.2f}x lower** | **{b['step_s'] / n['step_s']:.2f}x time** |"]


# ---------------------------------------------------------------- 3./4. engine step vs bare loop


class _TimedData:
    """Fixed random views; records (wall, process CPU) time at every fetch (one fetch per step)."""

    def __init__(self, views, n: int):
        self.views, self.n, self.stamps = views, n, []

    def __iter__(self):
        while True:
            self.stamps.append((time.perf_counter(), time.process_time()))
            yield SimpleNamespace(views=self.views)

    def state_dict(self):
        return {}

    def load_state_dict(self, _):
        pass

    def step_times(self) -> list[tuple[float, float]]:
        s = self.stamps
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(s[3:], s[4:])]  # skip warm-up steps


def _engine_steps(views, steps: int, dtype: str, strategy: str) -> list[float]:
    from seerlike.engine.loop import train

    cfg = config.apply_overrides(recipes.get("tiny_swav"), [
        f"loop.max_steps={steps}", "optim.warmup_steps=0", f"precision.dtype={dtype}", f"parallel.strategy={strategy}",
        "model.channels_last=false", "loop.log_every=10", "loop.progress=false", "loop.tensorboard=false",
        f"checkpoint.every_steps={10 * steps}", "method.freeze_prototypes_steps=0",
        "method.num_prototypes=100", f"data.batch_size={views[0].shape[0]}"])
    data = _TimedData(views, steps)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = config.apply_overrides(cfg, [f"checkpoint.dir={run_dir}/ck"])
        # the final checkpoint is written after the last fetch, so it is outside the timed steps
        train(cfg, run_dir, data=data)
    return data.step_times()


def _bare_steps(views, steps: int) -> list[float]:
    torch.manual_seed(0)
    method = _swav()
    opt = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
    times, t = [], (time.perf_counter(), time.process_time())
    for _ in range(steps):
        loss, _ = method(views)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        now = (time.perf_counter(), time.process_time())
        times.append((now[0] - t[0], now[1] - t[1]))
        t = now
    return times[3:]


def _med(times: list[tuple[float, float]]) -> tuple[float, float]:
    """Median wall and median CPU seconds per step (CPU time is robust to other jobs on the machine)."""
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def bench_overhead(batch: int = 64, steps: int = 15, rounds: int = 3) -> list[str]:
    from seerlike.engine.dist import init_distributed

    init_distributed()
    torch.set_num_threads(1)
    views = [torch.randn(batch, 3, 32, 32) for _ in range(2)]
    runs = {"bare": lambda: _bare_steps(views, steps), "none": lambda: _engine_steps(views, steps, "fp32", "none"),
            "fsdp": lambda: _engine_steps(views, steps, "fp32", "fsdp")}
    times = {k: [] for k in runs}
    order = list(runs)
    for r in range(rounds):  # rotate the order so that no variant always runs first
        for k in order[r % 3:] + order[:r % 3]:
            times[k] += runs[k]()
    bare, eng, eng_fsdp = times["bare"], times["none"], times["fsdp"]
    (wb, cb), (we, ce), (wf, cf) = _med(bare), _med(eng), _med(eng_fsdp)
    return [f"| SwAV resnet10_cifar, batch {batch} x 2 views at 32 px, fp32, SGD, 1 thread | median step CPU (wall) | CPU vs bare (wall) |",
            "|---|---|---|",
            f"| bare torch loop (forward, backward, step, zero_grad) | {cb * 1000:.0f} ms ({wb * 1000:.0f}) | 1.000 |",
            f"| seerlike engine, parallel.strategy=none | {ce * 1000:.0f} ms ({we * 1000:.0f}) | **{ce / cb:.3f}** ({we / wb:.3f}) |",
            f"| seerlike engine, FSDP2 on 1 rank | {cf * 1000:.0f} ms ({wf * 1000:.0f}) | {cf / cb:.3f} ({wf / wb:.3f}) |"]


def bench_bf16(batch: int = 64, steps: int = 15) -> list[str]:
    from seerlike.engine.dist import init_distributed

    init_distributed()
    torch.set_num_threads(1)
    views = [torch.randn(batch, 3, 32, 32) for _ in range(2)]
    res = {d: [] for d in ("fp32", "bf16")}
    for _ in range(2):
        for d in res:
            res[d] += _engine_steps(views, steps, d, "none")
    (w32, c32), (w16, c16) = _med(res["fp32"]), _med(res["bf16"])
    return [f"| SwAV resnet10_cifar, batch {batch} x 2 views at 32 px, engine, 1 thread | median step CPU (wall) | images per CPU s |",
            "|---|---|---|",
            f"| fp32 | {c32 * 1000:.0f} ms ({w32 * 1000:.0f}) | {2 * batch / c32:.0f} |",
            f"| bf16 autocast | {c16 * 1000:.0f} ms ({w16 * 1000:.0f}) | {2 * batch / c16:.0f} |",
            f"| **bf16 / fp32 time** | **{c16 / c32:.2f}** ({w16 / w32:.2f}) | |"]


# ---------------------------------------------------------------- CUDA

MULTICROP = ((2, 224), (6, 96))  # SwAV's 2 x 224 + 6 x 96 views


def _cuda_swav_run(backbone: str, batch: int, dtype: str, ac: str = "none", strategy: str = "fsdp",
                   layout: str = "nchw", steps: int = 20, warmup: int = 5) -> dict:
    """Median step time and peak allocated memory of SwAV multi-crop training steps on this GPU.

    ``layout``: nchw; nhwc-inputs (channels_last views only: what ``model.channels_last`` gives
    under FSDP, which shards contiguous weights only); nhwc (views and weights).
    """
    from seerlike.engine.precision import PrecisionConfig, autocast, grad_scaler

    dev = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    method = SwAV(SwAV.Config(num_crops=sum(n for n, _ in MULTICROP), freeze_prototypes_steps=0),
                  models.build(backbone))
    if layout == "nhwc":
        method.to(memory_format=torch.channels_last)
    pcfg = PrecisionConfig(dtype=dtype)
    model = parallelize(method, ParallelConfig(strategy=strategy, ac=ac), device=dev, compute_dtype=pcfg.torch_dtype)
    opt = build_optimizer(OptimConfig(name="larc", lr=0.1), method)
    scaler = grad_scaler(pcfg, dev)
    fmt = torch.contiguous_format if layout == "nchw" else torch.channels_last
    views = [torch.randn(batch, 3, px, px, device=dev).contiguous(memory_format=fmt)
             for n, px in MULTICROP for _ in range(n)]
    times = []
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.reset_peak_memory_stats(dev)
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with autocast(pcfg, dev):
            loss, _ = model(views)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    assert torch.isfinite(loss), f"{backbone} {dtype}: loss {loss}"
    out = {"step_s": statistics.median(times[warmup:]), "peak": torch.cuda.max_memory_allocated(dev) / 2**30}
    out["img_s"] = batch / out["step_s"]
    del model, method, opt, views
    torch.cuda.empty_cache()
    return out


def bench_cuda_precision(backbone: str = "resnet50", batch: int = 64) -> list[str]:
    variants = {"fp32 (TF32 convolutions: torch's default)": ("fp32", "fsdp", "nchw"),
                "bf16 autocast": ("bf16", "fsdp", "nchw"),
                "fp16 autocast + loss scaler": ("fp16", "fsdp", "nchw"),
                "bf16, channels_last views (model.channels_last under FSDP)": ("bf16", "fsdp", "nhwc-inputs"),
                "bf16, no FSDP (strategy none = DDP at world 1)": ("bf16", "none", "nchw"),
                "bf16, no FSDP, channels_last views and weights": ("bf16", "none", "nhwc")}
    runs = {k: _cuda_swav_run(backbone, batch, d, strategy=st, layout=lay) for k, (d, st, lay) in variants.items()}
    ref = next(iter(runs.values()))["step_s"]
    rows = [(f"| SwAV {backbone}, batch {batch} x (2x224 + 6x96), LARC; FSDP2 world 1 unless said | median step "
             "| images/s | peak GiB | time vs fp32 |"), "|---|---|---|---|---|"]
    for k, r in runs.items():
        rows.append(f"| {k} | {r['step_s'] * 1000:.1f} ms | {r['img_s']:.0f} | {r['peak']:.1f} | {r['step_s'] / ref:.2f} |")
    return rows


def bench_cuda_ac(configs=(("resnet50", 64), ("regnet_y_1_6gf", 64), ("regnet_y_16gf", 32))) -> list[str]:
    rows = [("| SwAV 2x224 + 6x96, bf16, FSDP2 world 1 | batch | images/s: no AC / per-block AC | peak GiB: no AC / AC "
             "| **memory ratio** | **time ratio** |"), "|---|---|---|---|---|---|"]
    for backbone, batch in configs:
        n, b = (_cuda_swav_run(backbone, batch, "bf16", ac=ac) for ac in ("none", "block"))
        rows.append(f"| {backbone} | {batch} | {n['img_s']:.0f} / {b['img_s']:.0f} | {n['peak']:.2f} / {b['peak']:.2f} "
                    f"| {n['peak'] / b['peak']:.2f}x lower | {b['step_s'] / n['step_s']:.2f}x |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", help="sections: fsdp ac overhead bf16 (default all); with --cuda: precision ac")
    p.add_argument("--cuda", action="store_true")
    args = p.parse_args()
    if args.cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--cuda needs a CUDA GPU")
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; medians of 20 steps after 5 warm-up steps")
        from seerlike.engine.dist import init_distributed

        init_distributed()  # world-1 NCCL group: the FSDP2 path of a real run
        cuda = {"precision": ("Precision", bench_cuda_precision), "ac": ("Activation checkpointing", bench_cuda_ac)}
        for title, fn in (cuda[k] for k in args.only or cuda):
            t0 = time.perf_counter()
            rows = fn()
            print(f"\n### CUDA: {title} ({time.perf_counter() - t0:.0f} s)\n")
            print("\n".join(rows), flush=True)
        return
    sections = {"fsdp": ("FSDP2 sharding", bench_fsdp), "ac": ("Activation checkpointing", bench_ac),
                "overhead": ("Engine overhead", bench_overhead), "bf16": ("bf16 vs fp32 on CPU", bench_bf16)}
    for key in args.only or sections:
        title, fn = sections[key]
        t0 = time.perf_counter()
        rows = fn()
        print(f"\n### {title} ({time.perf_counter() - t0:.0f} s)\n")
        print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
