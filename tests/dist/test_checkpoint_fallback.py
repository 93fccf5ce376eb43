"""On 2 ranks, damage that only one rank's share of the checksum work can see makes both ranks skip
the checkpoint together and resume from the next older one (no rank loads while another refuses)."""

from __future__ import annotations

import json

import pytest
import torch

from seerlike.engine import checkpoint
from seerlike.engine.checkpoint import CheckpointConfig, Checkpointer
from seerlike.engine.checkpoint_verify import CHECKSUMS
from seerlike.testing import run_on_ranks
from tests.dist.test_checkpoint import _save_on_ranks, _setup

pytestmark = pytest.mark.dist


def _resume_on_ranks(rank: int, world: int, root: str):
    method, model, opt = _setup()
    restored = Checkpointer(CheckpointConfig(dir=root), run_dir=root).resume(model, opt, method=method, scaler=None)
    return {"step": restored.step, "exact": restored.exact, "path": str(restored.path)}


def test_both_ranks_skip_a_checkpoint_only_one_rank_finds_damaged(tmp_path):
    root = str(tmp_path / "ckpts")
    run_on_ranks(_save_on_ranks, 2, root, None, False)
    newest = checkpoint.latest(root)
    assert checkpoint.step_of(newest) == 3
    # rank r hashes every world-th file of the sorted table: pick a shard in rank 1's share only
    names = sorted(json.loads((newest / CHECKSUMS).read_text())["files"])
    victim = next(n for n in names[1::2] if n.endswith(".distcp"))
    assert victim not in names[0::2]
    data = bytearray((newest / victim).read_bytes())
    data[-4096:] = (0.01 * torch.randn(1024)).numpy().tobytes()  # same size: only the hash tells
    (newest / victim).write_bytes(bytes(data))

    results = run_on_ranks(_resume_on_ranks, 2, root, timeout_s=60)
    assert [r["step"] for r in results] == [2, 2]
    assert all(r["exact"] and r["path"] == str(checkpoint.step_dir(root, 2)) for r in results)
