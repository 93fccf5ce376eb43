"""Cross-chunk exact dedup (hash-partitioned) and the storage helpers it runs on."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from seerlike import storage
from sharding.dedup import cross_chunk_duplicates


def _brute_force(chunks):
    first: dict[str, int] = {}
    out = []
    for gids, hexes in chunks:
        for g, h in zip(gids.tolist(), hexes):
            if h in first:
                out.append((g, first[h]))
            else:
                first[h] = g
    return sorted(out)


@pytest.mark.parametrize("partitions", [1, 7, 256])
def test_cross_chunk_duplicates_match_brute_force(tmp_path, partitions):
    rng = np.random.default_rng(0)
    pool = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(300)]
    chunks = []
    for k in range(6):  # chunk k: ids k*1000 + index, hashes drawn with repeats across chunks
        picks = rng.choice(len(pool), size=80, replace=False)  # no repeats inside a chunk (the worker drops those)
        chunks.append((np.arange(80, dtype=np.int64) + 1000 * k, [pool[p] for p in picks]))
    dups, wins = cross_chunk_duplicates(iter(chunks), partitions=partitions, tmp_dir=tmp_path)
    expected = _brute_force(chunks)
    assert list(zip(dups.tolist(), wins.tolist())) == expected
    assert len(expected) > 50  # the test exercised real collisions
    assert not list(tmp_path.iterdir())  # spill files cleaned up


def test_cross_chunk_duplicates_order_independent_of_arrival(tmp_path):
    """Chunks may finish in any order; the first in input order (smallest id) still wins."""
    h = hashlib.sha256(b"x").hexdigest()
    chunks = [(np.array([2005], np.int64), [h]), (np.array([7], np.int64), [h]), (np.array([1003], np.int64), [h])]
    dups, wins = cross_chunk_duplicates(iter(chunks), partitions=4, tmp_dir=tmp_path)
    assert dups.tolist() == [1003, 2005] and wins.tolist() == [7, 7]


def test_storage_local_roundtrip(tmp_path):
    target = tmp_path / "a" / "b.bin"
    storage.write_bytes(target, b"hello")
    assert storage.read_bytes(target) == b"hello" and storage.exists(target)
    with pytest.raises(RuntimeError):
        with storage.atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"hello"  # untouched
    assert sorted(os.listdir(target.parent)) == ["b.bin"]  # no temp file left
    (tmp_path / "a" / "c").mkdir()
    (tmp_path / "a" / "c" / "z.txt").write_text("z")
    (tmp_path / "a" / "A.txt").write_text("A")
    names = [os.path.relpath(p, tmp_path) for p, _ in storage.list_files(tmp_path)]
    assert names == ["a/A.txt", "a/b.bin", "a/c/z.txt"]
    src = tmp_path / "src.bin"
    src.write_bytes(b"xyz")
    storage.put_file(src, tmp_path / "out" / "dst.bin", move=True)
    assert not src.exists() and (tmp_path / "out" / "dst.bin").read_bytes() == b"xyz"
    storage.remove(tmp_path / "out" / "dst.bin")
    storage.remove(tmp_path / "out" / "dst.bin")  # idempotent


def test_urls():
    assert storage.split_s3_url("s3://bkt/a/b.tar") == ("bkt", "a/b.tar")
    assert storage.split_s3_url("s3://bkt") == ("bkt", "")
    with pytest.raises(ValueError, match="not an S3 URL"):
        storage.split_s3_url("/local/path")
    assert storage.join("s3://bkt/ds/", "shards", "x.tar") == "s3://bkt/ds/shards/x.tar"
    assert storage.join("/d", "shards", "x.tar") == "/d/shards/x.tar"
    red = storage.redact_url("https://user:hunter2@host:8443/img.jpg?X-Amz-Signature=abc")
    assert red == "https://host:8443/img.jpg" and "hunter2" not in red


def test_endpoint_resolution(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert storage.endpoint_from_env() == "http://127.0.0.1:9"
    assert storage.endpoint_from_env("http://other:1") == "http://other:1"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert storage.endpoint_from_env() is None
