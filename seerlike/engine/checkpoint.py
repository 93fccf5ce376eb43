"""Sharded checkpoints with torch.distributed.checkpoint (DCP), visible only when complete.

Layout of ``ROOT/step_{N:08d}/`` (ROOT defaults to ``RUN_DIR/checkpoints``)::

    .metadata, __{rank}_0.distcp   DCP: {"model": method state dict, "optim": optimizer state dict}
    meta.json                      step, world size, grad-scaler state, time (rank 0)
    config.yaml                    the TrainConfig that continues the run
    rank_{r:05d}.json              per rank: data-pipeline position, Python RNG state
    rank_{r:05d}.safetensors       per rank: torch RNG states and this rank's unsharded buffers
                                   (BatchNorm running stats differ per rank without SyncBN)
    checksums.json                 size and sha256 of every file above (each rank hashes its own)
    COMPLETE                       written last, by rank 0, after every rank has finished

Loading treats the folder as untrusted (``checkpoint_verify``): sizes and checksums are checked
first, DCP's pickled ``.metadata`` is read with an allow-list unpickler, tensors come from DCP
and safetensors, the few non-tensor DCP entries (optimizer hyper-parameters) are read with
``weights_only=True``, the rest is JSON. Nothing can run code. A damaged checkpoint raises
:class:`CheckpointError` naming the folder, file and reason; resume then falls back to the next
older complete one (docs/engine.md, "Loading and verification").

Resuming on a different world size: DCP reshards model and optimizer; buffers come from
the DCP copy (rank 0's); RNGs are reseeded; each rank hands the data pipeline a saved
position (rank min(r, old_world - 1)'s), which it recognises as from another world size
and answers by starting the next epoch afresh (deterministic, but not the uninterrupted
run's order).

``s3://bucket/prefix`` roots: each rank writes into a local staging folder, uploads its own
files, and rank 0 writes the ``COMPLETE`` object last; resume downloads the newest complete
checkpoint into ``RUN_DIR/checkpoints_cache``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import random
import re
import shutil
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from seerlike import config as configlib
from seerlike import storage
from seerlike.engine.checkpoint_verify import (CHECKSUMS, CheckpointError, SafeFileSystemReader, hash_files,
                                               open_checkpoint, read_json, write_checksums)

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d{8})$")


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 1000
    """Save every this many optimizer steps (and at the end of the run)."""
    keep_last: int = 3
    """Keep the newest N complete checkpoints; 0 keeps all."""
    dir: str = ""
    """Checkpoint root: empty = RUN_DIR/checkpoints; a local path or s3://bucket/prefix."""
    async_save: bool = False
    """Write the DCP shards in the background (dcp.async_save); COMPLETE is written once they are done."""
    resume: bool = True
    """Resume from the newest complete checkpoint that loads; false starts afresh (refused if checkpoints exist)."""
    overwrite: bool = False
    """Start afresh after deleting the root's checkpoints; the run's recorded config.yaml says false."""

    def __post_init__(self):
        if self.every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1, got {self.every_steps}")
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last must be >= 0, got {self.keep_last}")


