"""DeepCluster-v2: spherical k-means (a toy set with a known answer, one step by hand), the
initial centroids, the loss written out, the pass memory and its clustering, state, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seerlike.engine.optim import OptimConfig, build_optimizer
from seerlike.engine.precision import PrecisionConfig
from seerlike.engine.step import train_step
from seerlike.methods.deepcluster_v2 import IGNORE, DeepClusterV2, initial_centroids, spherical_kmeans
from seerlike.methods.pass_memory import scatter_latest
from seerlike.testing import micro_batch

torch.set_num_threads(1)


class Flat(nn.Module):
    """A linear trunk on flattened 2 x 2 images (no BatchNorm: exact formulas)."""

    out_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 6)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _method(n: int = 16, **kw) -> DeepClusterV2:
    torch.manual_seed(0)
    base = dict(head_dims=(), num_prototypes=(4, 3), temperature=0.1, crops_for_assign=(0, 1), kmeans_iters=5)
    return DeepClusterV2(DeepClusterV2.Config(**{**base, **kw}), Flat(), num_samples=n)


def _views(step: int, bs: int = 4, n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(bs, 3, 2, 2, generator=g) for _ in range(n)]


# ------------------------------------------------------------------ k-means


def test_kmeans_finds_three_separated_directions():
    g = torch.Generator().manual_seed(0)
    axes = torch.eye(3)
    truth = torch.arange(30) % 3
    x = F.normalize(axes[truth] + 0.1 * torch.randn(30, 3, generator=g), dim=1)
    start = x[[0, 3, 1]]  # two starts in group 0, one in group 1: k-means must move one to group 2
    start = F.normalize(start + torch.tensor([[0.0, 0.0, 0.8], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), dim=1)
    centroids, assign = spherical_kmeans(x, start, iters=10)
    means = torch.stack([F.normalize(x[truth == j].mean(0), dim=0) for j in range(3)])
    # the answer, whatever order the centroids ended in
    order = [int((means @ c).argmax()) for c in centroids]
    assert sorted(order) == [0, 1, 2]
    torch.testing.assert_close(centroids, means[order], atol=1e-6, rtol=0)
    assert torch.equal(torch.tensor(order)[assign], truth)


def test_one_kmeans_step_by_hand_and_an_empty_cluster_stays():
    x = F.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.2], [0.1, 1.0], [-0.3, 1.0], [0.9, 0.5]]), dim=1)
    start = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]), dim=1)  # the third wins no point
    centroids, assign = spherical_kmeans(x, start, iters=1)
    # by hand: every point to its largest dot product, then the normalised mean of each group
    groups = [[i for i in range(5) if max(range(3), key=lambda j: float(x[i] @ start[j])) == j] for j in range(3)]
    assert groups == [[0, 1, 4], [2, 3], []]
    expected = torch.stack([F.normalize(sum(x[i] for i in g) / len(g), dim=0) for g in groups[:2]] + [start[2]])
    torch.testing.assert_close(centroids, expected, atol=1e-7, rtol=0)
    # the returned assignments are to the final centroids
    assert assign.tolist() == [max(range(3), key=lambda j: float(x[i] @ expected[j])) for i in range(5)]


def test_initial_centroids_follow_a_seeded_order_of_the_sample_indices():
    index = torch.tensor([5, 2, 9, 7, 2, 0])
    stamp = torch.tensor([0, 1, 2, 3, 9, 5])  # sample 2 twice: the row stamped 9 is the newer
    x = torch.arange(6.0).unsqueeze(1).repeat(1, 3)
    got = initial_centroids(index, stamp, x, k=3, num_samples=10, seed=4)
    rank_of = torch.randperm(10, generator=torch.Generator().manual_seed(4))
    firsts = sorted(set(index.tolist()), key=lambda i: int(rank_of[i]))[:3]
    row_of = {5: 0, 2: 4, 9: 2, 7: 3, 0: 5}
    torch.testing.assert_close(got, x[[row_of[i] for i in firsts]])


def test_scatter_latest_keeps_the_newest_row_of_a_sample():
    target = torch.full((5,), -7)
    scatter_latest(target, torch.tensor([1, 3, 1, -1, 4]), torch.tensor([8, 1, 2, 99, 0]), torch.tensor([10, 30, 11, 99, 40]))
    assert target.tolist() == [-7, 10, -7, 30, 40]


# ------------------------------------------------------------------ loss


def test_loss_is_the_cross_entropy_of_every_view_against_its_samples_cluster():
    m = _method()
    with torch.no_grad():
        m.prototypes0.copy_(F.normalize(torch.randn(4, 6), dim=1))
        m.prototypes1.copy_(F.normalize(torch.randn(3, 6), dim=1))
        m.assignments[0] = torch.arange(16) % 4
        m.assignments[1] = torch.arange(16) % 3
        m.assignments[:, 9] = IGNORE  # sample 9 was not clustered: left out of the mean
    views, idx = _views(0, bs=4, n=3), torch.tensor([3, 9, 14, 0])
    loss, stats = m(views, indices=idx)
    total, count = 0.0, 0
    for h, protos in enumerate((m.prototypes0, m.prototypes1)):
        head_sum = 0.0
        for v in views:
            z = F.normalize(m.backbone(v), dim=1).detach()
            for i, s in enumerate(idx.tolist()):
                t = int(m.assignments[h, s])
                if t == IGNORE:
                    continue
                logits = [float(z[i] @ protos[j]) / 0.1 for j in range(protos.shape[0])]
                head_sum += -(logits[t] - math.log(sum(math.exp(l) for l in logits)))
                count += h == 0
        total += head_sum
    assert count == 9  # 3 views x 3 clustered samples
    assert float(loss.detach()) == pytest.approx(total / count / 2, rel=1e-5)
    assert float(stats["assigned"]) == pytest.approx(9 / 12)


def test_the_first_pass_fills_the_memory_with_zero_loss_then_every_sample_is_clustered():
    m = _method(n=16)  # batch 4: a pass is 4 calls
    for step in range(4):
        idx = torch.arange(4 * step, 4 * step + 4)
        loss, stats = m(_views(step), indices=idx)
        assert float(loss.detach()) == 0.0 and float(stats["assigned"]) == 0.0 and int(m.clusterings) == 0
        loss.backward()
        assert all(p.grad is None or not p.grad.any() for p in m.parameters())
    assert sorted(m.memory.index.tolist()) == list(range(16))
    memory = m.memory.emb[:, torch.argsort(m.memory.index)].clone()  # (views, sample, dim)
    loss, stats = m(_views(4), indices=torch.tensor([5, 1, 12, 8]))  # the 5th call clusters first
    assert int(m.clusterings) == 1 and float(stats["assigned"]) == 1.0 and float(loss.detach()) > 0
    for h, k in enumerate((4, 3)):
        protos = m.prototypes(h)
        torch.testing.assert_close(protos.norm(dim=1), torch.ones(k))
        # head h clustered view h mod 2 of the memory: every sample's cluster is its nearest centroid
        assert m.assignments[h].tolist() == (memory[h % 2] @ protos.t()).argmax(1).tolist()
        assert m.assignments[h].tolist() != (memory[1 - h % 2] @ protos.t()).argmax(1).tolist()
        assert len(set(m.assignments[h].tolist())) > 1
    # the memory is a ring of one pass: the 5th call overwrote the rows of the 1st
    assert m.memory.index[:4].tolist() == [5, 1, 12, 8] and int(m.memory.calls) == 5


def test_bad_settings_and_inputs_fail_naming_the_fix():
    with pytest.raises(ValueError, match="fewer than the 4 clusters of method.num_prototypes"):
        _method(n=3)
    with pytest.raises(ValueError, match="crops_for_assign=\\[0, 2\\] names view 2"):
        DeepClusterV2.check_views(DeepClusterV2.Config(crops_for_assign=(0, 2)), [24, 24])
    with pytest.raises(ValueError, match="needs the batch's sample indices"):
        _method()(_views(0))
    with pytest.raises(ValueError, match=r"sample indices must lie in \[0, 16\), got 0..99; the data source changed"):
        _method()(_views(0), indices=torch.tensor([0, 1, 2, 99]))


# ------------------------------------------------------------------ state and training


def test_state_survives_state_dict_and_the_memory_is_per_rank_state():
    m = _method()
    for step in range(6):
        m(_views(step), indices=torch.arange(4 * (step % 4), 4 * (step % 4) + 4))
    state = m.state_dict()
    assert {"prototypes0", "prototypes1", "assignments", "clusterings"} <= set(state)
    assert not any(k.startswith("memory.") for k in state)  # per rank: in each rank's checkpoint file
    assert {n for n, _ in m.named_buffers()} >= {"memory.emb", "memory.index", "memory.stamp", "memory.calls"}
    fresh = _method()
    fresh.load_state_dict(state)
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert int(fresh.clusterings) == 1 and (fresh.assignments != IGNORE).all()


def test_a_few_train_steps_are_finite_and_move_the_projection():
    torch.manual_seed(0)
    m = DeepClusterV2(DeepClusterV2.Config(head_dims=(16, 8), num_prototypes=(4, 4, 4), kmeans_iters=3),
                      Flat(), num_samples=16)
    before = m.projection[-1].weight.detach().clone()
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.5, weight_decay=0.0), m)
    losses = []
    for step in range(7):
        batch = micro_batch(_views(step), indices=torch.arange(4 * (step % 4), 4 * (step % 4) + 4))
        r = train_step(m, m, opt, None, [batch], step=step, max_steps=7, precision=PrecisionConfig(dtype="fp32"),
                       device=torch.device("cpu"))
        losses.append(r.loss)
    assert losses[:4] == [0.0] * 4 and all(0 < l < 10 for l in losses[4:])
    assert not torch.equal(before, m.projection[-1].weight)
