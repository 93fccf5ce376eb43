"""The corpus-wide steps in their bounded-memory form give what the whole-corpus versions gave.

Each test runs a step in its streaming / partitioned design on a small corpus and checks it
against the simple in-memory answer; the ``..._at_1m_rows`` tests hold memory ceilings at a
million rows (docs/scale.md has the measurements).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seerlike.data import shards as sh
from seerlike.data.sources import ShardSource
from seerlike.eval import features as fstore
from seerlike.pseudo_labels import PseudoLabels, label_map, write_index
from sharding import dedup, shuffle
from sharding.config import IngestConfig
from sharding.ingest import ingest, ingest_chunk, merge_chunk, merge_finish, merge_prepare, plan
from sharding.manifest import SHARDS, read_manifest, read_shard_index, shard_counts
from sharding.stats import verify


def _walk_position(source: ShardSource, plan: sh.WorkerPlan, records: int, block: int) -> dict:
    """The position as a walk over the worker's shards (what every batch used to pay)."""
    total = sum(source.counts[s] for s in plan.shards)
    read = min(-(-records // block) * block, total) if block > 1 else records
    done, pos = 0, 0
    for s in plan.shards:
        if pos + source.counts[s] > read:
            return {"shards_done": done, "shard": source.urls[s], "shard_offset": read - pos}
        done, pos = done + 1, pos + source.counts[s]
    return {"shards_done": done, "shard": None, "shard_offset": 0}


def test_resume_position_by_binary_search_matches_the_walk() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 40, size=200).tolist()  # empty shards too
    src = ShardSource([f"s/{i:04d}.tar" for i in range(200)], counts)
    plan = sh.plan_epoch(src, epoch=2, seed=1, world_size=2, num_workers=3, batch_size=8)
    for wp in (w for rank in plan.workers for w in rank):
        total = sum(counts[s] for s in wp.shards)
        for records in list(range(0, total + 40, 7)) + [total]:
            for block in (1, 10, 1000):
                assert sh.shard_position(src, wp, records, block) == _walk_position(src, wp, records, block)


def test_vectorised_dedup_matches_the_list_form(tmp_path: Path) -> None:
    pool = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(500)]
    rng = np.random.default_rng(3)
    chunks = [(np.arange(100, dtype=np.int64) + 1000 * k, [pool[p] for p in rng.choice(500, 100, replace=False)])
              for k in range(8)]
    as_lists = dedup.cross_chunk_duplicates(iter(chunks), partitions=5, tmp_dir=tmp_path)
    as_arrow = dedup.cross_chunk_duplicates(((g, pa.array(h)) for g, h in reversed(chunks)), partitions=5,
                                            tmp_dir=tmp_path)
    assert len(as_lists[0]) > 100
    for a, b in zip(as_lists, as_arrow):
        assert a.tolist() == b.tolist()
    assert dedup.digests(pa.array(pool[:3]).slice(1)).tolist() == [bytes.fromhex(h) for h in pool[1:3]]
    with pytest.raises(ValueError, match="hexadecimal"):
        dedup.digests(pa.array(["z" * 64]))


# ---------------------------------------------------------------- pseudo-labels


