"""The Python API trains like the CLI, returns what comes next, and fails like the CLI."""

from __future__ import annotations

import pytest

import seerlike
from seerlike.config import ConfigError

TINY = {"loop.max_steps": 2, "data.batch_size": 8, "loop.progress": False, "loop.tensorboard": False,
        "optim.warmup_steps": 1, "parallel.strategy": "none", "precision.dtype": "fp32",
        "checkpoint.every_steps": 2}


def test_pretrain_returns_the_run_its_checkpoint_and_metrics(tmp_path, cifar_dir, one_thread, monkeypatch):
    (tmp_path / "images").symlink_to(cifar_dir / "val")
    monkeypatch.chdir(tmp_path)  # relative paths in, absolute paths recorded
    run = seerlike.pretrain(data="images", out="run", recipe="tiny_byol", overrides=TINY)
    assert run.run_dir == tmp_path / "run" and run.step == 2 and not run.stopped
    assert "source: " + str(tmp_path / "images") in (tmp_path / "run" / "config.yaml").read_text()
    assert run.checkpoint is not None and run.checkpoint.name == "step_00000002"
    assert run.metrics["step"] == 2 and run.metrics["loss"] > 0
    assert run.config.loop.max_steps == 2
    # no recipe: the run continues from its own config.yaml (already complete: nothing to do)
    again = seerlike.pretrain(out=tmp_path / "run")
    assert again.step == 2 and again.checkpoint == run.checkpoint


