"""Small WebDataset shard sets made from the real CIFAR-dev images (data tests' helpers)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(images: list[Path], out: Path, per_shard: int | list[int], *, bad_jpeg: set[int] = frozenset(),
                 missing_image: set[int] = frozenset(), labelled: bool = False) -> list[Path]:
    """Tars of ``per_shard`` samples each (or the listed sizes), ``KEY.jpg`` + ``KEY.json``; keys ``s{i:06d}``.

    ``bad_jpeg``: sample indices whose JPEG bytes are cut to garbage; ``missing_image``:
    indices written with their JSON only; ``labelled``: the JSON carries the image's class
    folder as ``label``, as ingest writes a list file's label.
    """
    out.mkdir(parents=True, exist_ok=True)
    sizes = per_shard if isinstance(per_shard, list) else [per_shard] * -(-len(images) // per_shard)
    paths, start = [], 0
    for j, size in enumerate(sizes):
        path = out / f"{j:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + size, len(images))):
                key = f"s{i:06d}"
                data = images[i].read_bytes()
                if i in bad_jpeg:
                    data = data[:20] + b"\x00garbage" * 8
                if i not in missing_image:
                    _add(tar, f"{key}.jpg", data)
                meta = {"key": key, "source": str(images[i])}
                if labelled:
                    meta["label"] = images[i].parent.name
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        paths.append(path)
        start += size
    return paths


def cifar_images(cifar_dir: Path, n: int) -> list[Path]:
    return sorted((cifar_dir / "train").rglob("*.jpg"))[:n]


def corrupt_jpegs(photos_dir: Path, out: Path, n: int) -> list[Path]:
    """``n`` undecodable ``.jpg`` files made from the smallest real photos: in turn cut at 60 %,
    header + garbage, garbage only, and empty."""
    out.mkdir(parents=True, exist_ok=True)
    photos = sorted(photos_dir.glob("*.jpg"), key=lambda p: p.stat().st_size)
    garbage = bytes(range(256)) * 8
    paths = []
    for i in range(n):
        data = photos[i % len(photos)].read_bytes()
        bad = [data[: int(len(data) * 0.6)], data[:512] + garbage, garbage, b""][i % 4]
        path = out / f"bad{i:04d}.jpg"
        path.write_bytes(bad)
        paths.append(path)
    return paths
