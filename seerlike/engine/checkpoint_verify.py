"""A checkpoint folder read as untrusted input: DCP metadata without arbitrary unpickling, checksums.

DCP stores its ``.metadata`` with :mod:`pickle`, and ``pickle.load`` runs whatever callable a
crafted file names. :func:`read_dcp_metadata` unpickles it with an allow-list: DCP's metadata
dataclasses, ``torch.Size``, torch dtypes and layouts, memory-format codes, paths; any other
global is refused before it is looked up, so nothing in the file can run. Every reader of a
seerlike checkpoint goes through :class:`SafeFileSystemReader` (docs/engine.md, "Loading and
verification").

``checksums.json`` (written before ``COMPLETE``) holds the size and sha256 of every file of the
checkpoint; :func:`verify_files` checks them, so a truncated, overwritten or missing file is
reported by name before anything is loaded. Checkpoints from before checksums existed (their
``meta.json`` has no ``"checksums"`` entry) load with a warning, after a size check of the DCP
files against the metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata

from seerlike.config import ConfigError
from seerlike.storage import write_bytes

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"
METADATA = ".metadata"
_DCP_FILE_RE = re.compile(r"^__\d+_\d+\.distcp$")
_BLOCK = 4 << 20


class CheckpointError(ConfigError):
    """A checkpoint that is damaged, incomplete or not a seerlike checkpoint; names the folder and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"checkpoint {path}: {reason}")


# ---------------------------------------------------------------- DCP metadata without pickle's reach

_ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},  # and every torch dtype, checked by type below
    "torch.serialization": {"_get_layout"},  # a name -> torch.layout lookup
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # StorageMeta.checkpoint_id
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals a DCP ``.metadata`` is made of; anything else is refused unlooked-up."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of DCP's metadata")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it holds a persistent reference, which DCP's metadata never does")