# ---------------------------------------------------------------- finding checkpoints


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def _root_of(run_or_root: str | Path) -> Path:
    p = Path(run_or_root)
    return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def list_complete(run_or_root: str | Path) -> list[Path]:
    """Complete checkpoints under a run dir or a checkpoint root, oldest first."""
    root = _root_of(run_or_root)
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if _STEP_RE.match(d.name) and (d / COMPLETE).is_file()]
    return sorted(found, key=lambda d: d.name)


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (``RUN_DIR`` or its checkpoint root), or None."""
    done = list_complete(run_dir)
    return done[-1] if done else None


def step_of(ckpt_dir: str | Path) -> int:
    m = _STEP_RE.match(Path(ckpt_dir).name)
    if not m:
        raise ValueError(f"{ckpt_dir} is not a checkpoint folder (expected step_NNNNNNNN)")
    return int(m.group(1))


# ---------------------------------------------------------------- loading without pickle


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor entries load with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_tensors(ckpt_dir: str | Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Every tensor whose flattened DCP key starts with ``prefix``, unsharded, on this process only.

    The checkpoint is verified first; a damaged one raises :class:`CheckpointError` naming the
    file and reason (and the run's older complete checkpoints, which may be loaded instead).
    """
    try:
        meta = open_checkpoint(ckpt_dir)
        flat = {k[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype)
                for k, m in meta.state_dict_metadata.items()
                if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
        if not flat:
            raise CheckpointError(ckpt_dir, f"no tensors under {prefix!r}")
        # keys nest under one top-level name so DCP's flattening reproduces the stored FQNs
        top = prefix.rstrip(".")
        state = {top: flat}
        with warnings.catch_warnings():  # "no process group: loading in one process" is the point here
            warnings.simplefilter("ignore", UserWarning)
            _dcp_load(ckpt_dir, state, SafeFileSystemReader(ckpt_dir, meta), no_dist=True)
    except CheckpointError as e:
        older = [str(p) for p in list_complete(Path(ckpt_dir).parent) if p.name < Path(ckpt_dir).name]
        hint = f"; older complete checkpoints of this run: {', '.join(older[::-1])}" if older else ""
        raise CheckpointError(ckpt_dir, e.reason + hint) from None
    return state[top]


def _dcp_load(ckpt_dir: str | Path, state: dict, reader: SafeFileSystemReader, **kwargs) -> None:
    """``dcp.load`` with the safe reader and planner; its failures become a :class:`CheckpointError`."""
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), **kwargs)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        # DCP gathers every rank's failure; report the underlying errors, not the wrapper
        causes = [exc for exc, _trace in e.failures.values()] if isinstance(e, CheckpointException) else [e]
        text = "; ".join(dict.fromkeys(f"{type(c).__name__}: {c}" for c in causes))
        raise CheckpointError(ckpt_dir, f"DCP could not load it ({text[:600]})") from e


