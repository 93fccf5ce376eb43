"""benchmarks/bench_learning.py's levers at the full budget: overrides reach the run, rows are named METHOD:VARIANT,
and a run trained with other overrides is refused rather than reused."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from seerlike import config, recipes
from seerlike.commands.train import add_arguments
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_learning.py")


@pytest.fixture
def fake_cli(bench, monkeypatch):
    """`seerlike train` writes two metrics rows; `seerlike eval knn` scores 40 for trained models, 30 for random init."""
    calls = []

    def main(argv):
        calls.append(argv)
        out = Path(argv[argv.index("--run-dir" if argv[0] == "train" else "--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        if argv[0] == "train":
            rows = [{"step": 1, "loss": 4.0, "calibrated_step_s": 0.2}, {"step": 9, "loss": 2.0}]
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            config.dump(recipes.get(argv[argv.index("--recipe") + 1]), out / "config.yaml")
        else:
            top1 = 30.0 if argv[argv.index("--model") + 1].startswith("random:") else 40.0
            (out / "eval_knn.json").write_text(json.dumps({"metrics": {"top1": top1}}))
        return 0

    monkeypatch.setattr(bench, "seerlike_main", main)
    return calls


def _args(tmp_path, **kw):
    base = {"run_root": str(tmp_path), "minutes": 1.0, "clock": "cpu", "images": None, "eval_train": None,
            "eval_val": None, "heldout_csv": None, "fit_data": False, "variant": "", "set": []}
    return type("A", (), {**base, **kw})()


def test_a_variant_trains_with_its_overrides_last_and_is_tabled_by_its_name(bench, fake_cli, tmp_path):
    args = _args(tmp_path, variant="grid2", set=["method.grid=2", "method.num_permutations=24"])
    row = bench.run_pretrain_only("jigsaw", 1, args)
    train = fake_cli[0]
    assert train[:3] == ["train", "--recipe", "tiny_jigsaw"] and train[-2:] == args.set  # after the benchmark's own
    fitted = bench.run_pretrain_only("jigsaw", 2, _args(tmp_path, variant="grid2", set=args.set, fit_data=True))
    assert fake_cli[-3][-3:] == [*args.set, "--fit-data"]  # `seerlike train` takes its overrides before its flags
    parser = argparse.ArgumentParser()
    add_arguments(parser)  # the real parser: the variant's overrides are overrides, not unrecognised arguments
    assert parser.parse_args(fake_cli[-3][1:]).overrides[-2:] == args.set and fitted["method"] == "jigsaw:grid2"
    assert row["method"] == "jigsaw:grid2" and row["overrides"] == args.set
    assert row["run_dir"] == str(tmp_path / "jigsaw_grid2_seed1_1min_pretrain")
    assert row["val"] == {"random": 30.0, "pretrained": 40.0} and row["steps"]["pretrain"] == 9
    assert "jigsaw:grid2" in bench.pretrain_medians([row])
    assert bench.run_pretrain_only("jigsaw", 1, args)["method"] == "jigsaw:grid2"  # cached: trains nothing more
    assert [c[0] for c in fake_cli].count("train") == 2  # seeds 1 and 2; the cached seed 1 trained once


def test_rows_of_another_machine_or_data_set_never_share_a_median():
    bench = load_script("benchmarks/bench_learning.py")
    base = {"method": "rotnet", "steps": {"pretrain": 100}, "step_s": 0.1, "peak_rss_mb": 1.0,
            "val": {"random": 30.0, "pretrained": 40.0}}
    old = [{**base, "seed": s} for s in (0, 1)]  # rows written before machines were recorded
    avx2 = {**base, "seed": 2, "machine": {"cpu": "AMD EPYC", "capability": "AVX2", "native_bf16": False},
            "dtype": "fp32", "val": {"random": 30.0, "pretrained": 31.0}}
    photos = {**avx2, "images": "/data/imagenette-dev/unlabeled"}
    table = bench.pretrain_medians([*old, avx2, photos])
    assert "| rotnet | 0,1 |" in table and "| rotnet [AVX2, fp32] | 2 |" in table
    assert "| rotnet [AVX2, fp32; imagenette-dev] | 2 |" in table


def test_a_run_trained_with_other_overrides_is_refused(bench, fake_cli, tmp_path):
    bench.run_pretrain_only("jigsaw", 0, _args(tmp_path, variant="v", set=["method.grid=2"]))
    with pytest.raises(SystemExit, match="another name"):
        bench.run_pretrain_only("jigsaw", 0, _args(tmp_path, variant="v", set=["method.grid=3"]))
    plain = bench.run_pretrain_only("rotnet", 0, _args(tmp_path))  # the registered recipe: no overrides, its own name
    assert plain["method"] == "rotnet" and "overrides" not in plain


def test_a_run_of_a_recipe_changed_since_is_refused(bench, fake_cli, tmp_path, monkeypatch):
    bench.run_pretrain_only("jigsaw", 0, _args(tmp_path))
    assert bench.run_pretrain_only("jigsaw", 0, _args(tmp_path))["method"] == "jigsaw"  # same recipe: reused
    real = bench.recipe_fingerprint
    assert real("jigsaw", []) != real("jigsaw", ["method.grid=3"]) == real("jigsaw", ["method.grid=3"])
    monkeypatch.setattr(bench, "recipe_fingerprint", lambda method, overrides: real(method, ["method.grid=3"]))
    with pytest.raises(SystemExit, match="the recipe changed since"):
        bench.run_pretrain_only("jigsaw", 0, _args(tmp_path))
    assert [c[0] for c in fake_cli].count("train") == 1


@pytest.mark.parametrize("argv", [["--set", "a=1"], ["--variant", "v"], ["--set", "a=1", "--variant", "v"]])
def test_set_needs_a_variant_name_and_pretrain_only(argv):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_learning.py"), *argv],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--set and --variant go together" in out.stderr


def test_colorization_is_scored_against_random_init_fed_the_lightness(bench, fake_cli, tmp_path):
    row = bench.run_pretrain_only("colorization", 0, _args(tmp_path))
    models = [c[c.index("--model") + 1] for c in fake_cli if c[0] == "eval"]
    assert row["random"] == "random:resnet10_cifar:in_channels=1" == models[0]
    assert bench.run_pretrain_only("rotnet", 0, _args(tmp_path))["random"] == "random:resnet10_cifar"
    bases = {c[c.index("--model") + 1]: c[c.index("--out") + 1] for c in fake_cli if c[0] == "eval"}
    assert len({Path(bases[m]).parent for m in bases if m.startswith("random:")}) == 2  # one cached score each