def _label_parts(folder: Path, n_parts: int, per_part: int, missing_every: int = 0) -> dict[str, int]:
    """Parts ``features-shard-{p}`` of keys ``{p:06d}_{i:07d}`` (one shard each); returns the labels written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for p in range(n_parts):
        keys = [f"{p:06d}_{i:07d}" for i in range(per_part) if not (missing_every and i % missing_every == 0)]
        cl = (np.arange(len(keys)) * 7 + p) % 97
        pq.write_table(pa.table({"key": keys, "cluster": pa.array(cl, pa.int32()),
                                 "distance": pa.array(np.ones(len(keys)), pa.float32())}),
                       folder / f"features-shard-{p:06d}.parquet")
        written.update(zip(keys, cl.tolist()))
    return written


def test_pseudo_labels_by_part_match_the_dict(tmp_path: Path) -> None:
    written = _label_parts(tmp_path / "labels", 12, 50, missing_every=9)
    sizes, total, n = write_index(tmp_path, 97)
    assert n == len(written) and sizes.sum() == n and total == pytest.approx(n)
    lookup = label_map(tmp_path)
    assert isinstance(lookup, PseudoLabels) and len(lookup) == len(written)
    probes = [f"{p:06d}_{i:07d}" for p in range(-1, 14) for i in range(0, 60, 3)] + ["", "zzz"]
    assert [lookup.get(k) for k in probes] == [written.get(k) for k in probes]
    assert lookup == written  # Mapping equality: every key, every value
    (tmp_path / "labels_index.parquet").unlink()  # an older cluster output: ranges read from the parts
    assert isinstance(label_map(tmp_path / "labels"), PseudoLabels) and label_map(tmp_path / "labels") == written


def test_pseudo_labels_with_overlapping_parts_fall_back_to_a_dict(tmp_path: Path) -> None:
    pq.write_table(pa.table({"key": ["a", "c"], "cluster": pa.array([1, 2], pa.int32())}), tmp_path / "x.parquet")
    pq.write_table(pa.table({"key": ["b", "d"], "cluster": pa.array([3, 4], pa.int32())}), tmp_path / "y.parquet")
    got = label_map(tmp_path)
    assert type(got) is dict and got == {"a": 1, "c": 2, "b": 3, "d": 4}


@pytest.fixture(scope="module")
def million_labels(tmp_path_factory) -> Path:
    """A cluster output of a million pseudo-labels in 100 parts of 10,000, with its index and sizes."""
    out = tmp_path_factory.mktemp("labels1m")
    (out / "labels").mkdir()
    for p in range(100):
        pq.write_table(pa.table({"key": [f"{p:06d}_{i:07d}" for i in range(10_000)],
                                 "cluster": pa.array((np.arange(10_000) * 7 + p) % 97, pa.int32()),
                                 "distance": pa.array(np.ones(10_000), pa.float32())}),
                       out / "labels" / f"features-shard-{p:06d}.parquet")
    sizes, _, _ = write_index(out, 97)
    (out / "cluster_stats.json").write_text(json.dumps({"num_clusters": 97, "sizes": sizes.tolist()}))
    return out


def test_pseudo_label_join_memory_stays_flat_at_1m_rows(million_labels: Path) -> None:
    """A rank's label join over a million pseudo-labels holds a few parts, not a dict of all of them."""
    wanted = [f"{p:06d}_{i:07d}" for p in (3, 4, 50, 98) for i in range(0, 10_000, 3)]
    tracemalloc.start()
    try:
        lookup = label_map(million_labels)
        got = [lookup.get(k) for k in wanted]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == [(i * 7 + p) % 97 for p in (3, 4, 50, 98) for i in range(0, 10_000, 3)]
    assert len(lookup) == 1_000_000
    # a dict of a million keys (the whole-corpus join) needs > 100 MB here; the parts' join a few
    assert peak < 24e6, f"label join peaked at {peak / 1e6:.1f} MB of Python objects"


