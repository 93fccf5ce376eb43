"""Build flowers5, the further natural-photo check set of docs/benchmarks.md ("A further natural-photo set").

Source: the Kaggle "Flowers Recognition" photos (daisy, dandelion, rose, sunflower, tulip; 4,317
Flickr JPEGs at their own size, median 320 x 240) as committed to GitHub in
``JoelOscarsson/dl-assignment`` at commit 5d893dd29c909b8c8d58db4218c4b9080297634f, folder
``data/flowers`` (later commits of that repo hold resized copies: do not use them). No licence
is stated for the images: research and evaluation use only, do not redistribute.

    git clone https://github.com/JoelOscarsson/dl-assignment /tmp/dl && git -C /tmp/dl checkout 5d893dd
    python benchmarks/data/flowers5.py --source /tmp/dl/data/flowers --out ../data/flowers5

Layout of ``--out`` (as ../shared/data/imagenette-dev): ``train/<class>/*`` + ``train.csv`` and
``val/<class>/*`` + ``val.csv`` (100 a class each, ``path,label`` relative to the CSV's folder),
``unlabeled/NNNNN.jpg`` (the rest, no labels) and ``unlabeled_provenance.csv`` (its sources: they
name the class, so never feed it to pretraining). Bytes are copied, never re-encoded.

Near-copies are kept out of the labelled splits: images with the same bytes or a 64-bit
difference hash (9 x 8 gray) within Hamming distance 4 form a group (union-find); only images
alone in their group can go to train or val (per class, sorted by name, shuffled with the seed:
the first 100 to val, the next 100 to train), one copy per byte-identical file of the other
groups goes to unlabeled, so no labelled image has a copy in another split.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import random
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

PER_SPLIT = 100
NEAR = 4  # dHash bits: photos within it are the same picture (recompressed, resized, re-filed)


def dhash(path: Path) -> int:
    """Difference hash: 64 bits, each whether a pixel of the 9 x 8 gray thumbnail is brighter than its right neighbour."""
    gray = np.asarray(Image.open(path).convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    return int("".join("1" if b else "0" for b in (gray[:, :-1] > gray[:, 1:]).ravel()), 2)


def groups(files: list[Path]) -> tuple[list[int], list[str]]:
    """Group id (a representative's index) and md5 of every file."""
    md5 = [hashlib.md5(f.read_bytes()).hexdigest() for f in files]
    hashes = [dhash(f) for f in files]
    parent = list(range(len(files)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    first: dict[str, int] = {}
    for i, m in enumerate(md5):
        if m in first:
            parent[find(i)] = find(first[m])
        else:
            first[m] = i
    for i, h in enumerate(hashes):
        for j in range(i + 1, len(files)):
            if bin(h ^ hashes[j]).count("1") <= NEAR:
                parent[find(i)] = find(j)
    return [find(i) for i in range(len(files))], md5


def build(source: Path, out: Path, seed: int) -> dict[str, int]:
    if out.exists():  # before minutes of hashing
        raise SystemExit(f"--out {out} exists; remove it or give another folder")
    files = sorted(source.glob("*/*.jpg"), key=lambda f: (f.parent.name, f.name))
    if not files:
        raise SystemExit(f"--source {source}: no <class>/*.jpg inside; give the data/flowers folder of the commit")
    gid, md5 = groups(files)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(gid):
        members[g].append(i)
    alone: dict[str, list[int]] = defaultdict(list)
    unlabeled: list[int] = []
    for mem in members.values():
        if len(mem) == 1:
            alone[files[mem[0]].parent.name].append(mem[0])
            continue
        seen: set[str] = set()
        for i in mem:  # one copy of each byte-identical file of a group of near-copies
            if md5[i] not in seen:
                seen.add(md5[i])
                unlabeled.append(i)
    rng = random.Random(seed)
    split: dict[str, list[int]] = {"train": [], "val": []}
    for cls in sorted(alone):
        pool = sorted(alone[cls], key=lambda i: files[i].name)
        rng.shuffle(pool)
        split["val"] += pool[:PER_SPLIT]
        split["train"] += pool[PER_SPLIT:2 * PER_SPLIT]
        unlabeled += pool[2 * PER_SPLIT:]
    unlabeled.sort(key=lambda i: (files[i].parent.name, files[i].name))
    rng.shuffle(unlabeled)
    for name, idx in split.items():
        rows = []
        for i in sorted(idx, key=lambda i: (files[i].parent.name, files[i].name)):
            rel = f"{files[i].parent.name}/{files[i].name}"
            (out / name / files[i].parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files[i], out / name / rel)
            rows.append((rel, files[i].parent.name))
        with open(out / f"{name}.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([("path", "label"), *rows])
    (out / "unlabeled").mkdir()
    provenance = []
    for k, i in enumerate(unlabeled):
        shutil.copyfile(files[i], out / "unlabeled" / f"{k:05d}.jpg")
        provenance.append((f"unlabeled/{k:05d}.jpg", f"data/flowers/{files[i].parent.name}/{files[i].name}", md5[i]))
    with open(out / "unlabeled_provenance.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "source_path", "md5"), *provenance])
    return {"train": len(split["train"]), "val": len(split["val"]), "unlabeled": len(unlabeled)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, type=Path, help="data/flowers of JoelOscarsson/dl-assignment at 5d893dd")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(build(args.source, args.out, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
