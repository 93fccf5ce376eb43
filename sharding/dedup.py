"""Exact dedup across chunks, hash-partitioned so memory never holds the whole corpus.

Within a chunk the worker drops repeats itself (a dict of that chunk's hashes). Across
chunks the merge streams every chunk's written ``(sha256, global id)`` pairs into
``partitions`` spill files by hash prefix, then sorts one partition at a time: in each run
of equal hashes the smallest global id (= first in input order) wins and the others are
duplicates. Memory: one partition (~40 bytes x written / partitions) plus 16 bytes per
cross-chunk duplicate found. The result depends only on the inputs, never on which worker
or job finished first, so reruns are idempotent.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

RECORD = np.dtype([("h", "S32"), ("g", "<i8")])


def partition_of(digests: np.ndarray, partitions: int) -> np.ndarray:
    """Partition of each 32-byte digest: its first two bytes scaled to [0, partitions)."""
    raw = np.frombuffer(digests.tobytes(), dtype=np.uint8).reshape(-1, 32)
    prefix = raw[:, 0].astype(np.int64) << 8 | raw[:, 1].astype(np.int64)
    return (prefix * partitions) >> 16


def digests(hexes) -> np.ndarray:
    """32-byte digests (``S32``) of sha256 hex strings: a list, or a pyarrow string array decoded vectorised."""
    if isinstance(hexes, list):
        return np.array([bytes.fromhex(h) for h in hexes], dtype="S32")
    import pyarrow as pa

    arr = hexes.combine_chunks() if isinstance(hexes, pa.ChunkedArray) else hexes
    if arr.null_count or len(arr) == 0:
        return digests(arr.to_pylist()) if len(arr) else np.empty(0, "S32")
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset:arr.offset + len(arr) + 1]
    if not (np.diff(offsets) == 64).all():
        raise ValueError("sha256 hex digests must be 64 characters")
    chars = np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].reshape(-1, 64)
    nib = np.full(256, 255, np.uint8)
    nib[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
    nib[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
    v = nib[chars]
    if (v == 255).any():
        raise ValueError("sha256 digests must be hexadecimal")
    return np.ascontiguousarray((v[:, 0::2] << 4) | v[:, 1::2]).view("S32").ravel()


def _sort_by_hash_then_id(arr: np.ndarray) -> np.ndarray:
    """Records ordered by (hash, global id): a stable lexsort on the hash's four 64-bit words."""
    words = np.ascontiguousarray(arr["h"]).view(">u8").reshape(-1, 4)
    return arr[np.lexsort((arr["g"], words[:, 3], words[:, 2], words[:, 1], words[:, 0]))]


def cross_chunk_duplicates(
    chunks: Iterable[tuple[np.ndarray, object]],
    *,
    partitions: int,
    tmp_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Find later copies among written samples.

    ``chunks`` yields ``(global_ids int64, sha256 hex digests)`` per chunk, written rows only;
    the digests are a list of str or a pyarrow string array. Returns ``(duplicate_ids,
    winner_ids)`` sorted by duplicate id: each duplicate and the id of the first (smallest
    id) sample with the same hash.
    """
    with tempfile.TemporaryDirectory(prefix="seerlike-dedup-", dir=tmp_dir) as tmp:
        paths = [Path(tmp) / f"{p:05d}.bin" for p in range(partitions)]
        files = {}
        try:
            for gids, hexes in chunks:
                if len(gids) == 0:
                    continue
                rec = np.empty(len(gids), dtype=RECORD)
                rec["h"] = digests(hexes)
                rec["g"] = gids
                part = partition_of(rec["h"], partitions)
                order = np.argsort(part, kind="stable")
                rec, part = rec[order], part[order]
                bounds = np.flatnonzero(np.diff(part)) + 1
                for block in np.split(rec, bounds):
                    p = int(partition_of(block["h"][:1], partitions)[0])
                    f = files.get(p)
                    if f is None:
                        f = files[p] = open(paths[p], "ab")
                    block.tofile(f)
        finally:
            for f in files.values():
                f.close()
        dups, wins = [], []
        for p in sorted(files):
            arr = _sort_by_hash_then_id(np.fromfile(paths[p], dtype=RECORD))
            starts = np.r_[True, arr["h"][1:] != arr["h"][:-1]]
            winner = arr["g"][np.flatnonzero(starts)][np.cumsum(starts) - 1]
            dups.append(arr["g"][~starts])
            wins.append(winner[~starts])
            paths[p].unlink()
    if not dups:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    d, w = np.concatenate(dups), np.concatenate(wins)
    order = np.argsort(d, kind="stable")
    return d[order], w[order]
