"""benchmarks/data/flowers5.py: near-copies are grouped, and only images alone in their group reach train or val."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from tests.scripts import load_script


@pytest.fixture(scope="module")
def flowers():
    return load_script("benchmarks/data/flowers5.py")


def _photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # smooth blocks: a dHash survives resizing
    return Image.fromarray(small).resize((160, 120), Image.BILINEAR)


def test_near_copies_stay_out_of_the_labelled_splits(flowers, tmp_path, monkeypatch):
    src = tmp_path / "flowers"
    for c, cls in enumerate(["daisy", "rose"]):
        (src / cls).mkdir(parents=True)
        for i in range(5):
            _photo(100 * c + i).save(src / cls / f"{i}.jpg", quality=95)
    _photo(0).resize((150, 112)).save(src / "rose" / "copy_of_daisy0.jpg", quality=70)  # re-filed, re-encoded
    (src / "rose" / "same_bytes.jpg").write_bytes((src / "rose" / "3.jpg").read_bytes())
    gid, md5 = flowers.groups(sorted(src.glob("*/*.jpg"), key=lambda f: (f.parent.name, f.name)))
    assert len(set(gid)) == 10  # 12 files: daisy/0 with its copy, rose/3 with its byte copy
    monkeypatch.setattr(flowers, "PER_SPLIT", 1)
    counts = flowers.build(src, tmp_path / "out", seed=0)
    assert counts == {"train": 2, "val": 2, "unlabeled": 7}  # 4 alone a class + both near-copies + one of the byte twins
    labelled = [r["path"] for s in ("train", "val") for r in csv.DictReader(open(tmp_path / "out" / f"{s}.csv"))]
    assert not {"daisy/0.jpg", "rose/copy_of_daisy0.jpg", "rose/3.jpg", "rose/same_bytes.jpg"} & set(labelled)
    monkeypatch.setattr(flowers, "groups", lambda files: pytest.fail("hashed before refusing --out"))
    with pytest.raises(SystemExit, match="exists"):
        flowers.build(src, tmp_path / "out", seed=0)
