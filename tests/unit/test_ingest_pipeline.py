"""End-to-end local ingest: the bad-input corpus, accounting, dedup across chunks, resume, workers."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from seerlike.config import ConfigError
from sharding.config import IngestConfig
from sharding.ingest import done_chunks, ingest, ingest_chunk, merge, plan
from sharding.manifest import read_manifest, read_summary, shard_urls
from sharding.stats import manifest_stats, verify
from tests.unit.test_ingest_process import crafted_png, png_bytes

ROOT = Path(__file__).resolve().parents[2]
KEY = re.compile(r"^\d{6}_\d{7}$")
UNICODE = "l 名前 with spaces.jpg"


def build_bad_corpus(photos_dir: Path, root: Path) -> tuple[list[str], dict[str, tuple[str, str | None]]]:
    """Bad and awkward inputs made from the real photos; returns (inputs, expected outcome by source)."""
    c = root / "corpus"
    (c / "sub").mkdir(parents=True)
    lists = root / "lists"
    lists.mkdir()
    copy = lambda name, dst: shutil.copyfile(photos_dir / name, c / dst)  # noqa: E731
    copy("pillow_hopper_orientation_6.jpg", "a_rot6.jpg")
    copy("pillow_hopper_gray.jpg", "b_gray.jpg")
    copy("exifsamples_jolla.jpg", "c_big.jpg")
    big = (photos_dir / "exifsamples_DSCN0010.jpg").read_bytes()
    (c / "d_truncated.jpg").write_bytes(big[: int(len(big) * 0.6)])
    (c / "e_empty.jpg").write_bytes(b"")
    (c / "f_text.jpg").write_text("not an image, just text in a .jpg\n")
    (c / "g_bomb.png").write_bytes(crafted_png(30000, 30000))
    copy("pillow_pil_sample_cmyk.jpg", "h_cmyk.jpg")
    gray = np.asarray(Image.open(photos_dir / "skimage_camera.png").convert("L"))
    (c / "i_gray16.png").write_bytes(png_bytes(Image.fromarray(gray.astype(np.uint16) * 257)))
    frames = [Image.open(photos_dir / "pillow_hopper.png").convert("RGB"), Image.new("RGB", (128, 128), (0, 0, 255))]
    frames[0].save(c / "j_anim.gif", save_all=True, append_images=frames[1:], duration=40, loop=0)
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([0, 0, 0] * 128 + [10, 200, 10] * 128)
    pal.paste(200, (0, 0, 32, 64))
    (c / "k_palette.png").write_bytes(png_bytes(pal, transparency=0))
    copy("pillow_hopper.jpg", UNICODE)
    copy("exifsamples_Canon_40D.jpg", "m_dup_a.jpg")
    (c / "n_tiny.png").write_bytes(png_bytes(Image.new("RGB", (10, 10))))
    copy("exifsamples_Canon_40D.jpg", "sub/dup_b.jpg")  # same bytes, other name, same chunk
    (c / "x_wide.png").write_bytes(png_bytes(Image.new("RGB", (900, 100), (9, 9, 9))))
    entries = ["../corpus/a_rot6.jpg", f"../corpus/./{UNICODE}", "../corpus/missing.jpg", str(photos_dir / "skimage_coffee.png")]
    (lists / "list.txt").write_text("\n".join(entries) + "\n", encoding="utf-8")
    expect = {
        "a_rot6.jpg": ("written", None),
        "b_gray.jpg": ("written", None),
        "c_big.jpg": ("written", None),
        "d_truncated.jpg": ("rejected", "truncated"),
        "e_empty.jpg": ("rejected", "zero_bytes"),
        "f_text.jpg": ("rejected", "not_an_image"),
        "g_bomb.png": ("rejected", "decompression_bomb"),
        "h_cmyk.jpg": ("written", None),
        "i_gray16.png": ("written", None),
        "j_anim.gif": ("written", None),
        "k_palette.png": ("written", None),
        UNICODE: ("written", None),
        "m_dup_a.jpg": ("written", None),
        "n_tiny.png": ("rejected", "too_small"),
        "sub/dup_b.jpg": ("duplicate", None),
        "x_wide.png": ("rejected", "extreme_aspect"),
        "list:a_rot6.jpg": ("duplicate", None),  # list entries land in a later chunk: cross-chunk dups
        f"list:{UNICODE}": ("duplicate", None),
        "list:missing.jpg": ("rejected", "fetch_failed"),
        "list:skimage_coffee.png": ("written", None),
    }
    return [str(c), str(lists / "list.txt")], expect


def _label(source: str, row_index: int) -> str:
    name = source.split("/corpus/")[-1] if "/corpus/" in source else Path(source).name
    return f"list:{Path(name).name}" if row_index >= 16 else name


def _cfg(inputs, out, **kw) -> IngestConfig:
    base = dict(chunk_size=5, resize_short_side=256, progress=False, shuffle=False)  # outcomes are keyed by listing order
    return IngestConfig(inputs=tuple(inputs), out=str(out), **{**base, **kw})


@pytest.fixture(scope="module")
def corpus(photos_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest")
    inputs, expect = build_bad_corpus(photos_dir, root)
    out = root / "out"
    summary = ingest(_cfg(inputs, out))
    return root, inputs, expect, out, summary


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())}


def _manifest_rows(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


def test_bad_corpus_outcomes_and_accounting(corpus):
    root, _, expect, out, summary = corpus
    rows = _manifest_rows(out)
    got = {_label(r["source"], i): (r["status"], r["reason"]) for i, r in enumerate(rows)}
    assert got == expect
    n = {s: sum(1 for v in expect.values() if v[0] == s) for s in ("written", "duplicate", "rejected")}
    assert (summary["seen"], summary["written"], summary["duplicate"], summary["rejected"]) == (20, n["written"], 3, n["rejected"])
    assert summary["written"] + summary["duplicate"] + sum(summary["rejected_by_reason"].values()) == summary["seen"]
    assert summary["duplicates_across_chunks"] == 2
    assert read_summary(str(out))["rejected_by_reason"]["decompression_bomb"] == 1
    assert sorted(os.listdir(root)) == ["corpus", "lists", "out"]  # '../' entries wrote nothing outside out/
    assert all(KEY.match(r["key"]) for r in rows) and len({r["key"] for r in rows}) == len(rows)
    stats = manifest_stats(str(out))
    assert stats["status"] == {"written": n["written"], "duplicate": 3, "rejected": n["rejected"]}


def test_shards_match_manifest(corpus):
    import webdataset as wds

    _, _, _, out, _ = corpus
    assert verify(str(out)) == []
    rows = {r["key"]: r for r in _manifest_rows(out)}
    written = {k for k, r in rows.items() if r["status"] == "written"}
    seen = set()
    for sample in wds.WebDataset(shard_urls(str(out)), shardshuffle=False):
        key = sample["__key__"]
        meta = json.loads(sample["json"])
        im = Image.open(io.BytesIO(sample["jpg"]))
        r = rows[key]
        assert meta["source"] == r["source"] and meta["sha256"] == r["sha256"] and meta["bytes"] == r["size"]
        assert im.mode == "RGB" and im.size == (r["width"], r["height"]) == (meta["width"], meta["height"])
        seen.add(key)
    assert seen == written
    for r in rows.values():
        if r["status"] == "duplicate":
            first = rows[r["duplicate_of"]]
            assert first["status"] == "written" and first["sha256"] == r["sha256"] and first["key"] < r["key"]
            assert r["shard"] is None


def test_rerun_is_idempotent_and_skips_done_chunks(corpus):
    _, inputs, _, out, summary = corpus
    before = _shard_bytes(out)
    marks = {p.name: p.stat().st_mtime_ns for p in (out / "_ingest" / "done").iterdir()}
    again = ingest(_cfg(inputs, out, workers=3))  # runtime-only fields may change
    assert again["run_chunks"] == 0 and again["written"] == summary["written"]
    assert _shard_bytes(out) == before
    assert {p.name: p.stat().st_mtime_ns for p in (out / "_ingest" / "done").iterdir()} == marks
    with pytest.raises(ConfigError, match="resize_short_side"):
        ingest(_cfg(inputs, out, resize_short_side=128))


def test_two_workers_give_identical_output(corpus, tmp_path):
    _, inputs, _, out, _ = corpus
    out2 = tmp_path / "out2"
    ingest(_cfg(inputs, out2, workers=2))
    assert _manifest_rows(out2) == _manifest_rows(out)
    assert _shard_bytes(out2) == _shard_bytes(out)


def test_chunks_run_independently_then_merge(corpus, tmp_path):
    """The Slurm-array shape: plan, chunks in any order (as separate calls), then merge."""
    _, inputs, _, out, _ = corpus
    out3 = tmp_path / "out3"
    cfg = _cfg(inputs, out3)
    p = plan(cfg)
    assert p.n_inputs == 20 and list(p) == [0, 1, 2, 3] and len(p) == 4
    for k in reversed(p.chunks[1:]):
        ingest_chunk(cfg, k)
    with pytest.raises(RuntimeError, match="1 of 4 chunks are not done"):
        merge(cfg)
    ingest_chunk(cfg, 0)
    assert done_chunks(cfg) == {0, 1, 2, 3}
    merge(cfg)
    assert _manifest_rows(out3) == _manifest_rows(out)
    assert _shard_bytes(out3) == _shard_bytes(out)


def test_killed_ingest_resumes_to_the_same_result(photos_dir, tmp_path):
    files = sorted(p for p in photos_dir.iterdir() if p.suffix == ".jpg")[:28]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(map(str, files)) + "\n" + str(files[3]) + "\n")  # plus one cross-chunk duplicate
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    code = (
        "import sys; from sharding.config import IngestConfig; from sharding.ingest import ingest; "
        "ingest(IngestConfig(inputs=(sys.argv[1],), out=sys.argv[2], chunk_size=3, progress=False))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(listing), str(killed)], cwd=ROOT)
    done_dir = killed / "_ingest" / "done"

    def done_marks() -> dict[str, int]:  # not the temp files of a marker being written
        return {p.name: p.stat().st_mtime_ns for p in done_dir.glob("[0-9]*.json")} if done_dir.is_dir() else {}

    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if len(done_marks()) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the ingest finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    marks = done_marks()
    n_done = len(marks)
    assert 2 <= n_done < 10 and not (killed / "manifest.parquet").exists()

    resumed = ingest(IngestConfig(inputs=(str(listing),), out=str(killed), chunk_size=3, progress=False))
    assert resumed["run_chunks"] == 10 - n_done  # completed chunks were not redone
    assert {k: v for k, v in done_marks().items() if k in marks} == marks
    ingest(IngestConfig(inputs=(str(listing),), out=str(clean), chunk_size=3, progress=False))
    assert read_manifest(str(killed)).to_pylist() == read_manifest(str(clean)).to_pylist()
    assert _shard_bytes(killed) == _shard_bytes(clean)
    assert resumed["duplicate"] == 1 and resumed["seen"] == 29
    assert not list(killed.rglob("*.tmp"))  # temp files of the killed attempt cleaned


def test_csv_list_with_labels_and_cli(cifar_dir, tmp_path, capsys):
    from seerlike.cli import main

    lines = (cifar_dir / "train.csv").read_text().splitlines()
    (tmp_path / "sub.csv").write_text("\n".join([lines[0]] + lines[1:400:20]) + "\n")
    csv_path = tmp_path / "sub.csv"
    # entries are relative to the CSV's folder: point them at cifar's folder
    text = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([text[0]] + [f"{cifar_dir}/{t}" for t in text[1:]]) + "\n")
    out = tmp_path / "ds"
    rc = main(["ingest", str(csv_path), "--out", str(out), "--no-progress", "shard_max_samples=7", "--workers", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "written   20" in printed
    rows = read_manifest(str(out)).to_pylist()
    assert all(r["label"] == r["source"].split("/")[-2] for r in rows)
    assert len(shard_urls(str(out))) == 3  # 20 samples at 7 per shard
    assert main(["ingest", str(csv_path), "--out", str(out), "bogus_key=1"]) == 2
    capsys.readouterr()
    assert main(["ingest-stats", str(out / "manifest.parquet"), "--verify"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["verify"]["ok"] and stats["manifest"]["status"] == {"written": 20} and stats["summary"]["shards"] == 3


def test_shuffled_plan_mixes_a_class_sorted_folder_into_every_shard(cifar_dir, tmp_path):
    # a class-sorted folder tree: 3 classes x 40 images, listed class after class
    src = tmp_path / "sorted"
    for cls in ("airplane", "cat", "truck"):
        (src / cls).mkdir(parents=True)
        for f in sorted((cifar_dir / "train" / cls).iterdir())[:40]:
            shutil.copy(f, src / cls / f.name)

    def shard_classes(out, **kw):
        ingest(IngestConfig(inputs=(str(src),), out=str(out), progress=False, shard_max_samples=20, **kw))
        by_shard: dict[str, list[str]] = {}
        for r in read_manifest(str(out)).to_pylist():
            by_shard.setdefault(r["shard"], []).append(r["source"].split("/")[-2])
        return by_shard

    listed = shard_classes(tmp_path / "listed", shuffle=False)
    assert all(len(set(c)) == 1 for c in listed.values())  # without the shuffle: one class per shard
    shuffled = shard_classes(tmp_path / "a")
    assert len(shuffled) == 6 and all(set(c) == {"airplane", "cat", "truck"} for c in shuffled.values())
    assert shard_classes(tmp_path / "b") == shuffled  # seeded: the same plan on a rerun elsewhere
    assert shard_classes(tmp_path / "c", seed=1) != shuffled


def test_config_is_documented_and_validated(tmp_path):
    from seerlike.config import apply_overrides, undocumented

    assert undocumented(IngestConfig) == []
    cfg = apply_overrides(IngestConfig(), ["inputs=[a,b]", "animations=reject", "resize_short_side=384"])
    assert cfg.inputs == ("a", "b") and cfg.animations == "reject" and cfg.resize_short_side == 384
    for bad in ("resize_short_side=8", "jpeg_quality=0", "chunk_size=0", "animations=loop", "workers=0"):
        with pytest.raises(ConfigError):
            apply_overrides(IngestConfig(), [bad])
    with pytest.raises(ConfigError, match="does not exist"):
        ingest(IngestConfig(inputs=(str(tmp_path / "nope"),), out=str(tmp_path / "o"), progress=False))
    with pytest.raises(ConfigError, match="no output"):
        ingest(IngestConfig(inputs=(str(tmp_path),)))
