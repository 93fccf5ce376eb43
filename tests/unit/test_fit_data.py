"""The data rule (seerlike.recipes.fit_data): its choices on synthetic manifests and image folders,
the overrides it writes, `seerlike train --fit-data` / `seerlike config --fit-data`, and the quickstart's wiring."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from seerlike import config, recipes
from seerlike.config import ConfigError
from seerlike.recipes import fit_data as fd
from tests.conftest import DATA

TINY = sorted(n for n in recipes.RECIPES if n.startswith("tiny_")) + ["clusterfit_tiny", "distill_tiny"]


def _manifest(root, sizes, rejected=0):
    """An ingested dataset's manifest.parquet + summary.json with these stored (width, height)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [("written", w, h) for w, h in sizes] + [("rejected", 0, 0)] * rejected
    pq.write_table(pa.table({"status": [r[0] for r in rows], "width": pa.array([r[1] for r in rows], pa.int32()),
                             "height": pa.array([r[2] for r in rows], pa.int32())}), root / "manifest.parquet")
    (root / "summary.json").write_text(json.dumps({"written": len(sizes)}))
    return str(root)


def _fit(root, recipe="tiny_swav", budget_s=450.0, ranks=2, **kw):
    return fd.choose(fd.data_stats(root), recipes.get(recipe), budget_s=budget_s, ranks=ranks, **kw)


def _applied(fit, recipe):
    return config.apply_overrides(recipes.get(recipe), fd.overrides(fit, recipes.get(recipe)))


@pytest.mark.parametrize("budget_s", [20.0, 450.0, 100_000.0])
def test_on_32px_images_every_tiny_recipe_keeps_its_own_settings_at_any_budget(tmp_path, budget_s):
    root = _manifest(tmp_path / "cifar", [(32, 32)] * 5000)
    for name in TINY:
        fit = _fit(root, name, budget_s)
        assert fit.native_side == 32 and fit.resolution == 32 and fit.shard_samples == 200, name
        cfg = _applied(fit, name)
        assert config.to_dict(cfg.data.augment) == config.to_dict(recipes.get(name).data.augment), name
        assert cfg.data.batch_size == recipes.get(name).data.batch_size
        assert (cfg.eval.image_size, cfg.eval.resize) == (32, 32)


