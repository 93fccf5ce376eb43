"""TrainConfig: every recipe builds, is documented, round-trips; bad input fails with a useful message."""

from __future__ import annotations

import argparse

import pytest

from seerlike import cli, config, recipes
from seerlike.commands.train import add_arguments, build_config
from seerlike.engine.config import TrainConfig

TRAIN_RECIPES = ["swav_resnet50", "byol_resnet50", "seer_regnet_y_256gf", "seer_regnet_y_10b", "tiny_swav", "tiny_byol",
                 "simclr_resnet50", "tiny_simclr", "moco_v2_resnet50", "tiny_moco_v2", "moco_v3_resnet50", "tiny_moco_v3",
                 "deepcluster_v2_resnet50", "tiny_deepcluster_v2", "sela_resnet50", "tiny_sela"]


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("name", TRAIN_RECIPES)
def test_recipe_builds_and_round_trips(name, tmp_path):
    cfg = recipes.get(name)
    assert isinstance(cfg, TrainConfig)
    path = config.dump(cfg, tmp_path / "config.yaml")
    assert config.load(path) == cfg
    assert config.loads(config.dumps(cfg, "json")) == cfg


def test_every_field_is_documented():
    assert config.undocumented(TrainConfig) == []


def test_seer_recipe_is_the_paper_setup():
    cfg = recipes.get("seer_regnet_y_256gf")
    assert cfg.method.num_prototypes == 16000 and cfg.method.sinkhorn_iters == 10
    assert cfg.model.name == "regnet_y_256gf" and cfg.method.head_dims == (8192, 8192, 256)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay) == ("larc", 0.3, 8000, 1e-5)
    assert cfg.optim.trust_coefficient == 0.001 and not cfg.optim.larc_clip
    assert cfg.precision.dtype == "fp16" and cfg.parallel.sync_bn and cfg.parallel.sync_bn_group_size == 64
    assert [(v.count, v.size) for v in cfg.data.augment.views] == [(2, 224), (4, 96)]
    big = recipes.get("seer_regnet_y_10b")
    assert big.parallel.strategy == "fsdp" and big.parallel.ac_segments == [[2], [7], [9, 17], []]


def test_cli_options_and_overrides_compose():
    cfg = build_config(_args("--recipe", "tiny_swav", "--data", "/imgs", "--run-dir", "/tmp/x", "--max-steps", "20",
                             "optim.lr=0.05", "parallel.ac=block", "data.augment.views=[{count: 2, size: 16}]"))
    assert cfg.data.source == "/imgs" and cfg.loop.max_steps == 20 and cfg.optim.lr == 0.05
    assert cfg.parallel.ac == "block" and cfg.data.augment.views[0].size == 16


def test_continue_from_the_run_dir_config(tmp_path):
    config.dump(recipes.get("tiny_byol"), tmp_path / "config.yaml")
    cfg = build_config(_args("--run-dir", str(tmp_path), "loop.seed=3"))
    assert cfg.method.name == "byol" and cfg.loop.seed == 3
    with pytest.raises(config.ConfigError, match="give --recipe"):
        build_config(_args("--run-dir", str(tmp_path / "empty")))


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=0.1", "unknown key 'optim.lrr' in OptimConfig; valid keys: .*lr"),
    ("loop.max_steps=many", "loop.max_steps: expected int, got 'many'"),
    ("precision.dtype=fp8", r"precision.dtype: expected one of \['fp32', 'bf16', 'fp16', 'auto'\]"),
    ("parallel.ac=segments", "parallel.ac=segments needs parallel.ac_segments"),
    ("optim.warmup_steps=5000", "exceeds loop.max_steps"),
])
def test_bad_override_names_the_key_and_the_fix(override, message):
    with pytest.raises(config.ConfigError, match=message):
        build_config(_args("--recipe", "tiny_swav", "--run-dir", "/tmp/x", "--max-steps", "100", override))


def test_cli_reports_bad_input_with_exit_status_2(capsys, tmp_path):
    assert cli.main(["train", "--recipe", "tiny_swav", "--run-dir", str(tmp_path), "loop.nope=1"]) == 2
    assert "unknown key 'loop.nope'" in capsys.readouterr().err
    assert cli.main(["train", "--recipe", "nope", "--run-dir", str(tmp_path)]) == 2
    assert "known recipes:" in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists()  # nothing started


def test_relative_paths_are_recorded_absolute(tmp_path, monkeypatch):
    """config.yaml holds absolute paths, so the run continues (and its checkpoints are found) from any directory."""
    from seerlike.preflight import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = config.apply_overrides(recipes.get("tiny_swav"),
                                 ["data.source=images", "data.labels=clusters/", "checkpoint.dir=ckpts"])
    rec = with_absolute_paths(cfg)
    assert (rec.data.source, rec.data.labels, rec.checkpoint.dir) == (
        str(tmp_path / "images"), str(tmp_path / "clusters"), str(tmp_path / "ckpts"))
    assert f"dir: {tmp_path / 'ckpts'}" in config.dumps(rec)
    # URLs and empty values stay as given
    kept = with_absolute_paths(config.apply_overrides(cfg, ["data.source=s3://b/ds", "checkpoint.dir=s3://b/ck",
                                                            "data.labels="]))
    assert (kept.data.source, kept.data.labels, kept.checkpoint.dir) == ("s3://b/ds", "", "s3://b/ck")
    teacher = config.apply_overrides(recipes.get("distill_tiny"), ["method.teacher=runs/cf"])
    assert with_absolute_paths(teacher).method.teacher == str(tmp_path / "runs" / "cf")
    baseline = config.apply_overrides(teacher, ["method.teacher=random:resnet10_cifar"])
    assert with_absolute_paths(baseline).method.teacher == "random:resnet10_cifar"
