"""Analytic memory, compute and storage estimates for running the SEER recipes at scale.

Everything here is derived: parameter and activation counts from the analytic complexity
(``seerlike.models.complexity``), head sizes from the recipes, and per-image CPU costs from
the figures measured in docs/benchmarks.md (passed as arguments, defaults = our medians).
Prints the Markdown tables that docs/scale.md quotes.

    python benchmarks/scale_model.py [--ingest-img-s-core 92] [--aug-img-s-core 60] ...
"""

from __future__ import annotations

import argparse
import math

from seerlike import recipes
from seerlike.models import complexity, spec

GB = 1024**3
ACT_FACTOR = 3  # tensors kept for backward per conv output: conv out, BN out, activation out
SEER_RUNS = {
    # recipe: (GPUs, images per GPU, crops as (count, size), GPU memory GB) as published in the SEER papers (Goyal et al. 2021, 2022; docs/scale.md)
    "seer_regnet_y_256gf": (512, 16, [(2, 224), (4, 96)], 32),
    "seer_regnet_y_10b": (496, 16, [(2, 160), (4, 96)], 40),
}


def head_params(in_dim: int, dims: tuple[int, ...], prototypes: int) -> int:
    """MLP Linear(no bias)->BN->ReLU ... ->Linear(bias) plus the prototypes (no bias)."""
    total, d = 0, in_dim
    for i, h in enumerate(dims):
        last = i == len(dims) - 1
        total += d * h + (h if last else 2 * h)  # last: bias; hidden: BN gamma+beta
        d = h
    return total + d * prototypes


def per_image_acts(name: str, crops: list[tuple[int, int]]) -> tuple[int, int, int]:
    """(all conv outputs, block-boundary outputs, largest block's conv outputs) per image, summed over crops."""
    total = bounds = largest = 0
    for count, size in crops:
        parts = complexity(name, size, None)["parts"]
        total += count * sum(p["acts"] for p in parts)
        blocks = [p for p in parts if p["name"] not in ("stem", "head")]
        widths = [s["width"] for s in spec(name).stage_table()]
        for p in blocks:  # RegNet part names: trunk_output.blockS.blockS-J
            stage = int(p["name"].split(".")[1].removeprefix("block"))
            h, ww = p["out_hw"]
            bounds += count * widths[stage - 1] * h * ww
        largest = max(largest, max(p["acts"] for p in blocks))
    return total, bounds, largest


def memory_table() -> list[str]:
    rows = ["| recipe | trunk params | head params | model states, DDP | FSDP over 8 GPUs | FSDP over all "
            "| + largest block unsharded (fp16, x2 prefetch) | activations, no AC | activations, per-block AC "
            "| GPUs (published) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, (gpus, per_gpu, crops, gpu_gb) in SEER_RUNS.items():
        cfg = recipes.get(name)
        arch = cfg.model.name
        trunk = complexity(arch, 224, None)["params"]
        sw = cfg.method
        head = head_params(spec(arch).widths[-1], tuple(sw.head_dims), sw.num_prototypes)
        p = trunk + head
        states_ddp = 12 * p / GB  # fp32 params + grads + SGD momentum
        states_node = 12 * p / 8 / GB
        states_fsdp = 12 * p / gpus / GB
        unit = max(q["params"] for q in complexity(arch, 224, None)["parts"]) * 2 * 2 / GB
        total, bounds, largest = per_image_acts(arch, crops)
        act = per_gpu * total * ACT_FACTOR * 2 / GB  # fp16
        act_ac = per_gpu * (bounds * 2 + largest * ACT_FACTOR * 2) / GB
        rows.append(f"| {name} ({arch}) | {trunk / 1e9:.2f} B | {head / 1e6:.0f} M | {states_ddp:.1f} | "
                    f"{states_node:.1f} | {states_fsdp:.2f} | {unit:.2f} | {act:.1f} | {act_ac:.1f} | {gpus} x {gpu_gb} GB |")
    return rows


def storage_table(bytes_per_image: float, samples_per_shard: int) -> list[str]:
    n = 1_000_000_000
    total = n * bytes_per_image
    shards = math.ceil(n / samples_per_shard)
    return ["| images | bytes / image | total | shards | shard size |", "|---|---|---|---|---|",
            f"| 1,000,000,000 | {bytes_per_image / 1024:.0f} KiB | {total / 1024**4:.1f} TiB | {shards:,} | "
            f"{samples_per_shard * bytes_per_image / 1024**2:.0f} MiB |"]


def cost_table(ingest_rate: float, aug_rate: float, gpu_img_s: float, gpus: int) -> list[str]:
    n = 1_000_000_000
    ingest_core_h = n / ingest_rate / 3600
    aug_cores_per_gpu = gpu_img_s / aug_rate
    train_h = n / (gpu_img_s * gpus) / 3600
    return ["| step | figure used | cost for one pass over 1B images |", "|---|---|---|",
            f"| ingest | {ingest_rate:.0f} img/s per core (measured) | {ingest_core_h:,.0f} core-hours "
            f"({ingest_core_h / 1000:,.1f} h on 1,000 cores) |",
            f"| data loading | {aug_rate:.0f} img/s per core multi-crop (measured) | {aug_cores_per_gpu:.2f} cores per GPU "
            f"at {gpu_img_s:.1f} img/s per GPU |",
            f"| pretraining | {gpu_img_s:.2f} img/s per GPU x {gpus} GPUs (SEER paper) | {train_h:,.0f} h "
            f"({train_h / 24:.1f} days, {train_h * gpus:,.0f} GPU-hours) |"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ingest-img-s-core", type=float, default=92.0, help="measured ingest rate on web photos")
    p.add_argument("--aug-img-s-core", type=float, default=134.0, help="measured multi-crop rate per core, worker side (photometric ops on the GPU)")
    p.add_argument("--bytes-per-image", type=float, default=90_866, help="mean bytes per written image, photos at short side 512, q 90 (ingest summary)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--gpu-img-s", type=float, default=1400 / 512, help="SEER: ~1.4k img/s on 512 V100s")
    p.add_argument("--gpus", type=int, default=512)
    a = p.parse_args()
    print("### Memory per GPU in GB (SEER recipes, fp16 compute, fp32 params + grads + SGD momentum)\n")
    print("\n".join(memory_table()))
    print("\n### Storage for 1B images\n")
    print("\n".join(storage_table(a.bytes_per_image, a.samples_per_shard)))
    print("\n### Cost model\n")
    print("\n".join(cost_table(a.ingest_img_s_core, a.aug_img_s_core, a.gpu_img_s, a.gpus)))


if __name__ == "__main__":
    main()