def test_contact_sheet_members_match_the_in_memory_draw(tmp_path: Path) -> None:
    from seerlike.eval.members import cluster_sizes, draw_members, pick_clusters
    from seerlike.pseudo_labels import read_labels

    _label_parts(tmp_path / "labels", 6, 40, missing_every=7)  # 97 clusters of 1-3 members
    labels = read_labels(tmp_path)
    cl, keys = labels["cluster"].to_numpy(), labels["key"].to_pylist()
    sizes = np.bincount(cl, minlength=97)
    assert cluster_sizes(tmp_path).tolist() == sizes.tolist()  # counted: no cluster_stats.json
    picked = pick_clusters(sizes, 12, 0)
    chosen = [c for cs in picked.values() for c in cs]
    # a cluster of at most per_cluster members: all of them, in label order (no draw involved)
    assert draw_members(tmp_path, chosen, 3, seed=5)[0] == {c: [k for k, x in zip(keys, cl) if x == c] for c in chosen}
    # larger clusters: per_cluster distinct members of the cluster, the same for the same seed
    got, units = draw_members(tmp_path, chosen, 2, seed=5)
    assert (got, units) == draw_members(tmp_path, chosen, 2, seed=5)
    for c in chosen:
        members = [k for k, x in zip(keys, cl) if x == c]
        assert len(got[c]) == min(2, len(members)) and set(got[c]) <= set(members)
        assert got[c] == [k for k in members if k in got[c]]  # in label order
    assert units == {f"shard-{k[:6]}" for keys in got.values() for k in keys}  # the parts the members are in
    # the draw is uniform over a cluster whose members span every part
    pq.write_table(pa.table({"key": [f"{i:03d}" for i in range(60)], "cluster": pa.array([1] * 60, pa.int32())}),
                   tmp_path / "one.parquet")
    counts = np.zeros(60)
    for seed in range(400):
        for k in draw_members(tmp_path / "one.parquet", [1], 6, seed)[0][1]:
            counts[int(k)] += 1
    assert counts.sum() == 2400 and counts.min() > 15 and counts.max() < 65  # 40 expected per key
    sizes_file = tmp_path / "cluster_stats.json"
    write_index(tmp_path, 97)
    sizes_file.write_text(json.dumps({"sizes": (sizes * 2).tolist()}))  # stale sizes: recounted
    assert cluster_sizes(tmp_path).tolist() == sizes.tolist()
    sizes_file.write_text(json.dumps({"sizes": sizes[::-1].tolist()}))  # recorded sizes are used
    assert cluster_sizes(tmp_path).tolist() == sizes[::-1].tolist()


