"""The kNN monitor in one process: the number `seerlike eval knn` gives, the backbone left as it
was, the row in metrics.jsonl and TensorBoard, the schedule, and the budget's paused clock
(the training loop with the monitor: tests/integration/test_monitor_report.py)."""

from __future__ import annotations

import json

import pytest
import torch

from seerlike import config, models, recipes
from seerlike.config import ConfigError
from seerlike.engine.budget import StepBudget
from seerlike.engine.metrics import MetricsLogger
from seerlike.engine.monitor import Monitor, MonitorConfig, Schedule, ScoringContext, build_monitor
from seerlike.eval.knn_monitor import KNNScorer, first_per_class, knn_scorer, per_class_within, rank_slice
from tests.monitor_helpers import labeled_csv


@pytest.fixture(scope="module")
def split(cifar_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("split")
    return labeled_csv(cifar_dir, "train", 4, tmp / "bank.csv"), labeled_csv(cifar_dir, "val", 2, tmp / "val.csv")


def _tb_scalars(run_dir) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_monitor_equals_a_direct_knn_evaluation_and_leaves_the_backbone_as_it_was(split, tmp_path, one_thread):
    from seerlike.eval.evaluate import evaluate
    from seerlike.eval.extract import ExtractConfig

    bank, queries = split
    torch.manual_seed(0)  # random:ARCH is this init (seerlike.checkpoints.load_backbone)
    backbone = models.build("resnet10_cifar")
    backbone.train()
    backbone.layer1.eval()  # a module kept in eval mode on purpose must stay so
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    metrics = MetricsLogger(tmp_path, rank=0, start_step=0, max_steps=10, tensorboard=True, progress=False)
    cfg = MonitorConfig(train=bank, val=queries, image_size=32, resize=32, batch_size=16)
    context = ScoringContext(backbone=backbone, root=backbone, device=torch.device("cpu"))
    mon = Monitor(cfg, knn_scorer(cfg), context, metrics=metrics, start_step=0)
    row = mon.evaluate(3)
    metrics.close()

    direct = evaluate("knn", "random:resnet10_cifar", bank, queries, progress=False,
                      extract_cfg=ExtractConfig(layer="pool", image_size=32, resize=32, batch_size=16))
    assert row["knn_top1"] == pytest.approx(direct["metrics"]["top1"], abs=1e-6)
    assert row["knn_top5"] == pytest.approx(direct["metrics"]["top5"], abs=1e-6)
    assert row["knn_images"] == 60 and 0 < row["knn_s"] <= row["monitor_s"]
    assert backbone.training and not backbone.layer1.training and backbone.layer2.training
    for k, v in backbone.state_dict().items():  # BatchNorm running statistics untouched
        assert torch.equal(v, before[k]), k
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [3] and logged[0]["knn_top1"] == row["knn_top1"]
    assert _tb_scalars(tmp_path)["monitor/knn_top1"] == [pytest.approx(row["knn_top1"])]


def test_schedule_cadence_and_cost_cap():
    # every 5 steps, no cap: due exactly on the multiples
    s = Schedule(every_steps=5, every_minutes=0, max_fraction=0, start_step=0)
    assert s.wait_steps(3, train_s=3.0, spent_s=0.0) == 2
    assert s.wait_steps(5, train_s=5.0, spent_s=0.0) == 0
    s.evaluated(5, train_s=5.0, cost=1.0)
    assert s.next_step(5, train_s=5.0, spent_s=1.0) == 10
    # no cadence, a 5 % cap: 1 s spent + 1 s for the next reading needs 38 s of training
    s = Schedule(every_steps=0, every_minutes=0, max_fraction=0.05, start_step=0, reserve_end=False)
    s.evaluated(0, train_s=0.0, cost=1.0)
    assert s.wait_steps(10, train_s=10.0, spent_s=1.0) == pytest.approx(28.0)  # at 1 s per step
    assert s.next_step(10, train_s=10.0, spent_s=1.0) == 38
    assert s.wait_steps(38, train_s=38.0, spent_s=1.0) <= 0
    # keeping room for the reading after the last step: 1 + 2 x 1 s needs 57 s
    s.reserve_end = True
    assert s.next_step(10, train_s=10.0, spent_s=1.0) == 57
    # every minute of training: 50 more steps at 1 s/step (the cap needs fewer)
    s = Schedule(every_steps=0, every_minutes=1.0, max_fraction=0.05, start_step=0)
    s.evaluated(0, train_s=0.0, cost=1.0)
    assert s.wait_steps(10, train_s=10.0, spent_s=1.0) == pytest.approx(50.0)
    # before any step time is known: ask again at the next step
    assert Schedule(every_steps=0, every_minutes=1, max_fraction=0.05, start_step=7).next_step(7, 0.0, 0.0) == 8


def test_a_time_budget_cuts_the_split_so_four_readings_fit():
    bank, queries = ["a"] * 500 + ["b"] * 500, ["a"] * 100 + ["b"] * 100
    assert per_class_within([bank, queries], 100, images=1e9) == 100  # the cap holds
    assert per_class_within([bank, queries], 0, images=1e9) == 500
    assert per_class_within([bank, queries], 100, images=300) == 75  # 2 x 75 + 2 x 75
    assert per_class_within([bank, queries], 0, images=700) == 250  # 2 x 250 + 2 x 100
    assert per_class_within([bank, queries], 100, images=3) == 5  # never fewer than 5 per class


def test_budget_clock_pauses_for_the_monitor():
    now = [0.0]
    budget = StepBudget(100.0, calibrate_steps=4, upper_bound=1000, min_steps=5)
    budget.clock = lambda: now[0]
    budget.t0 = budget.last = 0.0
    for step in range(1, 5):
        now[0] += 1.0  # 1 s per step
        if step == 3:
            with budget.paused():
                now[0] += 50.0  # a kNN evaluation between steps 2 and 3
        budget.observe(step)
    assert budget.used_s() == pytest.approx(4.0)
    assert budget.plan(4, torch.device("cpu")) == 4 + 96  # 96 s left at 1 s per step
    assert budget.step_s == pytest.approx(1.0)


def test_split_selection_and_rank_slices():
    assert first_per_class(list("aabbbacb"), 2) == [0, 1, 2, 3, 6]
    assert first_per_class(list("aab"), 0) == [0, 1, 2]
    assert rank_slice(5, 0, 2) == (range(0, 3), 3) and rank_slice(5, 1, 2) == (range(3, 5), 3)
    assert rank_slice(1, 1, 2) == (range(1, 1), 1)  # an empty slice still runs the padded batch


def test_bad_monitor_settings_fail_naming_the_key(split, tmp_path):
    base = recipes.get("tiny_swav")
    with pytest.raises(ConfigError, match="eval.train and eval.val go together"):
        config.apply_overrides(base, ["eval.train=x.csv"])
    with pytest.raises(ConfigError, match="eval.max_fraction=0 needs"):
        config.apply_overrides(base, ["eval.train=x.csv", "eval.val=y.csv", "eval.max_fraction=0"])
    with pytest.raises(ConfigError, match="eval.layer"):
        config.apply_overrides(base, ["eval.layer=head"])
    unlabeled = tmp_path / "images"
    (unlabeled / "a.jpg").parent.mkdir()
    (unlabeled / "a.jpg").write_bytes(b"")
    cfg = MonitorConfig(train=str(unlabeled), val=split[1], image_size=32)
    with pytest.raises(ConfigError, match="eval.train .*expected labeled images"):
        KNNScorer(cfg, ScoringContext(backbone=models.build("resnet10_cifar"), root=None, device=torch.device("cpu")))


def test_a_split_without_a_scorer_is_refused_not_ignored(split):
    cfg = config.apply_overrides(recipes.get("tiny_swav"), [f"eval.train={split[0]}", f"eval.val={split[1]}"])
    with pytest.raises(ValueError, match="no scorer"):
        build_monitor(cfg, None, None, metrics=None, device=torch.device("cpu"), start_step=0)
    assert knn_scorer(cfg.eval) is not None and knn_scorer(recipes.get("tiny_swav").eval) is None
    assert build_monitor(recipes.get("tiny_swav"), None, None, metrics=None, device=torch.device("cpu"),
                         start_step=0) is None


def test_preflight_checks_the_split_and_stores_it_absolute(split, tmp_path, monkeypatch, cifar_dir):
    from seerlike.preflight import check_train_inputs, with_absolute_paths

    base = config.apply_overrides(recipes.get("tiny_swav"), [f"data.source={cifar_dir / 'train'}"])
    with pytest.raises(ConfigError, match="eval.train .*nope.csv does not exist"):
        check_train_inputs(config.apply_overrides(base, [f"eval.train={tmp_path / 'nope.csv'}",
                                                         f"eval.val={split[1]}"]))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "val.csv").write_text("path,label\n")
    cfg = with_absolute_paths(config.apply_overrides(base, [f"eval.train={split[0]}", "eval.val=val.csv"]))
    assert cfg.eval.val == str(tmp_path / "val.csv") and cfg.eval.train == split[0]


def test_a_short_budget_cuts_the_split_after_a_timed_probe(cifar_dir, tmp_path, one_thread):
    bank = labeled_csv(cifar_dir, "train", 8, tmp_path / "bank.csv")
    queries = labeled_csv(cifar_dir, "val", 2, tmp_path / "val.csv")
    cfg = MonitorConfig(train=bank, val=queries, image_size=32, resize=32)
    sizes = {}
    for run_s in (1e-3, 1e6):  # a budget too short for anything, and one that holds all of it
        knn = KNNScorer(cfg, ScoringContext(backbone=models.build("resnet10_cifar"), root=None,
                                            device=torch.device("cpu"), run_s=run_s))
        sizes[run_s] = (knn.per_class, len(knn.bank.labels), len(knn.queries.labels))
    assert sizes == {1e-3: (5, 50, 20), 1e6: (8, 80, 20)}  # never fewer than 5 per class; all 8 fit