def load_model_state(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) method state dict (trunk keys under ``backbone.``) on one process."""
    return load_tensors(ckpt_dir, "model.")


def read_meta(ckpt_dir: str | Path) -> dict:
    return read_json(Path(ckpt_dir), "meta.json")


# ---------------------------------------------------------------- starting or continuing a run


def continuation_config(train_config: Any) -> Any:
    """The config recorded in a run (and its checkpoints): ``checkpoint.resume=true``, ``overwrite=false``.

    ``seerlike train --run-dir RUN`` without a recipe continues from that file; it must continue
    the run, never start it over (docs/engine.md, "Starting, continuing, overwriting").
    """
    ck = getattr(train_config, "checkpoint", None)
    if not isinstance(ck, CheckpointConfig):
        return train_config
    return dataclasses.replace(train_config, checkpoint=dataclasses.replace(ck, resume=True, overwrite=False))


def prepare_run_dir(train_config: Any, run_dir: str | Path, *, rank: int = 0) -> Any:
    """Check that ``train_config`` may start or continue the run in ``run_dir``; returns the config to record.

    Every rank calls it before anything is written into the run folder (the checks read files
    only, so all ranks reach the same verdict):

    - resuming (the default) a run that has checkpoints: its method and backbone must be this
      config's, compared with the newest checkpoint's config.yaml (else the run folder's);
    - a fresh start (``checkpoint.resume=false``) where complete checkpoints exist is refused:
      the new run's checkpoints would mix with the old run's;
    - ``checkpoint.overwrite=true``: rank 0 deletes the existing checkpoints first (every
      ``COMPLETE`` marker, then the folders), so no reader can see a mixture.
    """
    ck: CheckpointConfig = train_config.checkpoint
    run_dir = Path(run_dir)
    remote = ck.dir.startswith("s3://")
    existing = _remote_complete_urls(ck.dir) if remote else [str(p) for p in list_complete(_local_root(ck, run_dir))]
    if ck.overwrite:
        if rank == 0:
            _delete_checkpoints(ck, run_dir)
    elif existing and not ck.resume:
        raise configlib.ConfigError(
            f"{ck.dir or _local_root(ck, run_dir)} already holds checkpoints of a run (newest: {existing[-1]}), and "
            "checkpoint.resume=false would start a new run whose checkpoints mix with them; use a new --run-dir "
            "(or checkpoint.dir), continue the run (checkpoint.resume=true), or delete them first with "
            "checkpoint.overwrite=true")
    elif existing:
        _check_same_run(train_config, run_dir, [] if remote else [Path(existing[-1]) / "config.yaml"])
    if remote and (ck.overwrite or not existing) and rank == 0:
        shutil.rmtree(run_dir / "checkpoints_cache", ignore_errors=True)  # copies of another run's checkpoints
    return continuation_config(train_config)


def _local_root(ck: CheckpointConfig, run_dir: Path) -> Path:
    return Path(ck.dir) if ck.dir else run_dir / "checkpoints"


def _config_name(section: Any) -> Any:
    """``name`` of a saved config section (``{name: ..., ...}``), tolerating a bare string."""
    return section.get("name") if isinstance(section, dict) else section if isinstance(section, str) else None


def _check_same_run(train_config: Any, run_dir: Path, candidates: list[Path]) -> None:
    """ConfigError unless the run's saved config has this config's method and backbone."""
    import yaml

    for src in [*candidates, run_dir / "config.yaml"]:
        try:
            saved = yaml.safe_load(src.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(saved, dict):
            break
    else:
        return  # nothing readable to compare with: restoring checks the tensors themselves
    old = {"method.name": _config_name(saved.get("method")), "model.name": _config_name(saved.get("model"))}
    new = {"method.name": train_config.method.name, "model.name": train_config.model.name}
    differ = [k for k, v in old.items() if v is not None and v != new[k]]
    if differ:
        raise configlib.ConfigError(
            f"run {run_dir} was trained with {' '.join(f'{k}={v}' for k, v in old.items())} ({src}); this config has "
            f"{' '.join(f'{k}={new[k]}' for k in differ)}; continue the run with its own recipe (or with no --recipe: "
            f"`seerlike train --run-dir {run_dir}` continues its config.yaml), or train this config in a new --run-dir")


def _delete_checkpoints(ck: CheckpointConfig, run_dir: Path) -> None:
    """Every checkpoint of the root, invisible first (all COMPLETE markers), then gone; staging and cache too."""
    if ck.dir.startswith("s3://"):
        base = ck.dir.rstrip("/") + "/"
        urls = [u for u, _ in storage.list_files(base) if _STEP_RE.match(u[len(base):].split("/")[0])]
        markers = [u for u in urls if u.endswith(f"/{COMPLETE}")]
        for url in markers:
            storage.remove(url)
        gone = sorted({u[len(base):].split("/")[0] for u in markers})
        for name in sorted({u[len(base):].split("/")[0] for u in urls}):
            storage.remove_tree(storage.join(ck.dir, name))
        where = ck.dir
    else:
        root = _local_root(ck, run_dir)
        dirs = sorted(d for d in root.iterdir() if _STEP_RE.match(d.name)) if root.is_dir() else []
        gone = [d.name for d in dirs if (d / COMPLETE).exists()]
        for d in dirs:
            (d / COMPLETE).unlink(missing_ok=True)
        for d in dirs:
            shutil.rmtree(d)
        where = str(root)
    for scratch in ("checkpoints_staging", "checkpoints_cache"):
        shutil.rmtree(run_dir / scratch, ignore_errors=True)
    if gone:
        log.warning("checkpoint.overwrite=true: deleted %d checkpoint(s) of the previous run under %s (%s)",
                    len(gone), where, ", ".join(gone))


def _remote_complete_urls(url: str) -> list[str]:
    """``s3://.../step_N`` of every complete checkpoint under an S3 root, oldest first."""
    base = url.rstrip("/") + "/"
    names = set()
    for found, _ in storage.list_files(base):
        parts = found[len(base):].split("/")
        if len(parts) == 2 and parts[1] == COMPLETE and _STEP_RE.match(parts[0]):
            names.add(parts[0])
    return [f"{base}{n}" for n in sorted(names)]


# ---------------------------------------------------------------- saving / restoring


@dataclass
class Restored:
    step: int
    """The number of optimizer steps already taken."""
    data_state: dict
    """This rank's data-pipeline state (another rank's when the world size changed)."""
    exact: bool
    """Same world size: per-rank RNG and buffers restored, the run continues exactly."""
    path: Path


class Checkpointer:
    """Saves and restores a run's checkpoints; every rank constructs one and calls every method."""

    def __init__(self, cfg: CheckpointConfig, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.remote = cfg.dir.startswith("s3://")
        if self.remote:
            self.root = self.run_dir / "checkpoints_staging"
        else:
            self.root = Path(cfg.dir) if cfg.dir else self.run_dir / "checkpoints"
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        # checkpoint collectives get their own gloo group so an async save can run beside training
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._pending: tuple[Future, int, Path] | None = None
        self.last_complete: Path | None = None

    # ---------------------------------------------------------------- save

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, *, method: nn.Module,
             scaler: torch.amp.GradScaler | None, data_state: dict, train_config: Any) -> None:
        self.wait()
        path = step_dir(self.root, step)
        if self.rank == 0 and path.exists():
            if (path / COMPLETE).exists():
                log.info("checkpoint %s already complete", path)
            shutil.rmtree(path)  # a leftover of a crashed save (or an identical re-save)
        self._barrier()
        path.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        msd, osd = get_state_dict(model, optimizer)
        if self.rank != 0:
            # unsharded entries (buffers; everything under DDP) are written from rank 0, so the
            # DCP copy is rank 0's rather than whichever rank DCP's load balancing would pick
            msd = {k: v for k, v in msd.items() if hasattr(v, "placements")}
        state = {"model": msd, "optim": osd}
        with _reporting_disk_full(path, _tensor_bytes(state), self.rank):
            self._write_rank_files(path, method, data_state)
            if self.rank == 0:
                meta = {"step": step, "world_size": self.world, "time": time.time(), "torch": torch.__version__,
                        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
                        "checksums": CHECKSUMS}  # a checkpoint without checksums.json is then damaged, not old
                storage.write_bytes(path / "meta.json", json.dumps(meta, indent=1).encode())
                configlib.dump(continuation_config(train_config), path / "config.yaml")
            if self.cfg.async_save:
                fut = dcp.async_save(state, checkpoint_id=str(path), process_group=self.group)
                self._pending = (fut, step, path)
                log.info("checkpoint step %d: writing in the background", step)
                return
            dcp.save(state, checkpoint_id=str(path), process_group=self.group)
            self._finish(step, path)
        log.info("checkpoint step %d written in %.2fs: %s", step, time.perf_counter() - t0, self.last_complete)

    def wait(self) -> None:
        """Finish a pending async save (writes its COMPLETE marker)."""
        if self._pending is not None:
            fut, step, path = self._pending
            self._pending = None
            with _reporting_disk_full(path, 0, self.rank):
                fut.result()
                self._finish(step, path)
            log.info("checkpoint step %d complete: %s", step, self.last_complete)

    def _write_rank_files(self, path: Path, method: nn.Module, data_state: dict) -> None:
        tensors = {"rng.cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        for name, buf in method.named_buffers():
            if not hasattr(buf, "to_local"):
                tensors[f"buffer.{name}"] = buf.detach().to("cpu", copy=True).contiguous()
        # serialised in memory (RNG states and buffers: small) and written by Python, so the
        # file gets the umask's permissions and a full disk raises OSError
        storage.write_bytes(path / f"rank_{self.rank:05d}.safetensors", save_safetensors(tensors))
        py_state = random.getstate()
        rank_state = {"data": data_state, "python_random": [py_state[0], list(py_state[1]), py_state[2]]}
        storage.write_bytes(path / f"rank_{self.rank:05d}.json", json.dumps(rank_state).encode())

    def _finish(self, step: int, path: Path) -> None:
        # each rank hashes the files it wrote; rank 0 writes the table before COMPLETE (or the upload)
        mine = [f.name for f in path.iterdir() if f.is_file() and _owned_by(f.name, self.rank)
                and f.name not in (COMPLETE, CHECKSUMS) and not f.name.endswith(".tmp")]
        own = hash_files(path, mine)
        tables = [own]
        if self.group is not None:  # the gather is also the barrier: every rank's files are on disk
            tables = [None] * self.world
            dist.all_gather_object(tables, own, group=self.group)
        if self.rank == 0:
            write_checksums(path, {name: entry for table in tables for name, entry in table.items()})
        final = path
        if self.remote:
            final = self._upload(step, path)
        elif self.rank == 0:
            storage.write_bytes(path / COMPLETE, f"{step}\n".encode())
            self._prune()
        self._barrier()
        self.last_complete = final

    def _prune(self) -> None:
        done = list_complete(self.root)
        newest = done[-1] if done else None
        doomed = done[: -self.cfg.keep_last] if self.cfg.keep_last else []
        # incomplete folders older than the newest complete one are crashed saves
        if newest is not None:
            doomed += [d for d in self.root.iterdir() if _STEP_RE.match(d.name)
                       and not (d / COMPLETE).exists() and d.name < newest.name]
        for d in doomed:
            (d / COMPLETE).unlink(missing_ok=True)  # invisible first, then gone
            shutil.rmtree(d, ignore_errors=True)

    # ---------------------------------------------------------------- s3

    def _upload(self, step: int, path: Path) -> str:
        remote_dir = storage.join(self.cfg.dir, path.name)
        mine = [f for f in path.iterdir() if f.is_file() and _owned_by(f.name, self.rank)]
        for f in mine:  # each upload retried per storage.RetryPolicy (multipart: part by part)
            storage.put_file(f, storage.join(remote_dir, f.name))
        self._barrier()
        if self.rank == 0:
            storage.write_bytes(storage.join(remote_dir, COMPLETE), f"{step}\n".encode())
            self._prune_remote()
            shutil.rmtree(path, ignore_errors=True)
        return remote_dir

    def _remote_complete(self) -> list[str]:
        return [url.rsplit("/", 1)[1] for url in _remote_complete_urls(self.cfg.dir)]

    def _prune_remote(self) -> None:
        done = self._remote_complete()
        for name in done[: -self.cfg.keep_last] if self.cfg.keep_last else []:
            remote_dir = storage.join(self.cfg.dir, name)
            storage.remove(storage.join(remote_dir, COMPLETE))  # invisible first, then gone
            storage.remove_tree(remote_dir)

    def _download_latest(self) -> Path | None:
        """The newest complete remote checkpoint, downloaded (see :meth:`_download`); None without one."""
        done = self._remote_complete()
        return self._download(done[-1]) if done else None

    def _download(self, name: str) -> Path:
        """Rank 0 downloads the complete remote checkpoint ``name`` into RUN_DIR/checkpoints_cache.

        Keys are untrusted: one that would land outside the cache (``..``, absolute) fails the
        download before anything is written (storage.get_tree). The folder appears under its
        final name only once every file is in, so an interrupted download is never taken for
        a cached checkpoint. Every rank learns whether rank 0 succeeded, so none waits forever.
        """
        local = self.run_dir / "checkpoints_cache" / name
        failure: Exception | None = None
        if self.rank == 0 and not (local / COMPLETE).exists():
            partial = local.with_name(f".{name}.partial")
            try:
                shutil.rmtree(partial, ignore_errors=True)
                shutil.rmtree(local, ignore_errors=True)
                storage.get_tree(storage.join(self.cfg.dir, name), partial)
                if not (partial / COMPLETE).is_file():
                    raise storage.StorageError(f"{storage.join(self.cfg.dir, name)} lost its {COMPLETE} marker "
                                               "while being downloaded (pruned by another run?)")
                partial.rename(local)
            except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks are told
                failure = e
        # the cache must be on a filesystem all ranks see; rank 0's outcome reaches every rank
        outcome = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        if self.group is not None:
            dist.broadcast_object_list(outcome, src=0, group=self.group)
        if failure is not None:
            raise failure
        if outcome[0] is not None:
            raise storage.StorageError(f"rank 0 could not download checkpoint {name} of {self.cfg.dir}: {outcome[0]}")
        return local

    # ---------------------------------------------------------------- restore

    def find_latest(self) -> Path | None:
        """The newest complete checkpoint to resume from (downloaded for S3 roots), unverified."""
        if not self.cfg.resume or self.cfg.overwrite:
            return None
        return self._download_latest() if self.remote else latest(self.root)

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, method: nn.Module,
               scaler: torch.amp.GradScaler | None) -> Restored | None:
        """Restore the newest complete checkpoint that verifies and loads; None to start afresh.

        A damaged one is skipped with a warning naming it and why; if every complete checkpoint
        fails, the run stops (rather than start over beside them). S3 roots download one
        checkpoint at a time, newest first; a copy that fails is removed from the local cache,
        so a later run downloads it afresh.
        """
        if not self.cfg.resume or self.cfg.overwrite:
            return None
        if self.remote:
            candidates = (self._download(name) for name in reversed(self._remote_complete()))
        else:
            candidates = list_complete(self.root)[::-1]
        failed: list[CheckpointError] = []
        for path in candidates:
            # a failure inside DCP's load may have written part of the model; the next candidate
            # overwrites every tensor and optimizer state it restores
            try:
                return self.restore(path, model, optimizer, method=method, scaler=scaler)
            except CheckpointError as e:
                failed.append(e)
                log.warning("skipping checkpoint %s: %s", path, e.reason)
                if self.remote:
                    self._barrier()  # every rank is done with the copy before rank 0 removes it
                    if self.rank == 0:
                        shutil.rmtree(path, ignore_errors=True)
        if failed:
            where = self.cfg.dir if self.remote else self.root
            fix = f"fix or remove the damaged checkpoints under {self.cfg.dir}" if self.remote else "repair or move them away"
            raise CheckpointError(where, "no complete checkpoint could be loaded:\n  " + "\n  ".join(map(str, failed))
                                  + f"\n{fix}, or start afresh with checkpoint.overwrite=true")
        return None

    def restore(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, method: nn.Module,
                scaler: torch.amp.GradScaler | None) -> Restored:
        """Load one checkpoint into ``model``/``optimizer``; :class:`CheckpointError` (on every rank) if it is bad."""
        path = Path(path)
        # 1. every rank verifies its share and reads its inputs; all ranks learn every rank's
        # verdict, so all of them load this checkpoint or all of them skip it
        inputs, error = None, None
        try:
            inputs = self._read_inputs(path)
        except CheckpointError as e:
            error = e.reason
        except Exception as e:  # unreadable JSON / safetensors and the like
            error = f"{type(e).__name__}: {e}"
        errors = [error]
        if self.group is not None:
            errors = [None] * self.world
            dist.all_gather_object(errors, error, group=self.group)
        if any(errors):
            raise CheckpointError(path, "; ".join(dict.fromkeys(e for e in errors if e)))
        meta, stored, rank_state, tensors = inputs

        # 2. DCP (collective; its failures are raised on every rank)
        msd, osd = get_state_dict(model, optimizer)
        # get_state_dict made state for every parameter (a zero-grad step); parameters that had
        # none when saved (e.g. SwAV prototypes while frozen) must have none after loading either
        osd["state"] = {fqn: {k: v for k, v in st.items() if f"optim.state.{fqn}.{k}" in stored.state_dict_metadata}
                        for fqn, st in osd["state"].items()}
        osd["state"] = {fqn: st for fqn, st in osd["state"].items() if st}
        state = {"model": msd, "optim": osd}
        _dcp_load(path, state, SafeFileSystemReader(path, stored), process_group=self.group)

        # 3. apply
        # strict=False only lets parameters without optimizer state through; DCP has already
        # failed on any model key missing from the checkpoint
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=False))
        if scaler is not None and scaler.is_enabled() and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        same_world = tensors is not None
        if same_world:
            torch.set_rng_state(tensors["rng.cpu"])
            if "rng.cuda" in tensors and torch.cuda.is_available():
                torch.cuda.set_rng_state(tensors["rng.cuda"])
            bufs = dict(method.named_buffers())
            with torch.no_grad():
                for k, v in tensors.items():
                    if k.startswith("buffer.") and k[7:] in bufs:
                        bufs[k[7:]].copy_(v)
            random.setstate(_python_random_state(rank_state))
        else:
            # the data pipeline sees the other world size in the state and starts its next epoch
            log.warning("resuming a %d-rank checkpoint on %d ranks: model and optimizer resharded; "
                        "RNG reseeded, data restarts at an epoch boundary", meta["world_size"], self.world)
        self.last_complete = path
        log.info("resumed from %s (step %d)", path, meta["step"])
        return Restored(step=meta["step"], data_state=rank_state["data"], exact=same_world, path=path)

    def _read_inputs(self, path: Path) -> tuple[dict, Metadata, dict, dict | None]:
        """Verified (meta.json, DCP metadata, this rank's JSON state, its tensors or None on another world size)."""
        stored = open_checkpoint(path, rank=self.rank, world=self.world)
        _check_tensors_only(path, stored)
        meta = read_meta(path)
        step, world = meta.get("step"), meta.get("world_size")
        if not (isinstance(step, int) and isinstance(world, int) and world > 0):
            raise CheckpointError(path, f"{path / 'meta.json'} lacks an integer step and world_size")
        same_world = meta["world_size"] == self.world
        src = self.rank if same_world else min(self.rank, meta["world_size"] - 1)
        rank_state = read_json(path, f"rank_{src:05d}.json")
        if "data" not in rank_state:
            raise CheckpointError(path, f"{path / f'rank_{src:05d}.json'} has no data-pipeline state")
        tensors = None
        if same_world:
            _python_random_state(rank_state)  # checked now, applied after the load
            tensors = load_file(str(path / f"rank_{self.rank:05d}.safetensors"))
            if "rng.cpu" not in tensors:
                raise CheckpointError(path, f"rank_{self.rank:05d}.safetensors has no rng.cpu")
        return meta, stored, rank_state, tensors

    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)