def test_contact_sheet_members_memory_stays_flat_at_1m_rows(million_labels: Path, tmp_path: Path) -> None:
    """Picking contact-sheet members from a million labels holds a part and the picks, not every label."""
    from PIL import Image

    from seerlike.eval.members import cluster_members, pick_clusters

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")  # no member is here: the lookup is trivial
    tracemalloc.start()
    try:
        groups = cluster_members(million_labels, str(tmp_path / "images"), clusters=6, per_cluster=4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    sizes = np.bincount(((np.arange(10_000)[None, :] * 7 + np.arange(100)[:, None]) % 97).ravel())
    assert {kind: [title for title, _ in rows] for kind, rows in groups.items()} == \
        {kind: [f"cluster {c} (n={sizes[c]})" for c in cs] for kind, cs in pick_clusters(sizes, 6, 0).items()}
    # every key as a Python string (the in-memory draw) is > 60 MB here; the streamed draw a few
    assert peak < 8e6, f"contact-sheet members peaked at {peak / 1e6:.1f} MB of Python objects"


# ---------------------------------------------------------------- features


def test_feature_index_streams_and_detects_duplicate_keys(tmp_path: Path) -> None:
    for unit, keys in (("a", ["k1", "k2"]), ("b", ["k3"]), ("c", [])):
        fstore.write_chunk(tmp_path, unit, keys, np.zeros((len(keys), 4), np.float32))
    meta = fstore.finalize(tmp_path, {"dim": 4})
    assert meta["num_samples"] == 3 and not meta["duplicate_keys"]
    assert pq.read_table(tmp_path / fstore.INDEX).to_pylist() == [
        {"key": "k1", "label": None, "chunk": "a", "row": 0}, {"key": "k2", "label": None, "chunk": "a", "row": 1},
        {"key": "k3", "label": None, "chunk": "b", "row": 0}]
    ranges = [(2, "a", "m", True), (2, "b", "z", True)]  # overlapping ranges: the keys decide
    assert not fstore.duplicate_keys(ranges, lambda: pa.chunked_array([pa.array(["a", "m", "b", "z"])]))
    assert fstore.duplicate_keys(ranges, lambda: pa.chunked_array([pa.array(["a", "m", "m", "z"])]))
    assert fstore.duplicate_keys([(2, "a", "a", False)], lambda: pytest.fail("not needed"))


def test_kmeans_sample_rows_match_a_mask_per_chunk(tmp_path: Path) -> None:
    from seerlike.eval.cluster import draw_sample

    rows = 0
    for u, n in enumerate([5, 0, 17, 3, 40]):
        fstore.write_chunk(tmp_path, f"u{u}", [f"{u}-{i}" for i in range(n)],
                           (np.arange(n)[:, None] + rows + np.zeros((1, 3))).astype(np.float32))
        rows += n
    fstore.finalize(tmp_path, {"dim": 3})
    store = fstore.FeatureStore(tmp_path)
    want = np.sort(np.random.default_rng(7).choice(rows, size=20, replace=False))
    assert draw_sample(store, 20, 7)[:, 0].tolist() == want.tolist()  # row i of the store holds value i


# ---------------------------------------------------------------- ingest merge, shard index, readers


@pytest.fixture(scope="module")
def labelled_ingest(cifar_dir, tmp_path_factory):
    """A labelled CSV of 24 CIFAR images plus 4 repeats in later chunks, ingested in chunks of 5."""
    root = tmp_path_factory.mktemp("scale")
    lines = (cifar_dir / "train.csv").read_text().splitlines()
    rows = [f"{cifar_dir}/{t}" for t in lines[1::len(lines) // 24][:24]]  # every class
    rows += [rows[1], rows[7], rows[3], rows[1]]
    (root / "list.csv").write_text("path,label\n" + "\n".join(f"{r.split(',')[0]},{r.split(',')[1]}" for r in rows) + "\n")
    cfg = IngestConfig(inputs=(str(root / "list.csv"),), out=str(root / "ds"), chunk_size=5, shard_max_samples=2,
                       progress=False, shuffle=False)
    summary = ingest(cfg)
    return root, cfg, summary


def test_merge_in_separate_steps_matches_one_merge(labelled_ingest, tmp_path: Path) -> None:
    root, cfg, summary = labelled_ingest
    assert summary["duplicates_across_chunks"] == 4 and summary["written"] == 24
    cfg2 = cfg.replace(out=str(tmp_path / "ds"))
    for k in plan(cfg2):
        ingest_chunk(cfg2, k)
    p = merge_prepare(cfg2)
    for k in reversed(p.chunks):  # any order, as the tasks of a merge array finish
        merge_chunk(cfg2, k)
    mark = (tmp_path / "ds" / "_ingest" / "merged" / "000005.json").stat().st_mtime_ns
    assert merge_chunk(cfg2, 5)["rewritten"]  # a rerun returns the recorded marker, rewrites nothing
    assert (tmp_path / "ds" / "_ingest" / "merged" / "000005.json").stat().st_mtime_ns == mark
    got = merge_finish(cfg2)
    assert read_manifest(cfg2.out).to_pylist() == read_manifest(str(root / "ds")).to_pylist()
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "ds" / "shards").iterdir())} == \
        {p.name: p.read_bytes() for p in sorted((root / "ds" / "shards").iterdir())}
    fields = ("seen", "written", "duplicate", "rejected", "rejected_by_reason", "duplicates_across_chunks",
              "kept_original", "shards", "chunks", "bytes_in", "bytes_written")
    assert {f: got[f] for f in fields} == {f: summary[f] for f in fields}
    (tmp_path / "ds" / "_ingest" / "done" / "000002.json").write_text('{"chunk": 2, "seconds": 1}')  # chunk 2 redone
    with pytest.raises(RuntimeError, match="chunk 2 is not merged against the current dedup"):
        merge_finish(cfg2)


