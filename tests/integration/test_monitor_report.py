"""The kNN monitor inside the training loop (one process), and the quickstart report built from
training stages' metrics.jsonl and timing.json: the kNN-vs-minutes plot and the planned-vs-actual table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seerlike import config, recipes
from seerlike.engine.loop import train
from seerlike.eval.knn_monitor import knn_scorer
from tests.monitor_helpers import RankData, labeled_csv

pytestmark = pytest.mark.integration


def _tb_scalars(run_dir) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_the_loop_evaluates_at_the_start_on_its_cadence_and_after_the_last_step(cifar_dir, tmp_path, one_thread):
    bank = labeled_csv(cifar_dir, "train", 4, tmp_path / "bank.csv")
    queries = labeled_csv(cifar_dir, "val", 2, tmp_path / "val.csv")
    cfg = config.apply_overrides(recipes.get("tiny_swav"), [
        "loop.max_steps=5", "checkpoint.every_steps=5", "loop.progress=false", "optim.warmup_steps=1",
        "parallel.strategy=none", f"eval.train={bank}", f"eval.val={queries}", "eval.image_size=32",
        "eval.resize=32", "eval.every_steps=2", "eval.max_fraction=0"])
    run = tmp_path / "run"
    assert train(cfg, run, data=RankData(0), scorer=knn_scorer(cfg.eval)) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in rows if "knn_top1" in r]
    assert [r["step"] for r in knn] == [0, 2, 4, 5]
    assert _tb_scalars(run)["monitor/knn_top1"] == [pytest.approx(r["knn_top1"]) for r in knn]
    seg = json.loads((run / "timing.json").read_text())["segments"]
    assert [(s["start_step"], s["end_step"], s["finished"]) for s in seg] == [(0, 5, True)]
    assert seg[0]["monitor_s"] == pytest.approx(knn[-1]["monitor_s"], rel=0.05)
    assert 0 < seg[0]["monitor_s"] < seg[0]["wall_s"]


# ---------------------------------------------------------------- the report, from a fake run folder

STAGES = {  # stage: (budget s, calibrated s/step, planned steps, steps run, budget s used, monitor s, knn readings)
    "pretrain": (450.0, 0.5, 900, 900, 455.2, 12.0, [(0.0, 30.5), (2.5, 38.0), (7.9, 45.1)]),
    "clusterfit": (150.0, 0.25, 600, 600, 149.0, 4.0, [(0.0, 44.0), (2.6, 46.9)]),
    "distill": (None, None, None, 40, None, 2.0, [(0.0, 20.0), (0.9, 41.0)]),
}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fake_run(run: Path) -> None:
    from seerlike.quickstart import ARCH, MODELS, STUDENT

    for i, (entry, (stage, _, arch)) in enumerate(MODELS.items()):
        (run / stage).mkdir(parents=True)
        (run / stage / "eval_knn.json").write_text(json.dumps({
            "arch": arch, "metrics": {"top1": 30.0 + i, "top5": 80.0}, "model": f"/m/{entry}", "layer": "pool",
            "num_train": 5000, "num_val": 1000}))
    assert {ARCH, STUDENT} == {a for _, _, a in MODELS.values()}
    (run / "cluster").mkdir()
    (run / "cluster" / "cluster_stats.json").write_text(json.dumps({"num_features": 5000, "num_clusters": 200}))
    for stage, (budget, step_s, planned, steps, used, monitor, readings) in STAGES.items():
        rows = [{"step": 0, "knn_top1": readings[0][1], "elapsed_s": 60 * readings[0][0], "knn_images": 2000}]
        if budget:
            rows.append({"step": 12, "calibrated_step_s": step_s, "planned_steps": planned, "time_budget_s": budget})
        rows += [{"step": s, "loss": 5.0 - s / steps} for s in (steps // 2, steps)]
        rows += [{"step": steps, "knn_top1": top1, "elapsed_s": 60 * m, "knn_images": 2000} for m, top1 in readings[1:]]
        _write_jsonl(run / stage / "metrics.jsonl", rows)
        seg = {"start_step": 0, "end_step": steps, "finished": True, "wall_s": (used or 100.0) + monitor,
               "monitor_s": monitor, "train_s": used or 100.0}
        if budget:
            seg.update(time_budget_s=budget, budget_clock="wall", planned_steps=planned, budget_used_s=used,
                       calibrated_step_s=step_s)
        (run / stage / "timing.json").write_text(json.dumps({"segments": [seg]}))
    from seerlike import config, recipes

    resolved = config.apply_overrides(recipes.get("tiny_swav"), ["precision.dtype=fp32"])  # auto, as the engine records it
    config.dump(resolved, run / "pretrain" / "config.yaml")


def test_report_plots_knn_against_minutes_and_tables_planned_vs_actual_time(tmp_path):
    from seerlike.quickstart import report_stage

    run = tmp_path / "run"
    _fake_run(run)
    assert report_stage([str(run), "swav"]) == 0
    report = (run / "report.md").read_text()
    assert "![kNN top-1 while training](plots/knn_monitor.png)" in report
    assert (run / "plots" / "knn_monitor.png").stat().st_size > 5000
    # planned: the steps' seconds + the monitor's 5 % on top; actual: the steps' clock + the monitor's seconds
    assert ("| pretraining | fp32 | 472 | 22.5 | 0.500 | 900 | 900 | 467 | 12.0 | 2.6 | -1.1 % | - |"  # 467.2 / 472.5
            in report)  # monitor %: 12 / (455.2 + 12)
    assert "| ClusterFit | - | 158 | 7.5 | 0.250 | 600 | 600 | 153 | 4.0 | 2.6 | -2.9 % | - |" in report
    assert "| distillation | - | - | - | - | - | 40 | 102 | 2.0 | 2.0 | - | - |" in report  # steps given: no plan
    training = json.loads((run / "results.json").read_text())["training"]
    assert training["pretrain"]["planned_s"] == 472.5 and training["pretrain"]["actual_s"] == 467.2
    assert training["pretrain"]["vs_plan"] == pytest.approx(467.2 / 472.5 - 1, abs=1e-4)
    assert training["distill"]["planned_s"] is None and training["distill"]["vs_plan"] is None
    assert training["pretrain"]["knn"] == [[0.0, 30.5], [2.5, 38.0], [7.9, 45.1]]
    assert training["distill"]["knn"] == [[0.0, 20.0], [0.9, 41.0]] and training["distill"]["knn_images"] == 2000


def test_progress_line_shows_the_last_loss_and_the_last_knn_reading(tmp_path):
    from seerlike.quickstart import metrics_line

    _write_jsonl(tmp_path / "metrics.jsonl", [{"step": 20, "loss": 4.5, "lr": 0.04, "images_per_s": 76.0},
                                              {"step": 22, "knn_top1": 31.25, "elapsed_s": 60.0}])
    assert metrics_line(tmp_path) == "step 20: loss 4.5000, lr 0.0400, 76 img/s; kNN top-1 31.2 at step 22"


def test_a_cpu_clock_plan_is_compared_on_the_steps_alone(tmp_path):
    from seerlike.quickstart import stage_timing

    run = tmp_path / "run"
    _fake_run(run)
    path = run / "pretrain" / "timing.json"
    path.write_text(path.read_text().replace('"wall"', '"cpu"'))
    t = stage_timing(run / "pretrain", 300.0)
    # the monitor's 12 wall seconds are not on the budget's CPU clock: 455.2 CPU-s of 450 planned
    assert (t["clock"], t["planned_s"], t["actual_s"], t["monitor_planned_s"]) == ("cpu", 450.0, 455.2, 22.5)


def test_a_lightness_trunk_gains_over_random_init_fed_the_lightness(tmp_path):
    """colorization: the pretrained row's gain is over `random:ARCH:in_channels=1`, ClusterFit's over the RGB init."""
    from seerlike.quickstart import INPUT_BASELINE, Budget, build_pipeline, report_stage

    def stages(method):
        pipe = build_pipeline(tmp_path / method, images="I", eval_train="T", eval_val="V", method=method,
                              budget=Budget(pretrain_s=60.0, clusterfit_s=20.0, distill_s=20.0))
        return [s.name for s in pipe.stages]

    names = stages("colorization")
    assert names[1:3] == ["eval_random", INPUT_BASELINE[1]] and INPUT_BASELINE[1] not in stages("rotnet")
    run = tmp_path / "run"
    _fake_run(run)  # random init 30, pretrain 31, clusterfit 32 (MODELS order)
    (run / INPUT_BASELINE[1]).mkdir()
    (run / INPUT_BASELINE[1] / "eval_knn.json").write_text(json.dumps({
        "arch": "resnet10_cifar", "metrics": {"top1": 25.0, "top5": 70.0}, "model": "random:resnet10_cifar:in_channels=1",
        "layer": "pool", "num_train": 5000, "num_val": 1000}))
    assert report_stage([str(run), "colorization"]) == 0
    m = json.loads((run / "results.json").read_text())["models"]
    assert list(m)[:3] == ["random_init", INPUT_BASELINE[0], "colorization"]
    assert m["colorization"]["gain_over_random"] == 6.0 and m["clusterfit"]["gain_over_random"] == 2.0
    assert m[INPUT_BASELINE[0]]["gain_over_random"] == -5.0
    assert [m[n]["baseline"] for n in ("colorization", "clusterfit", "distilled")] == [
        INPUT_BASELINE[0], "random_init", "random_init_student"]
    assert "colorization gains +6.0 points" in (run / "report.md").read_text()
