"""DINO on 2 real gloo ranks == 1 process on the concatenated batch: loss, gradients, centre, training state."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.parallelize import ParallelConfig, parallelize
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods.dino import DINO
from seerlike.testing import micro_batch, run_on_ranks

pytestmark = pytest.mark.dist
torch.set_num_threads(1)

BATCH, STEPS = 4, 4  # global batch 4: 2 per rank
SIZES = [4, 4, 2, 2]  # two global views, two local ones


class _PoolNet(nn.Module):
    """A BN-free trunk, so per-rank batches give exactly the global batch's gradients."""

    out_dim = 5

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x):
        return self.conv(x).relu().mean((2, 3))


def _dino() -> DINO:
    torch.manual_seed(0)
    # clip 0.5 caps every gradient here; the last layer unfreezes at step 2; the temperature warms up
    cfg = DINO.Config(out_dim=9, hidden_dim=8, bottleneck_dim=4, momentum_teacher=0.9, center_momentum=0.7,
                      warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_steps=3,
                      freeze_last_layer_steps=2, clip_grad=0.5)
    return DINO(cfg, _PoolNet())


def _views(step: int, world: int, rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.randn(BATCH, 3, s, s, generator=g).chunk(world)[rank] for s in SIZES]


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _one_backward(rank: int, world: int) -> dict:
    """Loss, the data-parallel (averaged) gradients and the centre after one forward / backward."""
    m = _dino()
    with torch.no_grad():  # a teacher unlike the student and a non-zero centre
        for p in m.teacher.parameters():
            p.mul_(1.5)
        m.center.fill_(0.2)
    loss, _ = m(_views(0, world, rank))
    loss.backward()
    grads = {}
    for name, p in m.named_parameters():
        if p.grad is not None:
            if world > 1:
                dist.all_reduce(p.grad)
                p.grad /= world
            grads[name] = p.grad.clone()
    mean_loss = loss.detach().clone()
    if world > 1:
        dist.all_reduce(mean_loss)
        mean_loss /= world
    return {"loss": mean_loss, "grads": grads, "center": m.center.clone()}


def _train(rank: int, world: int, strategy: str) -> dict:
    """STEPS optimizer steps through train_step, as the training loop runs them."""
    m = _dino()
    model = parallelize(m, ParallelConfig(strategy=strategy if world > 1 else "none"))
    opt = build_optimizer(OptimConfig(name="sgd", lr=25.6, weight_decay=1e-3), m)
    v0 = _full(m.head.last_layer.weight_v)
    losses, last_layer = [], []
    for step in range(STEPS):
        r = train_step(model, m, opt, None, [micro_batch(_views(step, world, rank))], step=step, max_steps=STEPS,
                       precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu"))
        losses.append(r.loss)
        last_layer.append(bool((_full(m.head.last_layer.weight_v) != v0).any()))
    return {"losses": losses, "moved": last_layer, "state": {k: _full(v) for k, v in m.state_dict().items()}}


def _everything(rank: int, world: int) -> dict:
    # one spawn for all checks: starting ranks costs far more than the checks
    return {"backward": _one_backward(rank, world), "ddp": _train(rank, world, "ddp"),
            "fsdp": _train(rank, world, "fsdp")}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_on_ranks(_everything, 2)


def test_loss_gradients_and_centre_equal_one_process(two_ranks):
    ref = _one_backward(0, 1)
    assert len(ref["grads"]) == len(list(_dino().backbone.parameters())) + len(list(_dino().head.parameters()))
    for r in two_ranks:
        got = r["backward"]
        torch.testing.assert_close(got["loss"], ref["loss"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got["center"], ref["center"], atol=1e-7, rtol=1e-6)
        assert got["grads"].keys() == ref["grads"].keys()
        for k, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][k], g, atol=1e-6, rtol=1e-5, msg=k)
    assert torch.equal(two_ranks[0]["backward"]["center"], two_ranks[1]["backward"]["center"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_training_state_equals_one_process(two_ranks, strategy):
    """4 steps: clip, frozen last layer (2 steps), EMA teacher, centre and temperature clock, under DDP and FSDP2."""
    ref = _train(0, 1, "none")
    assert ref["moved"] == [False, False, True, True]
    assert int(ref["state"]["step"]) == STEPS
    for r in (x[strategy] for x in two_ranks):
        assert r["moved"] == ref["moved"]
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
        assert r["state"].keys() == ref["state"].keys()
        for k, v in ref["state"].items():
            torch.testing.assert_close(r["state"][k], v, atol=1e-5, rtol=1e-5, msg=k)
    a, b = (x[strategy]["state"] for x in two_ranks)
    assert all(torch.equal(a[k], b[k]) for k in a)  # identical on both ranks (centre included)