def test_shard_index_matches_a_manifest_scan(labelled_ingest, tmp_path: Path) -> None:
    root, _, _ = labelled_ingest
    ds = root / "ds"
    index = read_shard_index(str(ds))
    rows = read_manifest(str(ds)).to_pylist()
    scanned = {}
    for i, r in enumerate(rows):
        if r["status"] == "written":
            e = scanned.setdefault(r["shard"], {"count": 0, "bytes": 0, "keys": [], "rows": []})
            e["count"] += 1
            e["bytes"] += r["size"]
            e["keys"].append(r["key"])
            e["rows"].append(i)
    assert index["shard"].to_pylist() == sorted(scanned)
    for e in index.to_pylist():
        s = scanned[e["shard"]]
        assert (e["count"], e["bytes"], e["first_key"], e["last_key"]) == (s["count"], s["bytes"], min(s["keys"]), max(s["keys"]))
        assert (e["row_start"], e["row_end"]) == (min(s["rows"]), max(s["rows"]) + 1)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(ds / "manifest.parquet", bare / "manifest.parquet")
    assert not (bare / SHARDS).exists() and shard_counts(str(bare)) == shard_counts(str(ds))
    assert shard_counts(str(ds)) == [(s, v["count"]) for s, v in sorted(scanned.items())]


def test_verify_chunk_by_chunk_finds_what_the_whole_check_finds(labelled_ingest, tmp_path: Path) -> None:
    from sharding.manifest import SCHEMA

    root, _, _ = labelled_ingest
    ds = tmp_path / "ds"
    shutil.copytree(root / "ds", ds)
    assert verify(str(ds)) == []
    shards = sorted((ds / "shards").iterdir())
    shards[1].unlink()
    (ds / "shards" / "999999-0000.tar").write_bytes(shards[0].read_bytes())
    rows = read_manifest(str(ds)).to_pylist()
    moved = next(r for r in rows if r["shard"] == f"shards/{shards[4].name}")
    moved["offset"] += 1
    dup = next(r for r in rows if r["status"] == "duplicate")
    dup["shard"] = "shards/000000-0000.tar"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), ds / "manifest.parquet")
    streamed = verify(str(ds))
    # the same manifest without its chunk column is checked all at once
    pq.write_table(pq.read_table(ds / "manifest.parquet").drop(["chunk"]), ds / "manifest.parquet")
    whole = verify(str(ds))
    assert sorted(streamed) == sorted(whole) == sorted([
        f"shards/{shards[1].name}: missing", "shards/999999-0000.tar: shard not in the manifest",
        f"shards/{shards[4].name}: {moved['key']} bytes differ at offset {moved['offset']}",
        f"{dup['key']}: status duplicate but has shard shards/000000-0000.tar"])


def test_contact_sheet_images_are_read_from_the_members_shards_only(labelled_ingest, tmp_path: Path,
                                                                     monkeypatch) -> None:
    import dataclasses

    from seerlike.eval import members as members_mod
    from seerlike.eval.extract import decode_view, list_units

    root, _, _ = labelled_ingest
    units = list_units(str(root / "ds"))
    samples = {u.name: list(u.read()) for u in units}
    (tmp_path / "labels").mkdir()
    for i, u in enumerate(units):  # labels as `seerlike cluster` writes them: one part per extracted unit
        keys = [s.key for s in samples[u.name]]
        pq.write_table(pa.table({"key": keys, "cluster": pa.array([i % 6] * len(keys), pa.int32()),
                                 "distance": pa.array(np.zeros(len(keys)), pa.float32())}),
                       tmp_path / "labels" / f"features-{u.name}.parquet")
    read: list[str] = []

    def counted(data: str):
        return [dataclasses.replace(u, read=lambda u=u: (read.append(u.name), u.read())[1]) for u in list_units(data)]

    monkeypatch.setattr(members_mod, "list_units", counted)
    groups = members_mod.cluster_members(tmp_path, str(root / "ds"), clusters=2, per_cluster=1, thumb=8)
    drawn, from_units = members_mod.draw_members(tmp_path, [c for c in range(6) if any(
        t.startswith(f"cluster {c} ") for rows in groups.values() for t, _ in rows)], 1)
    assert len(units) >= 10 and sorted(read) == sorted(from_units) and len(read) <= 2
    by_key = {s.key: s for ss in samples.values() for s in ss}
    images = [im for rows in groups.values() for _, ims in rows for im in ims]
    want = [decode_view(by_key[k], 8, 8) for c in sorted(drawn) for k in drawn[c]]
    assert len(images) == 2 and all(any(np.array_equal(a, b) for b in want) for a in images)


