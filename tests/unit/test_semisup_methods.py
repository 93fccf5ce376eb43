"""Fine-tuning, FixMatch and the Noisy Student student: their losses against the formulas, the EMA, LR multipliers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from seerlike import models
from seerlike.config import ConfigError
from seerlike.engine.optim import OptimConfig, param_groups
from seerlike.methods.classifier import Finetune, lr_multipliers, update_ema
from seerlike.methods.fixmatch import FixMatch, unlabeled_loss
from seerlike.methods.noisy_student import NoisyStudent

ARCH = "resnet10_cifar"

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(n=8, seed=0, size=16):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- FixMatch


def test_fixmatch_masked_loss_equals_the_formula_on_fixed_tensors():
    weak = torch.tensor([[4.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 0.0, 6.0], [1.0, 3.0, 1.0]], requires_grad=True)
    strong = torch.tensor([[0.5, 1.0, -1.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 2.0]], requires_grad=True)
    tau = 0.85
    loss, mask = unlabeled_loss(weak, strong, tau)
    # by hand: rows 0 (p = 0.964) and 2 (p = 0.995) pass the threshold, rows 1 (0.37) and 3 (0.79) do not
    expected, rows = 0.0, []
    for w, s in zip(weak.tolist(), strong.tolist()):
        p = [math.exp(v) / sum(math.exp(u) for u in w) for v in w]
        if max(p) >= tau:
            target = p.index(max(p))
            expected += -(s[target] - math.log(sum(math.exp(u) for u in s)))
            rows.append(True)
        else:
            rows.append(False)
    assert rows == [True, False, True, False]
    assert mask.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert float(loss.detach()) == pytest.approx(expected / 4, rel=1e-6)  # the mean runs over all 4 rows
    loss.backward()
    assert weak.grad is None or torch.all(weak.grad == 0)  # the pseudo-label is a constant target
    want = (F.softmax(strong.detach(), 1) - F.one_hot(torch.tensor([0, 0, 2, 0]), 3)) * mask[:, None] / 4
    torch.testing.assert_close(strong.grad, want)


def test_fixmatch_loss_is_labeled_ce_plus_lambda_times_the_unlabeled_term():
    torch.manual_seed(0)
    cfg = FixMatch.Config(num_classes=4, threshold=0.9, lambda_u=2.5, ema_decay=0.0)
    m = FixMatch(cfg, models.build(ARCH)).eval()  # eval: BatchNorm per row, so one forward == three
    with torch.no_grad():
        m.head.weight.normal_(std=3.0)  # confident on some rows, not on others
    x, uw, us = _x(4, 1), _x(12, 2), _x(12, 3)
    y = torch.tensor([0, 1, 2, 3])
    loss, stats = m([x, uw, us], y)
    with torch.no_grad():
        lx, lw, ls = (m.logits([v]) for v in (x, uw, us))
    lu, mask = unlabeled_loss(lw, ls, 0.9)
    torch.testing.assert_close(loss, F.cross_entropy(lx, y) + 2.5 * lu)
    torch.testing.assert_close(stats["mask"], mask.mean())
    assert 0 < float(stats["mask"]) < 1  # the test covers both kinds of rows
    with pytest.raises(ValueError, match="selftrain --method fixmatch"):
        m([x], y)


# ---------------------------------------------------------------- the EMA


def test_ema_model_is_the_moving_average_by_hand():
    torch.manual_seed(0)
    d = 0.9
    m = Finetune(Finetune.Config(num_classes=3, ema_decay=d), models.build(ARCH))
    online = lambda: {**{f"backbone.{k}": v.detach().clone() for k, v in m.backbone.state_dict().items()},  # noqa: E731
                      **{f"head.{k}": v.detach().clone() for k, v in m.head.state_dict().items()}}
    expected = online()  # the average starts at the initial model
    assert all(torch.equal(v, m.ema.state_dict()[k]) for k, v in expected.items())
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m.train()
    for step in range(3):
        loss, _ = m([_x(6, step)], torch.tensor([0, 1, 2, 0, 1, 2]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.on_step_end(step, 3)
        now = online()
        for k, v in now.items():
            expected[k] = v.clone() if not v.is_floating_point() else d * expected[k] + (1 - d) * v
    state = m.ema.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v, rtol=1e-6, atol=1e-7, msg=k)
    # parameters and BatchNorm statistics both moved, and the average is not the online model
    assert not torch.equal(state["backbone.bn1.running_mean"], m.backbone.bn1.running_mean)
    assert not torch.equal(state["head.weight"], m.head.weight)
    assert int(state["backbone.bn1.num_batches_tracked"]) == 3


def test_update_ema_leaves_the_online_model_alone():
    torch.manual_seed(0)
    m = Finetune(Finetune.Config(num_classes=3, ema_decay=0.5), models.build(ARCH))
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    update_ema(m.ema, [m.backbone, m.head], 0.5)
    w = m.ema.backbone.conv1.weight
    torch.testing.assert_close(w, before["conv1.weight"] + 0.5)
    torch.testing.assert_close(m.backbone.conv1.weight, before["conv1.weight"] + 1.0)


# ---------------------------------------------------------------- Noisy Student and fine-tuning


def test_noisy_student_loss_weights_smoothing_and_ratio():
    torch.manual_seed(0)
    K, b, u = 4, 3, 6
    for soft in (True, False):
        cfg = NoisyStudent.Config(num_classes=K, soft=soft, label_smoothing=0.2, dropout=0.0)
        m = NoisyStudent(cfg, models.build(ARCH)).eval()
        xl, xu = _x(b, 4), _x(u, 5)
        onehot = F.one_hot(torch.tensor([0, 3, 1]), K).float()
        probs = F.softmax(torch.randn(u, K), 1) if soft else F.one_hot(torch.randint(0, K, (u,)), K).float()
        w = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.5, 0.0])
        loss, stats = m([xl, xu], torch.cat([onehot, probs * w[:, None]]))
        with torch.no_grad():
            ll, lu = m.logits([xl]), m.logits([xu])

        def ce(logits, target, eps):
            t = (1 - eps) * target + eps / K
            return -(t * F.log_softmax(logits, 1)).sum(1)

        eps_u = 0.0 if soft else 0.2
        want = ce(ll, onehot, 0.2).mean() + (u / b) * (w * ce(lu, probs, eps_u)).mean()
        torch.testing.assert_close(loss, want)
    with pytest.raises(ValueError, match="another number of classes"):
        m([xl, xu], torch.zeros(b + u, K + 1))


def _noisy_chain(teacher: str, students: list[str], *extra: str):
    from seerlike import config as configlib
    from seerlike import recipes

    return configlib.apply_overrides(recipes.get("noisy_student_tiny"), [
        f"method.teacher={teacher}", f"method.iterations={len(students)}", f"method.students=[{', '.join(students)}]",
        *extra])


def test_noisy_student_students_are_at_least_as_large_as_their_teachers(tmp_path):
    from seerlike.semisup import stages

    sizes = {a: sum(p.numel() for p in models.build(a).parameters())
             for a in ("resnet10_cifar_w16", "resnet10_cifar", "resnet18_cifar")}
    assert sizes["resnet10_cifar_w16"] < sizes["resnet10_cifar"] < sizes["resnet18_cifar"]
    assert {a: stages.trunk_parameters(a) for a in sizes} == sizes
    stages.check_students_grow(_noisy_chain("random:resnet10_cifar", ["resnet10_cifar", "resnet18_cifar"]))
    # iteration 2's teacher is iteration 1's student, not the first teacher
    shrinking = _noisy_chain("random:resnet10_cifar", ["resnet18_cifar", "resnet10_cifar"])
    with pytest.raises(ConfigError) as err:
        stages.check_students_grow(shrinking)
    msg = str(err.value)
    assert (f"iteration 2: the student resnet10_cifar ({sizes['resnet10_cifar']:,} parameters) is smaller than its "
            f"teacher resnet18_cifar ({sizes['resnet18_cifar']:,} parameters; iteration 1's student)") in msg
    assert "method.allow_smaller_student=true" in msg
    with pytest.raises(ConfigError, match=r"iteration 1: the student resnet10_cifar_w16 .* teacher resnet10_cifar "
                                          r"\(.* the teacher random:resnet10_cifar\)"):
        stages.check_students_grow(_noisy_chain("random:resnet10_cifar", ["resnet10_cifar_w16"]))
    stages.check_students_grow(_noisy_chain("random:resnet10_cifar", ["resnet18_cifar", "resnet10_cifar"],
                                            "method.allow_smaller_student=true"))
    # the run refuses before its teacher labels anything
    with pytest.raises(ConfigError, match="is smaller than its teacher"):
        stages.run(shrinking, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_finetune_is_smoothed_cross_entropy_over_views_and_starts_from_init(tmp_path):
    from seerlike.data.augment import AugmentConfig, ViewConfig
    from seerlike.data.pipeline import DataConfig
    from seerlike.engine.config import ModelConfig, TrainConfig
    from tests.unit.test_export import write_checkpoint

    torch.manual_seed(0)
    cfg = TrainConfig(model=ModelConfig(name=ARCH), method=Finetune.Config(num_classes=3),
                      data=DataConfig(augment=AugmentConfig(views=[ViewConfig(size=16)])))
    pretrained = Finetune(cfg.method, models.build(ARCH))
    with torch.no_grad():
        pretrained.backbone.bn1.running_mean.uniform_(-1, 1)
    write_checkpoint(tmp_path / "run", pretrained, cfg, step=5)
    torch.manual_seed(1)
    m = Finetune(Finetune.Config(num_classes=5, init=str(tmp_path / "run"), label_smoothing=0.1), models.build(ARCH))
    for k, v in pretrained.backbone.state_dict().items():
        assert torch.equal(m.backbone.state_dict()[k], v), k
    m.eval()
    x, y = _x(4), torch.tensor([0, 4, 2, 1])
    loss, stats = m([x, x.flip(3)], y)
    with torch.no_grad():
        logits = torch.cat([m.logits([x]), m.logits([x.flip(3)])])
    torch.testing.assert_close(loss, F.cross_entropy(logits, y.repeat(2), label_smoothing=0.1))
    with pytest.raises(ValueError, match="outside"):
        Finetune(Finetune.Config(num_classes=3), models.build(ARCH))([x], torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ConfigError, match="does not fit"):
        Finetune(Finetune.Config(num_classes=3, init=str(tmp_path / "run")), models.build("resnet10_cifar_w16"))


def test_init_head_starts_the_head_and_its_average_from_a_fine_tuned_run(tmp_path):
    from seerlike.data.augment import AugmentConfig, ViewConfig
    from seerlike.data.pipeline import DataConfig
    from seerlike.engine.config import ModelConfig, TrainConfig
    from seerlike.exporter import export
    from seerlike.methods.fixmatch import strong_view
    from tests.unit.test_export import write_checkpoint

    classes = ["cat", "dog", "owl"]
    torch.manual_seed(0)
    cfg = TrainConfig(model=ModelConfig(name=ARCH), method=Finetune.Config(num_classes=3, classes=classes),
                      data=DataConfig(augment=AugmentConfig(views=[ViewConfig(size=16)])))
    tuned = Finetune(cfg.method, models.build(ARCH))
    with torch.no_grad():
        tuned.head.weight.uniform_(-1, 1)
        tuned.head.bias.uniform_(-1, 1)
    write_checkpoint(tmp_path / "tuned", tuned, cfg, step=7)
    fix = FixMatch.Config(num_classes=3, classes=classes, init=str(tmp_path / "tuned"), init_head=True,
                          strong=strong_view(16), ema_decay=0.9)
    m = FixMatch(fix, models.build(ARCH))
    assert torch.equal(m.head.weight, tuned.head.weight) and torch.equal(m.head.bias, tuned.head.bias)
    assert torch.equal(m.ema.head.weight, tuned.head.weight)  # the average starts from the loaded model
    without = FixMatch(dataclasses.replace(fix, init_head=False), models.build(ARCH))
    assert not torch.equal(without.head.weight, tuned.head.weight)
    with pytest.raises(ConfigError, match="wrong classes"):
        FixMatch(dataclasses.replace(fix, classes=["cat", "owl", "dog"]), models.build(ARCH))
    with pytest.raises(ConfigError, match="shape"):
        FixMatch(dataclasses.replace(fix, num_classes=4, classes=[]), models.build(ARCH))
    export(str(tmp_path / "tuned"), tmp_path / "trunk_only", ["safetensors"])  # without --with-head
    with pytest.raises(ConfigError, match="no classifier head"):
        FixMatch(dataclasses.replace(fix, init=str(tmp_path / "trunk_only")), models.build(ARCH))
    with pytest.raises(ValueError, match="init_head needs method.init"):
        FixMatch.Config(num_classes=3, init="random:" + ARCH, init_head=True)


def test_backbone_lr_and_layer_decay_become_optimizer_multipliers():
    m = Finetune(Finetune.Config(num_classes=3), models.build(ARCH))
    mult = lr_multipliers(m.backbone, backbone_lr=0.5, layer_decay=0.5)
    assert mult == {"backbone": 0.5 * 0.5 ** 4, "backbone.layer4.0": 0.5, "backbone.layer3.0": 0.25,
                    "backbone.layer2.0": 0.125, "backbone.layer1.0": 0.0625}
    groups = param_groups(OptimConfig(name="sgd", lr_multipliers=mult), m)
    by_param = {id(p): g["lr_mult"] for g in groups for p in g["params"]}
    assert by_param[id(m.backbone.conv1.weight)] == 0.5 ** 5
    assert by_param[id(m.backbone.layer1[0].conv1.weight)] == 0.0625
    assert by_param[id(m.backbone.layer4[0].bn2.weight)] == 0.5
    assert by_param[id(m.head.weight)] == by_param[id(m.head.bias)] == 1.0
    assert lr_multipliers(m.backbone) == {}
    assert lr_multipliers(m.backbone, backbone_lr=0.1) == {"backbone": 0.1}
    with pytest.raises(ConfigError, match="layer decay"):
        lr_multipliers(m.backbone, layer_decay=1.5)


def test_checkpoints_of_a_method_with_an_average_load_the_average(tmp_path):
    from seerlike.checkpoints import load_backbone
    from seerlike.data.augment import AugmentConfig
    from seerlike.data.pipeline import DataConfig
    from seerlike.engine.config import ModelConfig, TrainConfig
    from seerlike.methods.fixmatch import weak_view
    from tests.unit.test_export import write_checkpoint

    torch.manual_seed(0)
    cfg = TrainConfig(model=ModelConfig(name=ARCH), method=FixMatch.Config(num_classes=3),
                      data=DataConfig(augment=AugmentConfig(views=[weak_view(16)])))
    m = FixMatch(cfg.method, models.build(ARCH))
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
        m.head.weight.add_(1.0)
    write_checkpoint(tmp_path / "run", m, cfg)
    loaded = load_backbone(tmp_path / "run")
    for k, v in m.ema.backbone.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    assert torch.equal(loaded.head.weight, m.ema.head.weight) and not torch.equal(loaded.head.weight, m.head.weight)


# ---------------------------------------------------------------- the CPU recipes


@pytest.mark.parametrize("name", ["finetune_tiny", "fixmatch_tiny", "noisy_student_tiny"])
def test_cpu_recipes_train_on_one_thread_per_process(name):
    # a second OpenMP thread cost 3-11x the CPU seconds of a step on a busy 2-core machine
    # (docs/benchmarks.md, "Step cost of the arms"); the budgeted arms run one process each
    from seerlike import recipes

    assert recipes.get(name).loop.num_threads == 1


def test_fixmatch_cpu_average_forgets_the_initial_model_within_the_recipes_steps():
    """After the CPU recipe's own number of steps, the evaluated average holds < 1% of the initial model (at the
    paper's 0.999 it would still be 37%); the ImageNet recipe keeps the paper's 0.999."""
    from seerlike import recipes
    from seerlike.methods.common import MomentumEncoder

    cfg = recipes.get("fixmatch_tiny")
    online = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(online.weight)
    ema = MomentumEncoder(head=online)
    torch.nn.init.ones_(online.weight)  # the trained model, far from the initial one
    for _ in range(cfg.loop.max_steps):
        update_ema(ema, [online], cfg.method.ema_decay)
    assert float(ema.head.weight) > 0.99
    assert cfg.method.ema_decay >= 0.98  # still an average (over >= 50 steps), not the last step's model
    assert recipes.get("fixmatch_resnet50").method.ema_decay == 0.999
