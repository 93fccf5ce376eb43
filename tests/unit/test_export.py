"""Export: every format gives the eager outputs; state dicts load strict into the same-name backbone."""

from __future__ import annotations

import json

import pytest
import torch

from seerlike import config as configlib
from seerlike import models
from seerlike.config import ConfigError
from seerlike.checkpoints import load_backbone
from seerlike.exporter import FILES, export, onnx_run

ARCH = "resnet10_cifar"
pytestmark = pytest.mark.usefixtures("one_thread")


def _x(n=3, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def write_checkpoint(run_dir, method, train_cfg, step=7):
    """A real engine checkpoint (DCP + config.yaml + COMPLETE) of ``method`` on a 1-rank group."""
    from seerlike.engine.checkpoint import CheckpointConfig, Checkpointer
    from seerlike.engine.dist import init_distributed, teardown

    init_distributed()
    try:
        opt = torch.optim.SGD(method.parameters(), lr=0.1)
        ckpt = Checkpointer(CheckpointConfig(), run_dir)
        ckpt.save(step, method, opt, method=method, scaler=None, data_state={}, train_config=train_cfg)
        ckpt.wait()
    finally:
        teardown()


def _clusterfit_run(tmp_path, k=5):
    from seerlike.engine.config import ModelConfig, TrainConfig
    from seerlike.methods.clusterfit import ClusterFit

    from seerlike import recipes

    torch.manual_seed(0)
    cfg = configlib.apply_overrides(recipes.get("clusterfit_tiny"), [f"method.num_classes={k}"])  # 24 px views
    assert isinstance(cfg, TrainConfig) and cfg.model == ModelConfig(name=ARCH, channels_last=cfg.model.channels_last)
    method = ClusterFit(cfg.method, models.build(ARCH))
    with torch.no_grad():  # non-trivial BN statistics, so a lost buffer would show
        for m in method.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    method.eval()
    write_checkpoint(tmp_path / "run", method, cfg)
    return method


def test_every_format_matches_eager_and_loads_strict(tmp_path):
    export("random:" + ARCH, tmp_path / "exp", ["torchvision", "safetensors", "torchscript", "onnx"], image_size=32)
    meta = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert set(meta["files"]) == set(FILES) and meta["arch"] == ARCH and meta["fc_shape"] is None
    assert meta["checks"]["onnx"] < 1e-4 and meta["checks"]["torchscript"] < 1e-5
    torch.manual_seed(0)
    ref = models.build(ARCH).eval()  # random:ARCH is seeded with 0
    x = _x(5)
    with torch.no_grad():
        want = ref(x)
        # (a) strict=True into the same-name backbone, from both state-dict formats
        pth = models.build(ARCH)
        pth.load_state_dict(torch.load(tmp_path / "exp" / FILES["torchvision"], weights_only=True), strict=True)
        from safetensors.torch import load_file

        st = models.build(ARCH)
        st.load_state_dict(load_file(str(tmp_path / "exp" / FILES["safetensors"])), strict=True)
        torch.testing.assert_close(pth.eval()(x), want, rtol=0, atol=0)
        torch.testing.assert_close(st.eval()(x), want, rtol=0, atol=0)
        # (b) TorchScript and ONNX at a batch size other than the traced one
        ts = torch.jit.load(str(tmp_path / "exp" / FILES["torchscript"]))
        torch.testing.assert_close(ts(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(onnx_run(tmp_path / "exp" / FILES["onnx"], x), want, rtol=1e-4, atol=1e-4)
        # the export dir is itself a model spec for extract / eval / distill
        torch.testing.assert_close(load_backbone(tmp_path / "exp").model(x), want, rtol=0, atol=0)
    card = (tmp_path / "exp" / "MODEL_CARD.md").read_text()
    assert ARCH in card and "backbone.onnx" in card


def test_checkpoint_with_head_exports_fc_and_card(tmp_path):
    method = _clusterfit_run(tmp_path, k=5)
    evals = tmp_path / "eval_knn.json"
    evals.write_text(json.dumps({"kind": "knn", "metrics": {"top1": 42.0, "top5": 90.0}}))
    meta = export(tmp_path / "run", tmp_path / "exp", ["torchvision", "onnx"], with_head=True,
                  eval_files=[str(evals)])
    assert meta["fc_shape"] == [5, 256] and meta["step"] == 7
    # what the card says is how it loads: a K-class classifier, trained on 24 px views
    assert meta["build"] == {"name": ARCH, "num_classes": 5} and meta["outputs"] == "logits"
    assert meta["input"]["size"] == 24 and meta["input"]["size_from"].startswith("as trained")
    state = torch.load(tmp_path / "exp" / FILES["torchvision"], weights_only=True)
    assert {"fc.weight", "fc.bias"} <= set(state)
    # with an fc, the state dict loads strict into the classifier of the same name
    clf = models.build(**meta["build"])
    clf.load_state_dict(state, strict=True)
    import onnx

    assert [o.name for o in onnx.load(str(tmp_path / "exp" / FILES["onnx"])).graph.output] == ["logits"]
    for x in (_x(), _x(2, 40)):  # the graph's height and width are dynamic, not the traced 24
        with torch.no_grad():
            want = method.logits(x)
            torch.testing.assert_close(clf.eval()(x), want, rtol=0, atol=0)
            torch.testing.assert_close(onnx_run(tmp_path / "exp" / FILES["onnx"], x), want, rtol=1e-4, atol=1e-4)
    x = _x()
    with torch.no_grad():
        want = method.logits(x)
    card = (tmp_path / "exp" / "MODEL_CARD.md").read_text()
    assert "training steps: 7" in card and "top1 42.00" in card and "clusterfit" in card
    assert "24 px as trained" in card and "(5 classes)" in card and "num_classes=5" in card
    saved = configlib.load(tmp_path / "exp" / "config.yaml")
    assert saved.method.name == "clusterfit" and saved.method.num_classes == 5
    # loading the run dir picks its newest complete checkpoint, trunk and head
    loaded = load_backbone(tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(loaded.head(loaded.model(x)), want, rtol=0, atol=0)


def test_export_refuses_bad_requests(tmp_path):
    with pytest.raises(ConfigError, match="unknown export format"):
        export("random:" + ARCH, tmp_path / "a", ["pickle"])
    with pytest.raises(ConfigError, match="no classifier head"):
        export("random:" + ARCH, tmp_path / "b", ["torchvision"], with_head=True)
    with pytest.raises(ConfigError, match="unknown backbone"):
        export("random:resnet_nope", tmp_path / "c", ["torchvision"])
    with pytest.raises(ConfigError, match="not found"):
        export(tmp_path / "missing", tmp_path / "d", ["torchvision"])
    export("random:" + ARCH, tmp_path / "e", ["torchvision"], image_size=32)
    with pytest.raises(ConfigError, match="already holds an export of resnet10_cifar"):
        export("random:resnet18", tmp_path / "e", ["torchvision"])


@pytest.mark.gpu
def test_torchvision_loads_the_export_strict(tmp_path):
    tv = pytest.importorskip("torchvision")
    export("random:resnet18", tmp_path / "exp", ["torchvision"], image_size=64)
    model = tv.models.resnet18()
    model.fc = torch.nn.Identity()  # a trunk export has no classifier (see seerlike.exporter)
    model.load_state_dict(torch.load(tmp_path / "exp" / FILES["torchvision"], weights_only=True), strict=True)
    x = _x(2, 64)
    torch.manual_seed(0)
    ref = models.build("resnet18").eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x))