def test_verify_in_parts_finds_what_one_process_finds(labelled_ingest, tmp_path: Path, capsys) -> None:
    import argparse

    from seerlike.config import ConfigError
    from sharding.manifest import SCHEMA
    from sharding.stats import parse_part
    from sharding.stats import run as stats_command

    root, _, _ = labelled_ingest
    ds = tmp_path / "ds"
    shutil.copytree(root / "ds", ds)
    shards = sorted((ds / "shards").iterdir())
    assert len(shards) >= 8 and [verify(str(ds), part=(i, 3)) for i in range(3)] == [[], [], []]
    shards[1].unlink()
    shards[6].write_bytes(shards[6].read_bytes()[:1024])  # cut after its first member
    (ds / "shards" / "999999-0000.tar").write_bytes(shards[0].read_bytes())  # named past the last chunk
    (ds / "shards" / "000003-0099.tar").write_bytes(shards[0].read_bytes())  # named for a middle chunk
    (ds / "shards" / "other.tar").write_bytes(shards[0].read_bytes())  # not an ingest name
    rows = read_manifest(str(ds)).to_pylist()
    moved = next(r for r in rows if r["shard"] == f"shards/{shards[4].name}")
    moved["offset"] += 1
    dup = next(r for r in rows if r["status"] == "duplicate")
    dup["shard"] = "shards/000000-0000.tar"
    late = [r for r in rows if r["status"] == "written"][-1]  # the last chunk's row lists a shard named for chunk 0
    late["shard"] = f"shards/{shards[0].name}"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), ds / "manifest.parquet", row_group_size=4)
    whole = verify(str(ds))
    assert len(whole) >= 7 and f"shards/{shards[1].name}: missing" in whole
    assert f"{late['key']}: a row of chunk 4 lists shard shards/{shards[0].name} of chunk 0" in whole
    assert any(p.startswith(f"shards/{shards[6].name}: ") and "absent" in p for p in whole)
    for n in (1, 2, 3, 4, 9):  # 9 parts of 6 chunks: some parts are empty
        parts = [verify(str(ds), part=(i, n)) for i in range(n)]
        assert sorted(p for got in parts for p in got) == sorted(whole), n
    args = argparse.Namespace(dataset=str(ds), verify=True, part="1/3", endpoint_url=None)
    assert stats_command(args) == 1  # the command: only this part's check, its problems listed
    assert json.loads(capsys.readouterr().out)["verify"] == {
        "part": "1/3", "ok": False, "problems": verify(str(ds), part=(1, 3)), "n_problems": 4}
    with pytest.raises(ConfigError, match="add --verify"):
        stats_command(argparse.Namespace(dataset=str(ds), verify=False, part="0/2", endpoint_url=None))
    with pytest.raises(ConfigError, match="I/N"):
        parse_part("3")
    with pytest.raises(ConfigError, match="0..N-1"):
        parse_part("4/4")
    pq.write_table(pq.read_table(ds / "manifest.parquet").drop(["chunk"]), ds / "manifest.parquet")
    with pytest.raises(ConfigError, match="chunk column"):
        verify(str(ds), part=(0, 2))


