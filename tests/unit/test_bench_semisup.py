"""benchmarks/bench_semisup.py's variant arms: the spec parses, bad specs fail, a cache made with other overrides is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_semisup.py")


def test_variant_spec_gives_name_arm_and_overrides(bench):
    assert bench.parse_variant("fm_t08=fixmatch:method.threshold=0.8,optim.lr=0.03") == (
        "fm_t08", "fixmatch", ["method.threshold=0.8", "optim.lr=0.03"])


@pytest.mark.parametrize("spec", ["fixmatch:optim.lr=1", "x=linear:optim.lr=1", "finetune=fixmatch:a=1",
                                  "x=nope:a=1", "a/b=fixmatch:a=1"])
def test_bad_variant_specs_fail_naming_the_form(bench, spec):
    with pytest.raises(SystemExit, match="NAME=ARM:KEY=VALUE"):
        bench.parse_variant(spec)


def test_a_cached_arm_is_reused_only_with_the_same_overrides(bench, tmp_path):
    row = {"arm": "fm", "top1": 40.0, "cpu_s": 9, "steps": 3, "overrides": ["optim.lr=0.1"], "wall_s": 9}
    (tmp_path / "fm").mkdir()
    (tmp_path / "fm" / "result.json").write_text(json.dumps(row))
    same = bench.run_arm("fm", "fixmatch", ("optim.lr=0.1",), tmp_path, "B", tmp_path, tmp_path, None, 0)
    assert same == row
    with pytest.raises(SystemExit, match="give the variant a new NAME"):
        bench.run_arm("fm", "fixmatch", ("optim.lr=0.3",), tmp_path, "B", tmp_path, tmp_path, None, 0)


def test_finetune_token_names_the_finetune_arm_of_the_same_labels_and_seed(bench, tmp_path, monkeypatch):
    seen = []

    def fake_run(argv, log):
        seen.append(argv)
        out = Path(argv[argv.index("--run-dir") + 1])
        out.mkdir(parents=True)
        (out / "config.yaml").write_text("loop: {max_steps: 12}\n")
        return 5.0

    monkeypatch.setattr(bench, "_run", fake_run)
    monkeypatch.setattr(bench, "_accuracy", lambda final, log: 41.0)
    args = type("A", (), {"arm_seconds": 10.0})()
    ov = ("method.init=@FINETUNE@", "method.init_head=true")
    row = bench.run_arm("fm_ft", "fixmatch", ov, tmp_path, "B", tmp_path / "l.csv", tmp_path / "u.csv", args, 0)
    assert f"method.init={tmp_path / 'finetune'}" in seen[0] and "method.init_head=true" in seen[0]
    assert row["overrides"] == list(ov) and row["top1"] == 41.0 and row["steps"] == 12  # the cache keeps the token