def _tensor_bytes(obj: Any) -> int:
    """Bytes of this rank's tensors in a (nested) state dict: what a save writes here."""
    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if hasattr(obj, "to_local") else obj
        return local.numel() * local.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


@contextlib.contextmanager
def _reporting_disk_full(path: Path, needed: int, rank: int):
    """A save that ran out of space becomes one ``storage.DiskFullError`` naming the checkpoint.

    DCP reports a full disk as a ``CheckpointException`` around torch.save's RuntimeError, with
    the errno lost; a failed save on a filesystem with less free space than the save needs
    counts as a full disk too. The partial folder (never marked COMPLETE) is removed: it holds
    the space the user must free.
    """
    try:
        yield
    except BaseException as e:
        wrapped = [exc for exc, _ in getattr(e, "failures", {}).values()]  # DCP: one error per rank
        full = any(storage.is_disk_full(x) for x in (e, *wrapped))
        if not full and not isinstance(e, (KeyboardInterrupt, SystemExit)):
            with contextlib.suppress(OSError):
                full = shutil.disk_usage(path).free < needed
        if not full:
            raise
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        raise storage.disk_full(path, "free space or choose another checkpoint.dir") from e


def _owned_by(name: str, rank: int) -> bool:
    """Which rank uploads a checkpoint file: its own DCP shards and rank files; rank 0 the rest."""
    m = re.match(r"^__(\d+)_\d+\.distcp$", name) or re.match(r"^rank_(\d+)\.", name)
    return int(m.group(1)) == rank if m else rank == 0


def _check_tensors_only(path: Path, meta: Metadata) -> None:
    """Refuse checkpoints whose model entries are not all tensors (the optimizer's hyper-parameters may be)."""
    bad = [k for k, m in meta.state_dict_metadata.items()
           if not isinstance(m, TensorStorageMetadata) and not k.startswith("optim.")]
    if bad:
        raise CheckpointError(path, f"unexpected non-tensor entries {bad[:5]}; not a seerlike checkpoint")


def _python_random_state(rank_state: dict) -> tuple:
    """``random.setstate``'s argument from a rank file, validated on a scratch generator."""
    ver, internal, gauss = rank_state["python_random"]
    state = (ver, tuple(internal), gauss)
    random.Random().setstate(state)
    return state