def test_on_224px_photos_views_grow_only_while_the_budget_trains_on_enough_images(tmp_path):
    root = _manifest(tmp_path / "photos", [(224, 224)] * 3905)
    swav = recipes.get("tiny_swav")
    fits = {b: _fit(root, budget_s=b) for b in (60.0, 225.0, 450.0, 900.0, 1800.0, 1e7)}
    views = [f.view_sizes[0] for f in fits.values()]
    assert views == sorted(views) and views[0] == 24 and views[-1] == 112  # up to the smallest crop of 224 px
    for b, fit in fits.items():
        # the resolution at which the smallest crop (scale 0.25: half the side) is cut at the view's size
        assert fit.resolution == min(224, -(-2 * fit.view_sizes[0] // 8) * 8)
        cost = fd.StepCost().step_s(swav, list(fit.view_sizes), 64)
        assert fit.step_s == pytest.approx(cost, rel=1e-3) and fit.steps == int(b / cost)
        assert fit.images == fit.steps * 128
        if fit.view_sizes[0] < 112 and fit.images >= fd.MIN_IMAGES:  # 8 px more would fall below the floor
            assert int(b / fd.StepCost().step_s(swav, [fit.view_sizes[0] + 8], 64)) * 128 < fd.MIN_IMAGES
    # the quickstart's 450 s of pretraining: the recipe's 24 px views (steps first), kNN and ingest at 48 px
    assert (fits[450.0].resolution, fits[450.0].view_sizes, fits[450.0].batch_size) == (48, (24,), 64)
    assert (fits[900.0].resolution, fits[900.0].view_sizes) == (64, (32,))
    assert "the recipe's, the largest at which 450 s buy" in fits[450.0].reasons[1]
    assert fits[450.0].reasons[2].startswith("resolution 48 px: the smallest multiple of 8")
    cfg = _applied(fits[1800.0], "tiny_swav")
    assert cfg.data.augment.views[0].size == 48 and cfg.data.augment.views[0].scale == swav.data.augment.views[0].scale
    assert (cfg.eval.image_size, cfg.eval.resize) == (96, 96)
    # BYOL crops down to scale 0.14: the same views need more pixels per image
    assert _fit(root, "tiny_byol").resolution == 72


def test_mixed_sizes_take_the_side_three_images_in_four_have(tmp_path):
    small_quarter = _manifest(tmp_path / "a", [(32, 32)] * 30 + [(300, 224)] * 70)
    assert fd.data_stats(small_quarter).native_side == 32
    assert _fit(small_quarter, budget_s=1e7).resolution == 32
    few_small = _manifest(tmp_path / "b", [(32, 40)] * 20 + [(500, 96)] * 80, rejected=7)
    stats = fd.data_stats(few_small)
    assert stats.count == 100 and stats.native_side == 96  # the shorter side, written rows only
    big = fd.choose(stats, recipes.get("tiny_swav"), budget_s=1e7, ranks=1)
    assert (big.view_sizes, big.resolution) == ((48,), 96)  # capped by the native side, not a multiple above it
    later = fd.choose(stats, recipes.get("tiny_swav"), budget_s=1e7, ranks=1, max_resolution=64)
    assert (later.view_sizes, later.resolution) == ((32,), 64)  # a later stage: views from its 64 px images


def test_tiny_counts_shrink_the_batch_and_the_shards_and_too_few_images_fail(tmp_path):
    fit = _fit(_manifest(tmp_path / "a", [(32, 32)] * 50))
    assert (fit.batch_size, fit.shard_samples) == (12, 25)  # two batches per rank, a shard per rank
    assert "batch 12 per rank (recipe 64)" in fit.reasons[-1]
    assert _fit(_manifest(tmp_path / "b", [(32, 32)] * 400)).batch_size == 64
    with pytest.raises(ConfigError, match="too few"):
        _fit(_manifest(tmp_path / "c", [(32, 32)] * 7))
    with pytest.raises(ConfigError, match="no image size"):
        fd.data_stats(_manifest(tmp_path / "d", []))


def test_view_groups_scale_together_and_a_cheaper_student_affords_more_pixels(tmp_path):
    root = _manifest(tmp_path / "p", [(224, 224)] * 3905)
    multicrop = recipes.get("tiny_dino")  # with DINO's local crops: 2 x 24 px + 2 x 12 px
    multicrop.data.augment.views.append(dataclasses.replace(multicrop.data.augment.views[0], size=12, scale=(0.05, 0.25)))
    dino = fd.choose(fd.data_stats(root), multicrop, budget_s=3600, ranks=2)
    assert dino.view_sizes[0] > 24 and dino.view_sizes == (dino.view_sizes[0], dino.view_sizes[0] // 2)
    distill = recipes.get("distill_tiny")
    student = config.apply_overrides(distill, ["model.name=resnet10_cifar_w16"])
    stats = fd.data_stats(root)
    assert fd.choose(stats, student, budget_s=600).view_sizes[0] > fd.choose(stats, distill, budget_s=600).view_sizes[0]
    assert fd.flops_ratio("resnet10_cifar_w16") == pytest.approx(0.25, abs=0.01)


def test_folder_statistics_come_from_a_sample_of_headers(tmp_path):
    for i in range(12):
        Image.new("RGB", (64 + 8 * i, 48)).save(tmp_path / f"{i:02d}.png")
    (tmp_path / "notes.jpg").write_bytes(b"not an image")
    stats = fd.data_stats(str(tmp_path))
    assert stats.count == 13 and stats.short_sides == (48,) * 12 and "headers of 12 of 13 files" in stats.where
    sampled = fd.stats_from_images(str(tmp_path), sample=5)
    assert len(sampled.short_sides) <= 5 and sampled == fd.stats_from_images(str(tmp_path), sample=5)  # seeded


def test_real_photos_folder_before_ingest(tmp_path):
    stats = fd.data_stats(str(DATA / "imagenette-dev" / "unlabeled"))
    assert stats.count == 3905 and stats.native_side == 224 and len(stats.short_sides) == fd.HEADER_SAMPLE


def _train_args(**kw):
    base = dict(recipe="tiny_swav", data=None, run_dir="unused", nproc=2, max_steps=None, fit_data=True, overrides=[])
    return argparse.Namespace(**{**base, **kw})


def test_train_fit_data_writes_the_choice_as_overrides_and_the_users_own_win(tmp_path, capsys):
    from seerlike.commands.train import build_config

    root = _manifest(tmp_path / "p", [(224, 224)] * 3905)
    cfg = build_config(_train_args(data=root, overrides=["loop.time_budget_s=1800"]))
    assert cfg.data.augment.views[0].size == 48 and cfg.eval.image_size == 96 and cfg.data.batch_size == 64
    assert "fit-data: views 2 x 48 px" in capsys.readouterr().err
    own = build_config(_train_args(data=root, overrides=["loop.time_budget_s=1800", "data.batch_size=16"]))
    # the user's batch wins, and the rule fitted the views to it
    fitted = fd.choose(fd.data_stats(root), config.apply_overrides(recipes.get("tiny_swav"), ["data.batch_size=16"]),
                       budget_s=1800)
    assert own.data.batch_size == 16 and own.data.augment.views[0].size == fitted.view_sizes[0]
    off = build_config(_train_args(data=root, fit_data=False, overrides=["loop.time_budget_s=1800"]))
    assert off.data.augment.views[0].size == 24 and off.eval.image_size == 224  # nothing derived unless asked
    with pytest.raises(ConfigError, match="loop.time_budget_s"):
        build_config(_train_args(data=root))
    with pytest.raises(ConfigError, match="give --recipe"):
        build_config(_train_args(recipe=None, data=root, overrides=["loop.time_budget_s=450"]))


def test_config_command_shows_the_fitted_recipe(tmp_path, capsys):
    from seerlike.cli import main

    root = _manifest(tmp_path / "p", [(224, 224)] * 3905)
    assert main(["config", "--recipe", "tiny_swav", "--fit-data", root, "--nproc", "2", "loop.time_budget_s=1800"]) == 0
    out = capsys.readouterr()
    shown = config.loads(out.out)
    assert shown.data.augment.views[0].size == 48 and shown.eval.image_size == 96 and shown.data.source == root
    assert "fit-data: views 2 x 48 px" in out.err


def test_quickstart_fits_every_stage_and_off_keeps_the_cifar_pipeline(tmp_path):
    from launchers.pipeline import resolve

    from seerlike.quickstart import DataFit, budget_for, build_pipeline, fit_lines, fit_report, fit_stages

    photos = str(DATA / "imagenette-dev" / "unlabeled")
    budget = budget_for(15)
    fit = fit_stages(photos, budget, "swav", 2)
    # 15 minutes: the recipes' 24 px views in every stage (steps first), the images and kNN at 48 px
    assert fit.resolution == 48 and fit.ingest == ("shard_max_samples=200", "resize_short_side=48")
    assert {st: list(f["view_sizes"]) for st, f in fit.summary["stages"].items()} == {
        "pretrain": [24], "clusterfit": [24], "distill": [24, 24]}
    p = build_pipeline(tmp_path, images=photos, eval_train="t.csv", eval_val="v.csv", budget=budget, fit=fit)
    args = {stage.name: argv for stage, argv, _ in resolve(p)}  # as the stages run them (placeholders filled)
    assert args["ingest"][-2:] == ["shard_max_samples=200", "resize_short_side=48"]
    for name in ("eval_random", "eval_pretrain", "eval_clusterfit", "eval_distilled", "eval_random_student", "extract"):
        assert args[name][args[name].index("--image-size") + 1] == "48", name
        assert args[name][args[name].index("--resize") + 1] == "48", name
    assert args["export"][args["export"].index("--image-size") + 1] == "48"
    lines = fit_lines(fit)
    assert lines[1].startswith("working resolution 48 px") and len(lines) == 5
    (tmp_path / "fit_data.json").write_text(json.dumps(fit.summary))
    report = fit_report(tmp_path)
    assert "**48 px**" in report and "| pretrain | 24 | 64 |" in report

    # 45 minutes: each stage's own seconds size its views; the later ones cut them from the 96 px images
    long = fit_stages(photos, budget_for(45), "swav", 2)
    args = {stage.name: argv for stage, argv, _ in resolve(build_pipeline(
        tmp_path, images=photos, eval_train="t.csv", eval_val="v.csv", budget=budget_for(45), fit=long))}
    sizes = {}
    for stage in ("pretrain", "clusterfit", "distill"):
        views = [a for a in args[stage] if a.startswith("data.augment.views=")]
        assert len(views) == 1 and "eval.image_size=96" in args[stage], stage
        sizes[stage] = [v["size"] for v in json.loads(views[0].partition("=")[2])]
    assert sizes == {"pretrain": [48], "clusterfit": [24], "distill": [56, 56]}

    off = build_pipeline(tmp_path, images=photos, eval_train="t.csv", eval_val="v.csv", budget=budget, fit=DataFit())
    args = {stage.name: argv for stage, argv, _ in resolve(off)}
    assert args["ingest"][-1] == "shard_max_samples=200"
    assert args["eval_random"][args["eval_random"].index("--image-size") + 1] == "32"
    assert not any(a.startswith("data.augment") for a in args["pretrain"])
    (tmp_path / "fit_data.json").write_text(json.dumps({"rule": "off"}))
    assert "`--no-fit-data`" in fit_report(tmp_path)


def test_quickstart_on_cifar_changes_nothing_that_trains(cifar_dir, tmp_path):
    from seerlike.quickstart import budget_for, build_pipeline, fit_stages

    fit = fit_stages(str(cifar_dir / "train"), budget_for(15), "swav", 2)
    assert fit.resolution == 32 and fit.ingest == ("shard_max_samples=200", "resize_short_side=32")
    for stage, recipe in (("pretrain", "tiny_swav"), ("clusterfit", "clusterfit_tiny"), ("distill", "distill_tiny")):
        cfg = recipes.get(recipe)
        fitted = config.apply_overrides(cfg, fit.train[stage])
        assert config.to_dict(fitted.data.augment) == config.to_dict(cfg.data.augment), stage
        assert fitted.data.batch_size == cfg.data.batch_size


@pytest.mark.parametrize("fit_data", [True, False])
def test_the_quickstart_pretrains_every_pretraining_method_with_a_valid_config(tmp_path, capsys, fit_data):
    """`seerlike quickstart --method NAME`: every pretraining method's stage resolves to a config that validates
    (its views suit the method after fitting them to 224 px photos, or at the CIFAR settings)."""
    from launchers.pipeline import resolve

    from seerlike.cli import main
    from seerlike.methods import pretraining_methods
    from seerlike.quickstart import DataFit, budget_for, build_pipeline, fit_stages

    photos = str(DATA / "imagenette-dev" / "unlabeled")
    budget = budget_for(15)
    methods = pretraining_methods()
    assert {"swav", "byol", "dino", "rotnet", "jigsaw", "colorization", "deepcluster_v2", "pirl",
            "multitask"} <= set(methods)
    for method in methods:
        fit = fit_stages(photos, budget, method, 2) if fit_data else DataFit()
        p = build_pipeline(tmp_path / method, images=photos, eval_train="t.csv", eval_val="v.csv", method=method,
                           budget=budget, fit=fit)
        argv = {stage.name: a for stage, a, _ in resolve(p)}["pretrain"]
        assert argv[argv.index("--recipe") + 1] == f"tiny_{method}"
        overrides = [a for a in argv if "=" in a and not a.startswith("-") and not a.startswith("eval.")]
        assert main(["config", "--recipe", f"tiny_{method}", *overrides]) == 0, (method, capsys.readouterr().err)
        assert f"name: {method}" in capsys.readouterr().out
