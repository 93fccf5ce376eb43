"""The kNN monitor on 2 real ranks (DDP and FSDP2): no hang, one metrics line per evaluation,
and the number a direct `seerlike eval knn` of the same step's checkpoint gives, although each
rank's BatchNorm running statistics differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seerlike import config, recipes
from seerlike.engine.loop import train
from seerlike.eval.knn_monitor import knn_scorer
from seerlike.testing import run_on_ranks
from tests.monitor_helpers import RankData, labeled_csv

pytestmark = pytest.mark.dist


def _cfg(bank: str, queries: str, *extra: str):
    return config.apply_overrides(recipes.get("tiny_swav"), [
        "loop.max_steps=4", "checkpoint.every_steps=4", "loop.log_every=1", "loop.progress=false",
        "optim.warmup_steps=1", "precision.dtype=fp32", f"eval.train={bank}", f"eval.val={queries}",
        "eval.image_size=32", "eval.resize=32", "eval.batch_size=16", *extra])


def _train(cfg, run_dir: Path, rank: int) -> None:
    train(cfg, run_dir, data=RankData(rank), scorer=knn_scorer(cfg.eval))


def _runs(rank: int, world: int, tmp: str, bank: str, queries: str) -> None:
    # a cadence in steps and no cap: evaluations at steps 0, 2, 4 (the last one after the last step)
    _train(_cfg(bank, queries, "eval.every_steps=2", "eval.max_fraction=0"), Path(tmp) / "ddp", rank)
    # FSDP2; a time budget makes the monitor time a few images first (a collective too) to size the split
    _train(_cfg(bank, queries, "eval.every_steps=2", "eval.max_fraction=0.99", "parallel.strategy=fsdp",
                "loop.time_budget_s=1000"), Path(tmp) / "fsdp", rank)
    # a cadence in time: rank 0's clock decides, the other rank follows at the same steps
    _train(_cfg(bank, queries, "eval.every_minutes=0.0001", "eval.max_fraction=0.99"), Path(tmp) / "time", rank)


def _knn_rows(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "knn_top1" in r]


def test_two_ranks_monitor_equals_direct_knn_of_the_checkpoint(tmp_path, cifar_dir):
    from seerlike.eval.evaluate import evaluate
    from seerlike.eval.extract import ExtractConfig

    bank = labeled_csv(cifar_dir, "train", 6, tmp_path / "bank.csv")
    queries = labeled_csv(cifar_dir, "val", 3, tmp_path / "val.csv")  # 30 rows: 15 per rank
    run_on_ranks(_runs, 2, str(tmp_path), bank, queries, timeout_s=300)

    for name in ("ddp", "fsdp"):
        rows = _knn_rows(tmp_path / name)
        assert [r["step"] for r in rows] == [0, 2, 4], name  # once per evaluation, from rank 0 only
        # the reading after the last step equals an offline evaluation of that step's checkpoint
        direct = evaluate("knn", tmp_path / name / "checkpoints" / "step_00000004", bank, queries,
                          extract_cfg=ExtractConfig(layer="pool", image_size=32, resize=32, batch_size=16),
                          progress=False)
        assert rows[-1]["knn_top1"] == pytest.approx(direct["metrics"]["top1"], abs=1e-6), name
        assert rows[-1]["knn_top5"] == pytest.approx(direct["metrics"]["top5"], abs=1e-6), name
        assert rows[-1]["knn_images"] == 90
        seg = json.loads((tmp_path / name / "timing.json").read_text())["segments"]
        assert len(seg) == 1 and seg[0]["end_step"] == 4 and seg[0]["monitor_s"] > 0
        assert seg[0]["train_s"] == pytest.approx(seg[0]["wall_s"] - seg[0]["monitor_s"], abs=1e-2)

    timed = _knn_rows(tmp_path / "time")
    steps = [r["step"] for r in timed]
    assert steps[0] == 0 and steps[-1] == 4 and len(steps) == len(set(steps)) >= 3, steps
