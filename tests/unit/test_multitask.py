"""Multi-task pretext training: the summed loss equals each task trained alone, the trunk is shared
(its weights once in the state dict), interleaving trains one head per batch and leaves the others
untouched by the optimizer, lightness inputs reach the RGB trunk as gray images, bad configs fail."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from seerlike import config, recipes
from seerlike.config import ConfigError
from seerlike.data.augment import IMAGENET_MEAN, IMAGENET_STD
from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods.jigsaw import Jigsaw
from seerlike.methods.multitask import MultiTask, SharedTrunk, gray_from_lightness
from seerlike.methods.pretext_ops import lightness_input, srgb_to_lab
from seerlike.methods.rotnet import RotNet
from seerlike.testing import micro_batch
from tests.unit.test_swav import TinyNet

torch.set_num_threads(1)
SETTINGS = {"jigsaw": {"num_permutations": 4, "tile_dims": [8]}}


def _multi(**kw) -> MultiTask:
    torch.manual_seed(0)
    base = dict(tasks=("rotnet", "jigsaw"), weights=(0.5, 2.0), views=((0,), (1,)), settings=SETTINGS)
    return MultiTask(MultiTask.Config(**{**base, **kw}), TinyNet())


def _views(step: int, bs: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(300 + step)
    return [torch.randn(bs, 3, 8, 8, generator=g), torch.randn(bs, 3, 12, 12, generator=g)]


def _step(m, opt, step, views):
    return train_step(m, m, opt, None, [micro_batch(views)], step=step, max_steps=10,
                      precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu"))


def test_summed_loss_is_the_weighted_sum_of_each_task_alone():
    m = _multi()
    views = _views(0)
    torch.manual_seed(5)
    loss, stats = m(views)
    # each task alone on a copy of the same trunk, with its heads' weights: what it trains on its own
    rot = RotNet(RotNet.Config(), copy.deepcopy(m.backbone))
    rot.head.load_state_dict(m.tasks["rotnet"].head.state_dict())
    jig = Jigsaw(Jigsaw.Config(num_permutations=4, tile_dims=(8,)), copy.deepcopy(m.backbone))
    jig.load_state_dict({k: v for k, v in m.tasks["jigsaw"].state_dict().items()}, strict=False)
    torch.manual_seed(5)  # rotnet draws nothing (all 4 rotations), the jigsaw its tiles and permutations
    expected = 0.5 * rot([views[0]])[0] + 2.0 * jig([views[1]])[0]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert {"rotnet_loss", "rotnet_acc", "jigsaw_loss", "jigsaw_acc"} == set(stats)


def test_the_trunk_is_shared_and_stored_once():
    m = _multi()
    state = m.state_dict()
    assert any(k.startswith("backbone.") for k in state)
    assert not any("backbone" in k for k in state if k.startswith("tasks."))  # the tasks hold a handle, no copy
    assert "tasks.jigsaw.permutations" in state and "tasks.rotnet.head.0.weight" in state and "batches" in state
    trunk_params = {id(p) for p in m.backbone.parameters()}
    assert len(list(m.parameters())) == len(trunk_params) + sum(len(list(t.parameters())) for t in m.tasks.values())
    assert m.tasks["rotnet"].backbone(torch.randn(2, 3, 8, 8)).shape == (2, 16)
    before = m.backbone.calls
    m(_views(0))
    assert m.backbone.calls - before == 2  # one trunk pass per task (rotations batched, the 9B tiles batched)


def test_state_round_trips():
    m = _multi(schedule="interleave")
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.1, weight_decay=0.0), m)
    for step in range(3):
        assert math.isfinite(_step(m, opt, step, _views(step)).loss)
    fresh = _multi(schedule="interleave")
    fresh.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert fresh._next_task() == m._next_task() == 1  # the fourth batch: the jigsaw's turn, after a resume too


def test_interleave_trains_one_head_per_batch_and_leaves_the_others_alone():
    m = _multi(schedule="interleave")
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3), m)
    turns = []
    for step in range(4):
        heads = {n: [p.detach().clone() for p in t.parameters()] for n, t in m.tasks.items()}
        trunk = [p.detach().clone() for p in m.backbone.parameters()]
        result = _step(m, opt, step, _views(step))
        ran = [n for n in m.tasks if f"{n}_loss" in result.stats]
        turns.append(ran)
        for name, task in m.tasks.items():
            moved = any(not torch.equal(a, b) for a, b in zip(heads[name], task.parameters()))
            assert moved == (name in ran), (step, name)  # momentum and weight decay too: idle heads stay put
        assert any(not torch.equal(a, b) for a, b in zip(trunk, m.backbone.parameters()))
    assert turns == [["rotnet"], ["jigsaw"], ["rotnet"], ["jigsaw"]] and int(m.batches) == 4


def test_lightness_reaches_the_rgb_trunk_as_the_gray_image_of_the_same_lightness():
    v = torch.linspace(0.0, 1.0, 7 * 5).view(1, 1, 7, 5)
    gray = v.expand(2, 3, 7, 5)  # sRGB gray values (every channel equal)
    light = lightness_input(srgb_to_lab(gray))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(gray_from_lightness(light, IMAGENET_MEAN, IMAGENET_STD), (gray - mean) / std,
                               atol=2e-5, rtol=1e-5)
    net = TinyNet().eval()
    trunk = SharedTrunk(net, IMAGENET_MEAN, IMAGENET_STD).set_in_channels(1)
    assert trunk.in_channels == 1 and net.conv.in_channels == 3  # the shared trunk stays RGB
    torch.testing.assert_close(trunk(light), net((gray - mean) / std), atol=1e-5, rtol=1e-5)


def test_bad_configs_fail_naming_the_fix():
    with pytest.raises(ValueError, match="not a pretext task"):
        MultiTask.Config(tasks=("rotnet", "simclr"))
    with pytest.raises(ValueError, match="each once"):
        MultiTask.Config(tasks=("rotnet", "rotnet"))
    with pytest.raises(ValueError, match="one value >= 0 per task"):
        MultiTask.Config(tasks=("rotnet", "jigsaw"), weights=(1.0,))
    with pytest.raises(ValueError, match="settings for tasks not in method.tasks"):
        MultiTask.Config(tasks=("rotnet",), settings={"jigsaw": {}})
    with pytest.raises(ValueError, match="method.settings.jigsaw.num_permutation"):
        MultiTask.Config(tasks=("jigsaw",), settings={"jigsaw": {"num_permutation": 10}})
    with pytest.raises(ValueError, match=r"task jigsaw takes views \[2\]"):
        MultiTask.check_views(MultiTask.Config(tasks=("rotnet", "jigsaw"), views=((0,), (2,))), [24, 60])
    with pytest.raises(ValueError, match="jigsaw: a 3 px view"):  # the task's own check, on its views
        MultiTask.check_views(MultiTask.Config(tasks=("rotnet", "jigsaw"), views=((0,), (1,))), [24, 3])


def test_overrides_reach_the_tasks():
    cfg = config.apply_overrides(recipes.get("tiny_rotnet"), [
        "method.name=multitask", "method.tasks=[rotnet, jigsaw]", "method.views=[[0], [0]]",
        "method.settings={jigsaw: {num_permutations: 10, gap: 0.3}}"])
    assert cfg.method.settings == {"jigsaw": {"num_permutations": 10, "gap": 0.3}}
    m = MultiTask(cfg.method, TinyNet())
    assert m.tasks["jigsaw"].cfg.num_permutations == 10 and m.tasks["jigsaw"].permutations.shape == (10, 9)
    with pytest.raises(ConfigError, match="leave out 'name'"):
        config.apply_overrides(cfg, ["method.settings={rotnet: {name: jigsaw}}"])
    assert isinstance(m.tasks["rotnet"].backbone, SharedTrunk) and not isinstance(m.backbone, SharedTrunk)
    assert isinstance(m.backbone, nn.Module)


def test_colorization_trains_on_the_shared_rgb_trunk():
    from seerlike import models

    torch.manual_seed(0)
    trunk = models.build("resnet10_cifar")
    m = MultiTask(MultiTask.Config(tasks=("rotnet", "colorization"), views=((0,), (0,))), trunk)
    assert trunk.in_channels == 3 and trunk.get_submodule(trunk.stem_conv_name).in_channels == 3
    assert m.tasks["colorization"].backbone.in_channels == 1  # what the task asked for, rendered as gray RGB
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.1, weight_decay=0.0), m)
    result = _step(m, opt, 0, [torch.rand(4, 3, 16, 16) * 2 - 1])
    assert math.isfinite(result.loss) and {"rotnet_acc", "colorization_acc"} <= set(result.stats)
    assert m.tasks["colorization"].ab_counts.sum() > 0
    assert "tasks.colorization.ab_counts" in m.state_dict() and m.state_dict()["backbone.conv1.weight"].shape[1] == 3
    light = torch.rand(2, 1, 16, 16) - 0.5
    want = trunk.forward_features(gray_from_lightness(light, IMAGENET_MEAN, IMAGENET_STD), until="res5")["res5"]
    got = m.tasks["colorization"].backbone.forward_features(light, until="res5")["res5"]
    torch.testing.assert_close(got, want)
