"""kNN, linear probe and low-shot evaluation on feature tensors."""

from __future__ import annotations

import pytest
import torch

from seerlike.eval.knn import KNNConfig, knn_eval, knn_scores, topk_accuracy
from seerlike.eval.linear import LinearConfig, LowShotConfig, lowshot_eval, linear_eval, sample_per_class

C = 10
pytestmark = pytest.mark.usefixtures("one_thread")


def _encoded(n, dim=64, noise=0.3, seed=0):
    """Features = one-hot-ish class code + noise: the label is in the features."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    codes = torch.randn(C, dim, generator=torch.Generator().manual_seed(123))
    return codes[y] + noise * torch.randn(n, dim, generator=g), y


def test_knn_on_label_encoding_features_is_perfect():
    tx, ty = _encoded(500)
    vx, vy = _encoded(200, seed=1)
    acc, pred = knn_eval(tx, ty, vx, vy, C)
    assert acc["top1"] == 100.0 and acc["top5"] == 100.0
    assert torch.equal(pred, vy)


def test_knn_on_random_features_is_chance():
    g = torch.Generator().manual_seed(0)
    tx, vx = torch.randn(2000, 32, generator=g), torch.randn(2000, 32, generator=g)
    ty, vy = torch.randint(0, C, (2000,), generator=g), torch.randint(0, C, (2000,), generator=g)
    acc, _ = knn_eval(tx, ty, vx, vy, C)
    assert abs(acc["top1"] - 10.0) < 3.0  # 2000 draws: std of the mean about 0.7 points
    assert abs(acc["top5"] - 50.0) < 5.0


def test_knn_votes_are_temperature_weighted():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.2]])
    # two weak votes for class 1 vs one strong vote for class 0: temperature decides
    sharp = knn_scores(train, labels, q, 2, KNNConfig(k=3, temperature=0.07))
    flat = knn_scores(train, labels, q, 2, KNNConfig(k=3, temperature=100.0))
    assert sharp.argmax().item() == 0 and flat.argmax().item() == 1
    cos = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    torch.testing.assert_close(sharp[0], torch.stack([(cos[0, 0] / 0.07).exp(), 2 * (cos[0, 1] / 0.07).exp()]))


def test_topk_accuracy_counts():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(scores, torch.tensor([1, 2, 0]), ks=(1, 2))
    assert acc["top1"] == pytest.approx(100 / 3) and acc["top2"] == pytest.approx(200 / 3)


def test_linear_probe_learns_encoded_labels_and_not_random_ones():
    tx, ty = _encoded(1000, noise=1.0)
    vx, vy = _encoded(500, noise=1.0, seed=1)
    acc, pred = linear_eval(tx, ty, vx, vy, C, LinearConfig(epochs=30))
    assert acc["top1"] > 95.0 and pred.shape == vy.shape
    g = torch.Generator().manual_seed(3)
    acc_rand, _ = linear_eval(torch.randn(1000, 64, generator=g), ty, torch.randn(500, 64, generator=g), vy, C,
                              LinearConfig(epochs=30))
    assert acc_rand["top1"] < 20.0


def test_lowshot_sampling_draws_n_per_class_without_repeats():
    y = torch.arange(300) % C
    idx = sample_per_class(y, 5, torch.Generator().manual_seed(0))
    assert idx.unique().numel() == 50
    assert torch.equal(torch.bincount(y[idx], minlength=C), torch.full((C,), 5))
    other = sample_per_class(y, 5, torch.Generator().manual_seed(1))
    assert not torch.equal(idx.sort().values, other.sort().values)
    with pytest.raises(ValueError, match="fewer than the 40 shots"):
        sample_per_class(y, 40, torch.Generator())


def test_lowshot_accuracy_grows_with_shots():
    tx, ty = _encoded(1000, noise=2.5)
    vx, vy = _encoded(500, noise=2.5, seed=1)
    res, pred = lowshot_eval(tx, ty, vx, vy, C, LowShotConfig(shots=(1, 10), draws=2,
                                                              probe=LinearConfig(epochs=50, batch_size=64)))
    assert set(res) == {"1shot", "10shot"} and res["1shot"]["draws"] == 2
    assert res["10shot"]["top1"] > res["1shot"]["top1"] + 5
    assert res["10shot"]["top1"] > 50.0 and pred.shape == vy.shape


def _features_dir(path, x, y, model="m", layer="pool"):
    from seerlike.eval.features import finalize, write_chunk

    names = [f"class{int(c)}" for c in y]
    write_chunk(path, "part-000000", [f"k{i}" for i in range(len(y))], x.numpy(), names)
    finalize(path, {"layer": layer, "dim": x.shape[1], "model": model, "arch": "resnet10_cifar", "step": 3,
                    "image_size": 32})


def test_eval_command_on_features_dirs_writes_json_and_confusion(tmp_path):
    import json

    import seerlike
    from seerlike.config import ConfigError

    tx, ty = _encoded(300)
    vx, vy = _encoded(100, seed=1)
    _features_dir(tmp_path / "tr", tx, ty)
    _features_dir(tmp_path / "va", vx, vy)
    res = seerlike.evaluate("knn", None, train=tmp_path / "tr", val=tmp_path / "va", out=tmp_path / "out",
                            progress=False)
    result = res.result
    assert result["metrics"]["top1"] == 100.0 and result["num_classes"] == C and result["step"] == 3
    assert res.files == [tmp_path / "out" / "eval_knn.json", tmp_path / "out" / "confusion_knn.png"]
    saved = json.loads((tmp_path / "out" / "eval_knn.json").read_text())
    assert sum(map(sum, saved["confusion"])) == 100 and all(saved["confusion"][i][i] == 10 for i in range(C))
    assert (tmp_path / "out" / "confusion_knn.png").stat().st_size > 1000
    _features_dir(tmp_path / "other", vx, vy, layer="res5")
    with pytest.raises(ConfigError, match="come from m"):
        seerlike.evaluate("knn", None, train=tmp_path / "tr", val=tmp_path / "other", out=tmp_path / "o2")


def test_eval_without_labels_names_every_labelled_form_with_an_example(tmp_path, cifar_dir):
    import csv

    import seerlike
    from seerlike.config import ConfigError

    rows = list(csv.DictReader(open(cifar_dir / "train.csv")))[:3]
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("path\n" + "".join(f"{cifar_dir / r['path']}\n" for r in rows))
    with pytest.raises(ConfigError) as err:
        seerlike.evaluate("linear", "random:resnet10_cifar_w16", train=unlabelled, val=unlabelled,
                          out=tmp_path / "out", image_size=16, progress=False)
    msg = str(err.value)
    assert f"--train {unlabelled}: 3 of 3 samples have no label" in msg
    assert "class folders (DIR/CLASS/IMAGE): seerlike eval linear --model M --train data/train --val data/val" in msg
    assert "a path,label CSV: seerlike eval linear --model M --train train.csv --val val.csv" in msg
    assert ("a dataset ingested from a path,label CSV (each sample's .json keeps its label; an ingested folder keeps "
            "no class): seerlike ingest train.csv --out ds/train && seerlike ingest val.csv --out ds/val && "
            "seerlike eval linear --model M --train ds/train --val ds/val") in msg
    assert ("features dirs extracted from one of these: seerlike extract --checkpoint M --data train.csv --out "
            "feats/train && seerlike extract --checkpoint M --data val.csv --out feats/val && "
            "seerlike eval linear --train feats/train --val feats/val") in msg
    with pytest.raises(ConfigError, match=r"(?s)--val .*missing does not exist; give labelled images as one of:.*"
                                          r"seerlike ingest train.csv"):
        seerlike.evaluate("knn", "random:resnet10_cifar_w16", train=unlabelled, val=tmp_path / "missing",
                          out=tmp_path / "out", progress=False)