def _stats_by_row(dataset: str) -> dict:
    """ingest-stats as a loop over every row, with every written row's sizes kept (exact quantiles)."""
    rows = read_manifest(dataset, ["status", "reason", "orig_format", "shard", "width", "height", "size",
                                   "kept_original"]).to_pylist()
    written = [r for r in rows if r["status"] == "written"]
    q = (0.0, 0.05, 0.5, 0.95, 1.0)
    count = lambda col: Counter(r[col] for r in rows if r[col])  # noqa: E731
    return {"rows": len(rows), "status": dict(Counter(r["status"] for r in rows)),
            "rejected_by_reason": dict(count("reason").most_common()),
            "orig_formats": dict(count("orig_format").most_common()),
            "shards": len({r["shard"] for r in written}), "kept_original": sum(bool(r["kept_original"]) for r in written),
            "stored": {n: dict(zip(("min", "p5", "p50", "p95", "max"),
                                   np.quantile([float(r[n]) for r in written], q).round(1).tolist()))
                       for n in ("width", "height", "size")} if written else {}}


def test_ingest_stats_by_batch_match_the_row_loop(labelled_ingest, tmp_path: Path, monkeypatch) -> None:
    from sharding import stats
    from sharding.manifest import SCHEMA

    root, _, _ = labelled_ingest
    assert stats.manifest_stats(str(root / "ds")) == _stats_by_row(str(root / "ds"))
    # 100,000 rows in several record batches: every written row in the reservoir, exact quantiles
    rng = np.random.default_rng(1)
    n = 100_000
    st = rng.choice(["written", "duplicate", "rejected"], n, p=[0.9, 0.04, 0.06])
    w = st == "written"
    reason = np.where(w, None, rng.choice(["too_small", "truncated", "fetch_failed"], n, p=[0.5, 0.3, 0.2]))
    mask = lambda a: pa.array(np.where(w, a, None).tolist(), mask=~w)  # noqa: E731
    table = pa.table({"status": st, "reason": pa.array(reason.tolist()),
                      "orig_format": rng.choice(["JPEG", "PNG", "WEBP"], n, p=[0.8, 0.15, 0.05]),
                      "shard": mask(np.char.add("shards/", (np.arange(n) // 1000).astype(str))),
                      "width": mask(rng.integers(64, 2000, n)), "height": mask(rng.integers(64, 2000, n)),
                      "size": mask(rng.lognormal(11.4, 0.8, n).astype(int)), "kept_original": mask(rng.random(n) < 0.3)})
    table = table.cast(pa.schema([SCHEMA.field(c) for c in table.column_names]))
    pq.write_table(table, tmp_path / "manifest.parquet", row_group_size=30_000)
    want = _stats_by_row(str(tmp_path))
    assert stats.manifest_stats(str(tmp_path)) == want
    # a reservoir of 10,000 of the 90,000 written rows: exact counts and extremes, close quantiles
    monkeypatch.setattr(stats, "_RESERVOIR", 10_000)
    got = stats.manifest_stats(str(tmp_path), seed=3)
    assert got == stats.manifest_stats(str(tmp_path), seed=3) != stats.manifest_stats(str(tmp_path), seed=4)
    assert {k: v for k, v in got.items() if k != "stored"} == {k: v for k, v in want.items() if k != "stored"}
    for name, q in got["stored"].items():
        exact = want["stored"][name]
        values = table[name].drop_null().to_numpy()
        assert (q["min"], q["max"]) == (exact["min"], exact["max"])
        for p, at in (("p5", 0.05), ("p50", 0.5), ("p95", 0.95)):
            assert abs((values <= q[p]).mean() - at) < 0.02  # 4 standard errors of a 10,000-row sample


def test_jobs_status_asks_sacct_once_per_array(tmp_path: Path, monkeypatch) -> None:
    from launchers import jobs

    calls = tmp_path / "calls"
    sacct = tmp_path / "bin" / "sacct"
    sacct.parent.mkdir()
    # like sacct -X for an array whose task 2 is still pending (shown as a range)
    sacct.write_text('#!/bin/sh\necho "$@" >> "%s"\n'
                     'printf "77_0|COMPLETED\\n77_1|FAILED\\n77_[2-2]|PENDING\\n78|CANCELLED by 0\\n"\n' % calls)
    sacct.chmod(0o755)
    monkeypatch.setenv("PATH", f"{sacct.parent}:{os.environ['PATH']}")
    got = jobs._slurm_states(["77_0", "77_1", "77_2", "78", "79"])
    assert got == {"77_0": "COMPLETED", "77_1": "FAILED", "77_2": "PENDING", "78": "CANCELLED", "79": "PENDING"}
    assert calls.read_text().splitlines() == ["-j 77,78,79 -X -n -P -o JobID,State"]  # one call, by array


def test_listing_shuffle_spilled_to_buckets_is_a_seeded_permutation(tmp_path: Path, monkeypatch) -> None:
    from sharding.sources import Source

    listing = [Source(f"/site{i // 50:03d}/{i:05d}.jpg", f"site{i // 50}") for i in range(1000)]  # sorted by site
    spilled = [s for t in shuffle.shuffled(listing, 3, str(tmp_path / "s"), in_memory=64, buckets=8)
               for s in t["source"].to_pylist()]
    again = [s for t in shuffle.shuffled(listing, 3, str(tmp_path / "s"), in_memory=64, buckets=8)
             for s in t["source"].to_pylist()]
    in_memory = [s for t in shuffle.shuffled(listing, 3, str(tmp_path / "m")) for s in t["source"].to_pylist()]
    assert sorted(spilled) == sorted(in_memory) == [s.ref for s in listing]
    assert spilled == again and spilled != in_memory and not (tmp_path / "s").exists()
    # every run of 50 consecutive planned inputs (a chunk) mixes many of the 20 sites
    assert min(len({s.split("/")[1] for s in spilled[i:i + 50]}) for i in range(0, 1000, 50)) >= 10
    # the plan: chunk lists cut from the spilled shuffle, every input once
    monkeypatch.setattr(shuffle, "IN_MEMORY", 64)
    monkeypatch.setattr(shuffle, "BUCKETS", 8)
    (tmp_path / "list.txt").write_text("\n".join(s.ref for s in listing) + "\n")
    cfg = IngestConfig(inputs=(str(tmp_path / "list.txt"),), out=str(tmp_path / "out"), chunk_size=30, progress=False)
    p = plan(cfg)
    chunks = [pq.read_table(tmp_path / "out" / "_ingest" / "chunks" / f"{k:06d}.parquet") for k in p.chunks]
    assert p.n_inputs == 1000 and p.n_chunks == 34 and [c.num_rows for c in chunks] == [30] * 33 + [10]
    planned = [s for c in chunks for s in c["source"].to_pylist()]
    assert sorted(planned) == [s.ref for s in listing] and planned != [s.ref for s in listing]
    assert not list((tmp_path / "out" / "_ingest").rglob("*.arrow"))


def test_shard_index_read_by_range_from_s3(labelled_ingest, s3_bucket) -> None:
    from seerlike import storage

    root, _, _ = labelled_ingest
    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/ds"
    for name in ("manifest.parquet", "shards.parquet"):
        storage.put_file(root / "ds" / name, f"{url}/{name}", endpoint_url=endpoint)
    assert shard_counts(url, endpoint_url=endpoint) == shard_counts(str(root / "ds"))


def test_a_full_manifest_scan_holds_one_row_group_not_the_file(tmp_path: Path) -> None:
    from sharding.manifest import iter_manifest

    n = 400_000
    shards = pa.array(bytes.hex(os.urandom(16 * n), " ", 16).split())  # incompressible: 32 hex chars a row
    pq.write_table(pa.table({"shard": shards, "status": pa.array(["written"] * n)}), tmp_path / "manifest.parquet",
                   row_group_size=20_000)
    assert (tmp_path / "manifest.parquet").stat().st_size > 8e6
    base = pa.total_allocated_bytes()
    peak, rows = 0, 0
    for batch in iter_manifest(str(tmp_path), ["shard", "status"]):
        rows += batch.num_rows
        peak = max(peak, pa.total_allocated_bytes() - base)
    # pre-buffered reads would keep every column chunk read: the file's 13 MB by the end
    assert rows == n and peak < 6e6, f"scan held {peak / 1e6:.1f} MB"