def read_dcp_metadata(ckpt_dir: str | os.PathLike) -> dcp_metadata.Metadata:
    """The DCP metadata of ``ckpt_dir``, unpickled with the allow-list and checked for sanity."""
    path = Path(ckpt_dir) / METADATA
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(ckpt_dir, f"{path} is missing") from None
    except Exception as e:  # a crafted or damaged pickle can fail in any way; none of it ran code
        raise CheckpointError(ckpt_dir, f"refusing {path}: {e}") from None
    if not isinstance(md, dcp_metadata.Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise CheckpointError(ckpt_dir, f"refusing {path}: it is not DCP metadata ({type(md).__name__})")
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(
                entry, (dcp_metadata.TensorStorageMetadata, dcp_metadata.BytesStorageMetadata)):
            raise CheckpointError(ckpt_dir, f"refusing {path}: entry {key!r} is not DCP storage metadata")
    for info in md.storage_data.values():
        # file names come from the file: only DCP's own shard names, never a path
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not _DCP_FILE_RE.match(name):
            raise CheckpointError(ckpt_dir, f"refusing {path}: it points at {name!r}, not a DCP shard file")
        if not all(isinstance(getattr(info, a, None), int) and getattr(info, a) >= 0 for a in ("offset", "length")):
            raise CheckpointError(ckpt_dir, f"refusing {path}: bad offset/length for {name}")
    if getattr(md, "storage_meta", None) is None:
        md.storage_meta = dcp_metadata.StorageMeta()
    return md


def dcp_files(md: dcp_metadata.Metadata) -> dict[str, int]:
    """DCP shard file -> the bytes the metadata says it holds at least."""
    need: dict[str, int] = {}
    for info in md.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    return need


def check_dcp_sizes(ckpt_dir: str | os.PathLike, md: dcp_metadata.Metadata) -> None:
    """Every shard the metadata points at exists and is long enough (catches truncation without checksums)."""
    for name, need in sorted(dcp_files(md).items()):
        p = Path(ckpt_dir) / name
        if not p.is_file():
            raise CheckpointError(ckpt_dir, f"{p} is missing")
        if p.stat().st_size < need:
            raise CheckpointError(ckpt_dir, f"{p} is truncated ({p.stat().st_size} bytes, the metadata needs {need})")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with :func:`read_dcp_metadata` in place of ``pickle.load``.

    Pass the metadata when it was read (and checked) already, so DCP uses that very object.
    Rank-local metadata files are never written by seerlike and are not read.
    """

    def __init__(self, path: str | os.PathLike, metadata: dcp_metadata.Metadata | None = None):
        super().__init__(str(path))
        self._ckpt_dir = Path(path)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError(self._ckpt_dir, "has no global .metadata (rank-local metadata is not read)")
        md = self._metadata if self._metadata is not None else read_dcp_metadata(self._ckpt_dir)
        md.storage_meta.load_id = self.load_id
        return md


# ---------------------------------------------------------------- checksums


def hash_file(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def hash_files(ckpt_dir: Path, names: Iterable[str]) -> dict[str, dict]:
    return {n: hash_file(ckpt_dir / n) for n in sorted(names)}


def write_checksums(ckpt_dir: Path, entries: dict[str, dict]) -> None:
    """``checksums.json``, written atomically (the COMPLETE marker follows it)."""
    text = json.dumps({"algorithm": "sha256", "files": dict(sorted(entries.items()))}, indent=1) + "\n"
    write_bytes(ckpt_dir / CHECKSUMS, text.encode())


def read_json(ckpt_dir: Path, name: str) -> dict:
    """A JSON object file of the checkpoint; :class:`CheckpointError` naming it if missing or unreadable."""
    path = ckpt_dir / name
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(ckpt_dir, f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(ckpt_dir, f"{path} is unreadable ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(ckpt_dir, f"{path} is not a JSON object")
    return data


def read_checksums(ckpt_dir: str | os.PathLike) -> dict[str, dict] | None:
    """The checksum table, or None for a checkpoint written before checksums (warned about)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / CHECKSUMS).exists():
        if read_json(ckpt_dir, "meta.json").get("checksums"):
            raise CheckpointError(ckpt_dir, f"{ckpt_dir / CHECKSUMS} is missing (meta.json says it was written)")
        log.warning("checkpoint %s has no %s (written before checksums were recorded): loading it unverified",
                    ckpt_dir, CHECKSUMS)
        return None
    table = read_json(ckpt_dir, CHECKSUMS).get("files")
    if not isinstance(table, dict) or not all(
            isinstance(n, str) and "/" not in n and n not in ("", ".", "..") and isinstance(e, dict)
            and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str) for n, e in table.items()):
        raise CheckpointError(ckpt_dir, f"{ckpt_dir / CHECKSUMS} is malformed")
    for needed in (METADATA, "meta.json"):
        if needed not in table:
            raise CheckpointError(ckpt_dir, f"{ckpt_dir / CHECKSUMS} does not list {needed}")
    return table


def verify_files(ckpt_dir: str | os.PathLike, *, rank: int = 0, world: int = 1) -> set[str] | None:
    """Check sizes of every listed file and the sha256 of this rank's share (every ``world``-th file).

    Returns the listed names, or None for a checkpoint without checksums. Raises
    :class:`CheckpointError` naming the first bad file.
    """
    ckpt_dir = Path(ckpt_dir)
    table = read_checksums(ckpt_dir)
    if table is None:
        return None
    names = sorted(table)
    for name in names:
        p = ckpt_dir / name
        if not p.is_file():
            raise CheckpointError(ckpt_dir, f"{p} is missing")
        size = p.stat().st_size
        if size != table[name]["bytes"]:
            raise CheckpointError(ckpt_dir, f"{p} has {size} bytes, {table[name]['bytes']} were written")
    for name in names[rank::world]:
        got = hash_file(ckpt_dir / name)["sha256"]
        if got != table[name]["sha256"]:
            raise CheckpointError(ckpt_dir, f"{ckpt_dir / name} fails its sha256 check "
                                            "(content changed since it was written)")
    return set(names)


def open_checkpoint(ckpt_dir: str | os.PathLike, *, rank: int = 0, world: int = 1) -> dcp_metadata.Metadata:
    """Verify ``ckpt_dir`` (this rank's share of the hashing) and return its checked DCP metadata."""
    listed = verify_files(ckpt_dir, rank=rank, world=world)
    md = read_dcp_metadata(ckpt_dir)
    if listed is not None:
        unlisted = sorted(set(dcp_files(md)) - listed)
        if unlisted:
            raise CheckpointError(ckpt_dir, f"DCP files {unlisted} are not in {CHECKSUMS}")
    check_dcp_sizes(ckpt_dir, md)
    return md