def test_an_unknown_method_fails_listing_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown method 'nope'; choose one of \[.*'byol'.*'swav'"):
        seerlike.pretrain(data=tmp_path, out=tmp_path / "run", recipe="tiny_swav", overrides={"method.name": "nope"})
    assert not (tmp_path / "run").exists()


def test_the_cli_says_the_same_with_exit_status_2(tmp_path, capsys):
    from seerlike.cli import main

    assert main(["train", "--recipe", "tiny_swav", "--run-dir", str(tmp_path / "r"), "method.name=nope"]) == 2
    assert "unknown method 'nope'; choose one of" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_missing_data_path_is_one_line_and_leaves_no_run_folder(tmp_path, capsys):
    from seerlike.cli import main

    with pytest.raises(ConfigError, match=r"data source '.*nowhere' does not exist"):
        seerlike.pretrain(data=tmp_path / "nowhere", out=tmp_path / "r", recipe="tiny_swav")
    assert main(["train", "--recipe", "tiny_swav", "--data", str(tmp_path / "nowhere"), "--run-dir",
                 str(tmp_path / "r")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err + captured.out
    assert captured.err.startswith("seerlike train: config error: --data (data.source): data source")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- the other four, chained


def _labelled(root, cifar_dir, classes=("airplane", "frog"), n=6, offset=0):
    """A small class-folder tree of real CIFAR images (links, not copies)."""
    for c in classes:
        (root / c).mkdir(parents=True)
        for src in sorted((cifar_dir / "train" / c).glob("*.jpg"))[offset:offset + n]:
            (root / c / src.name).symlink_to(src)
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cifar_dir):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("api") / "run"
        yield seerlike.pretrain(data=cifar_dir / "val", out=out, recipe="tiny_byol", overrides=TINY)
    finally:
        torch.set_num_threads(before)


def test_ingest_takes_one_path_or_a_list_and_returns_the_dataset(tmp_path, cifar_dir, monkeypatch):
    images = _labelled(tmp_path / "images", cifar_dir, n=5)
    monkeypatch.chdir(tmp_path)
    ds = seerlike.ingest("images", out="ds", progress=False, overrides={"shard_max_samples": 4})
    assert ds.dataset == str(tmp_path / "ds") and ds.written == 10 and ds.shards == 3
    assert ds.manifest == str(tmp_path / "ds" / "manifest.parquet") and (tmp_path / "ds" / "manifest.parquet").is_file()
    assert ds.summary["seen"] == 10 and ds.summary["rejected"] == 0
    # a list of inputs: the same images twice are ten duplicates
    again = seerlike.ingest([images / "airplane", images / "frog", images], out=tmp_path / "ds2", progress=False)
    assert again.written == 10 and again.summary["duplicate"] == 10


def test_ingest_fails_like_the_cli_and_writes_nothing(tmp_path, capsys):
    from seerlike.cli import main

    with pytest.raises(ConfigError, match=r"input .*missing does not exist"):
        seerlike.ingest(tmp_path / "missing", out=tmp_path / "ds")
    with pytest.raises(ConfigError, match="unknown key 'nope' in IngestConfig"):
        seerlike.ingest(tmp_path, out=tmp_path / "ds", overrides={"nope": 1})
    assert main(["ingest", str(tmp_path / "missing"), "--out", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "ds").exists()


def test_extract_evaluate_export_chain_on_a_checkpoint(tmp_path, cifar_dir, tiny_run, one_thread, monkeypatch):
    import json
    import os

    train = _labelled(tmp_path / "train", cifar_dir, n=6)
    val = _labelled(tmp_path / "val", cifar_dir, n=3, offset=6)
    monkeypatch.chdir(tmp_path)  # relative paths in; meta.json and export.json record absolute ones
    ckpt = os.path.relpath(tiny_run.checkpoint, tmp_path)
    feats = seerlike.extract(ckpt, data="train", out="feats", layer="pool", image_size=32, progress=False)
    assert feats.out == tmp_path / "feats" and feats.num_samples == 12 and feats.dim == 256
    meta = json.loads((tmp_path / "feats" / "meta.json").read_text())
    assert meta["data"] == str(train) and meta["model"] == str(tiny_run.checkpoint)
    with pytest.raises(ConfigError, match="extract: unknown setting 'layers'"):
        seerlike.extract(tiny_run.checkpoint, data=train, out=tmp_path / "f2", layers="pool")
    # default out: beside the model; the features dir stands in for the training images
    knn = seerlike.evaluate("knn", tiny_run.checkpoint, train=feats.out, val=val, image_size=32, k=3, progress=False)
    assert knn.out == tiny_run.checkpoint / "eval" and [f.name for f in knn.files] == ["eval_knn.json", "confusion_knn.png"]
    assert 0 <= knn.metrics["top1"] <= 100 and knn.result["num_train"] == 12 and knn.result["num_val"] == 6
    # the export finds that evaluation, and an evaluation of the export lands in its card too
    exp = seerlike.export(ckpt, out="exp", formats="torchvision,safetensors", progress=False)
    assert set(exp.files) == {"torchvision", "safetensors"} and all(p.is_file() for p in exp.files.values())
    assert json.loads((tmp_path / "exp" / "export.json").read_text())["source"] == str(tiny_run.checkpoint)
    assert exp.meta["input"]["size"] == 24 and exp.meta["evals"]["eval_knn"]["metrics"] == knn.metrics
    lin = seerlike.evaluate("linear", exp.out, train=train, val=val, image_size=32, epochs=2, progress=False)
    card = (exp.out / "MODEL_CARD.md").read_text()
    assert f"top1 {knn.metrics['top1']:.2f}" in card and f"top1 {lin.metrics['top1']:.2f}" in card


def test_version_is_the_package_version(capsys):
    from seerlike.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"seerlike {seerlike.__version__}\n"


@pytest.mark.parametrize("argv, says", [
    (["extract", "--checkpoint", "random:resnet10_cifar", "--data", "{tmp}/nowhere", "--out", "{tmp}/out"],
     "data source '{tmp}/nowhere' does not exist"),
    (["eval", "knn", "--model", "{tmp}/no-model", "--train", "{tmp}", "--val", "{tmp}", "--out", "{tmp}/out"],
     "model '{tmp}/no-model' not found"),
    (["export", "--checkpoint", "{tmp}/no-model", "--out", "{tmp}/out"], "model '{tmp}/no-model' not found"),
])
def test_follow_up_commands_fail_in_one_line_before_writing(tmp_path, capsys, argv, says):
    from seerlike.cli import main

    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert says.format(tmp=tmp_path) in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_five_names_stay_functions_after_every_module_is_imported():
    import importlib
    import pkgutil

    for mod in pkgutil.walk_packages(seerlike.__path__, "seerlike."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)  # a submodule named like a function would replace it
    for name in ("ingest", "pretrain", "extract", "evaluate", "export"):
        assert callable(getattr(seerlike, name)) and getattr(seerlike, name).__module__ == "seerlike.api", name
    assert set(dir(seerlike)) >= {"ingest", "pretrain", "extract", "evaluate", "export", "PretrainResult"}
