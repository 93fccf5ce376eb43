"""Semi-supervised stages on 2 real gloo ranks == 1 process: pseudo-labelling, and a FixMatch / Noisy Student step."""

from __future__ import annotations

import copy

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from seerlike import models
from seerlike.engine.parallelize import ParallelConfig, parallelize
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods.fixmatch import FixMatch
from seerlike.methods.noisy_student import NoisyStudent
from seerlike.semisup.labeling import label_unlabeled
from seerlike.testing import micro_batch, run_on_ranks
from tests.unit.test_pseudo_labeling import SETTINGS, _teacher, _unlabeled

pytestmark = pytest.mark.dist
torch.set_num_threads(1)

B, U, K = 4, 8, 5


def _everything(rank: int, world: int, teacher: str, unlabeled: str, out: str) -> dict:
    # one spawn for every check: starting ranks costs far more than the checks
    summary = label_unlabeled(teacher, unlabeled, out, SETTINGS, rank=rank, world_size=world, barrier=dist.barrier,
                              progress=False)
    return {"summary": summary, "fixmatch": _step(rank, world, "fixmatch"),
            "noisy_student": _step(rank, world, "noisy_student")}


def _batch(name: str):
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(B, 3, 16, 16, generator=g), torch.randn(U, 3, 16, 16, generator=g)]
    if name == "fixmatch":
        return views + [torch.randn(U, 3, 16, 16, generator=g)], torch.randint(0, K, (B,), generator=g)
    soft = torch.softmax(3 * torch.randn(U, K, generator=g), 1) * torch.rand(U, 1, generator=g) * 2
    return views, torch.cat([torch.nn.functional.one_hot(torch.randint(0, K, (B,), generator=g), K).float(), soft])


def _method(name: str):
    torch.manual_seed(0)
    if name == "fixmatch":
        # at 0.9, 2 of rank 0's 4 weak views pass and all 4 of rank 1's: per-rank normalisation would show
        m = FixMatch(FixMatch.Config(num_classes=K, threshold=0.9, ema_decay=0.9), models.build("resnet10_cifar"))
    else:
        m = NoisyStudent(NoisyStudent.Config(num_classes=K, dropout=0.0), models.build("resnet10_cifar"))
    with torch.no_grad():
        m.head.weight.normal_(std=3.0)  # FixMatch: some weak views pass the threshold, some do not
    return m.eval()  # BatchNorm on running statistics: per-row, so the batch split does not change it


def _step(rank: int, world: int, name: str) -> dict:
    """One engine step on this rank's share of the batch (DDP averages the gradients); returns the state."""
    method = _method(name)
    model = parallelize(method, ParallelConfig(strategy="ddp"))
    opt = torch.optim.SGD(method.parameters(), lr=0.5)
    views, labels = _batch(name)
    labeled_rows, unlabeled_rows = B // world, U // world

    def share(t, n):
        return t[rank * n:(rank + 1) * n]

    mine = [share(views[0], labeled_rows)] + [share(v, unlabeled_rows) for v in views[1:]]
    if name == "fixmatch":
        mine_labels = share(labels, labeled_rows)
    else:
        mine_labels = torch.cat([share(labels[:B], labeled_rows), share(labels[B:], unlabeled_rows)])
    result = train_step(model, method, opt, None, [micro_batch(mine, mine_labels)], step=0, max_steps=1,
                        precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu"))
    return {"loss": result.loss, "state": {k: v.clone() for k, v in method.state_dict().items()},
            "mask": float(result.stats.get("mask", -1))}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cifar_dir):
    tmp = tmp_path_factory.mktemp("semisup")
    teacher, unlabeled = str(_teacher(tmp)), str(_unlabeled(cifar_dir, tmp))
    one = tmp / "one" / "labels.parquet"
    label_unlabeled(teacher, unlabeled, one, SETTINGS, progress=False)
    two = tmp / "two" / "labels.parquet"
    ranks = run_on_ranks(_everything, 2, teacher, unlabeled, str(two))
    return one, two, ranks


def test_two_ranks_write_the_pseudo_labels_of_one(setup):
    one, two, ranks = setup
    assert ranks[1]["summary"] is None and ranks[0]["summary"]["predicted"] == 40
    assert pq.read_table(two).equals(pq.read_table(one))
    assert two.read_bytes() == one.read_bytes()


@pytest.mark.parametrize("name", ["fixmatch", "noisy_student"])
def test_a_two_rank_step_equals_one_process_on_the_whole_batch(setup, name):
    _, _, ranks = setup
    method = _method(name)
    before = copy.deepcopy(method.state_dict())
    views, labels = _batch(name)
    opt = torch.optim.SGD(method.parameters(), lr=0.5)
    result = train_step(method, method, opt, None, [micro_batch(views, labels)], step=0, max_steps=1,
                        precision=PrecisionConfig(dtype="fp32"), device=torch.device("cpu"))
    assert ranks[0][name]["loss"] == pytest.approx(result.loss, rel=1e-5)
    for key, value in method.state_dict().items():
        for r in ranks:
            torch.testing.assert_close(r[name]["state"][key], value, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, key=key: f"{key}: {m}")
    assert not torch.equal(method.state_dict()["head.weight"], before["head.weight"])  # the step did something
    if name == "fixmatch":  # the ranks saw different shares of confident views; the EMA followed the update
        assert [r[name]["mask"] for r in ranks] == [0.5, 1.0]
        assert not torch.equal(method.state_dict()["ema.head.weight"], before["ema.head.weight"])
