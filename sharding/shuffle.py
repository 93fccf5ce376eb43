"""A seeded global shuffle of the input listing in bounded memory (two-level scatter).

Listings come sorted (one folder per class; a crawl by site or date over millions of
inputs). The plan cuts the shuffled listing into chunks, so every chunk, and every shard,
draws from the whole corpus.

Up to ``IN_MEMORY`` inputs are permuted in memory. A longer listing is scattered: each
input goes to one of ``BUCKETS`` spill files (Arrow IPC streams) drawn at random, then the
buckets are read back one at a time and each is permuted. A uniformly random bucket
followed by a uniform permutation within the bucket is a uniform permutation of the
whole; memory holds one bucket (~1/``BUCKETS`` of the listing) and disk the listing once.
The order depends only on the listing and the seed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa

from sharding.sources import Source

IN_MEMORY = 250_000
"""Listings up to this many inputs are permuted in memory (~120 MB); longer ones are read in batches of it."""
BUCKETS = 512
"""Spill files of a longer listing: ~2M inputs (~400 MB as Arrow) each at a billion."""
SCHEMA = pa.schema([("source", pa.string()), ("label", pa.string())])


def as_table(rows: list[Source]) -> pa.Table:
    """Inputs as the plan's chunk-list table."""
    return pa.table({"source": [s.ref for s in rows], "label": [s.label for s in rows]}, schema=SCHEMA)


def shuffled(sources: Iterable[Source], seed: int, scratch: str, *, in_memory: int | None = None,
             buckets: int | None = None) -> Iterator[pa.Table]:
    """The inputs in a seeded random order, as tables of ``source, label`` (scratch: a local folder)."""
    in_memory = in_memory or IN_MEMORY
    buckets = buckets or BUCKETS
    it = iter(sources)
    buf: list[Source] = []
    for src in it:
        buf.append(src)
        if len(buf) == in_memory:
            break
    else:
        if buf:
            yield as_table(buf).take(np.random.default_rng([seed, 0]).permutation(len(buf)))
        return
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    try:
        paths = [os.path.join(scratch, f"{b:05d}.arrow") for b in range(buckets)]
        rng = np.random.default_rng([seed, 1])
        sinks = [pa.OSFile(p, "wb") for p in paths]
        writers = [pa.ipc.new_stream(s, SCHEMA) for s in sinks]
        try:
            while buf:
                t = as_table(buf)
                b = rng.integers(0, buckets, size=t.num_rows)
                order = np.argsort(b, kind="stable")
                bounds = np.searchsorted(b[order], np.arange(buckets + 1))
                for i in np.flatnonzero(np.diff(bounds)):
                    writers[i].write_table(t.take(order[bounds[i]:bounds[i + 1]]))
                buf = [src for _, src in zip(range(in_memory), it)]
        finally:
            for w, s in zip(writers, sinks):
                w.close()
                s.close()
        for b, path in enumerate(paths):
            with pa.OSFile(path, "rb") as f:
                t = pa.ipc.open_stream(f).read_all()
            os.remove(path)
            if t.num_rows:
                yield t.take(np.random.default_rng([seed, 2, b]).permutation(t.num_rows))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
