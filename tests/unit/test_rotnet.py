"""RotNet: rotation labels on a synthetic image, the loss by hand, views (the state round trip and train
steps of every pretext method: tests/unit/test_method_registry.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from seerlike.methods import METHODS
from seerlike.methods.rotnet import RotNet
from seerlike.recipes import rotnet as recipes
from tests.unit.test_swav import TinyNet, _views

torch.set_num_threads(1)


def _rotnet(seed: int = 0, **kw) -> RotNet:
    torch.manual_seed(seed)
    return RotNet(RotNet.Config(**kw), TinyNet())


def _marker(bs: int = 3, size: int = 8) -> torch.Tensor:
    """Images whose only bright pixel is the top-left one (image i has value i + 1 there)."""
    x = torch.zeros(bs, 3, size, size)
    x[:, :, 0, 0] = torch.arange(1, bs + 1, dtype=torch.float32)[:, None]
    return x


# where the top-left pixel of an 8 px image lands after k quarter turns counterclockwise
CORNER = {0: (0, 0), 1: (7, 0), 2: (7, 7), 3: (0, 7)}


def test_registered_and_the_head_is_linear_by_default():
    assert METHODS["rotnet"] is RotNet
    m = _rotnet()
    linears = [x for x in m.head if isinstance(x, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(16, 4)]
    deeper = _rotnet(head_dims=(32,))
    assert [l.out_features for l in deeper.head if isinstance(l, nn.Linear)] == [32, 4]


def test_all_rotations_labels_are_the_quarter_turns_of_each_image():
    m = _rotnet()
    images, labels = m.rotated(_marker())
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for j, k in enumerate(labels.tolist()):
        img = images[j, 0]
        r, c = CORNER[k]
        assert img[r, c] == j % 3 + 1 and img.count_nonzero() == 1, (j, k)


def test_one_random_rotation_per_image_matches_its_label():
    m = _rotnet(all_rotations=False)
    torch.manual_seed(5)
    images, labels = m.rotated(_marker(bs=16))
    torch.manual_seed(5)
    assert torch.equal(labels, torch.randint(4, (16,)))  # the global RNG, as the engine checkpoints it
    assert len(set(labels.tolist())) > 1
    for i, k in enumerate(labels.tolist()):
        r, c = CORNER[k]
        assert images[i, 0, r, c] == i + 1 and images[i, 0].count_nonzero() == 1


def test_loss_is_the_cross_entropy_written_out():
    m = _rotnet()
    x = _views(0, n=1)[0]
    loss, stats = m([x])
    with torch.no_grad():  # the same batch again: identical BN statistics
        rotated = torch.cat([torch.rot90(x, k, (2, 3)) for k in range(4)])
        logits = m.head(m.backbone(rotated)).tolist()
    total, hits = 0.0, 0
    for i, row in enumerate(logits):
        k = i // x.shape[0]
        total += math.log(sum(math.exp(v) for v in row)) - row[k]
        hits += max(range(4), key=lambda c: row[c]) == k
    assert loss.item() == pytest.approx(total / len(logits), abs=1e-5)
    assert stats["acc"].item() == pytest.approx(hits / len(logits))


def test_views_of_several_sizes_are_each_rotated():
    m = _rotnet()
    calls = m.backbone.calls
    loss, _ = m(_views(0, n=3, bs=2, sizes=[8, 8, 6]))
    assert m.backbone.calls - calls == 2  # one trunk pass per run of same-size views
    assert torch.isfinite(loss)


def test_recipes_and_bad_inputs():
    paper = recipes.rotnet_resnet50()
    assert (paper.optim.name, paper.optim.lr, paper.optim.weight_decay) == ("sgd", 0.1, 1e-4)
    assert paper.data.batch_size * 8 == 256 and not paper.method.all_rotations
    tiny = recipes.tiny_rotnet()
    assert tiny.method.all_rotations and [v.count for v in tiny.data.augment.views] == [1]
    assert all(v.jitter_p == 0 and v.grayscale_p == 0 for v in tiny.data.augment.views)
    with pytest.raises(ValueError, match="square"):
        _rotnet()([torch.zeros(2, 3, 8, 6)])
    with pytest.raises(ValueError, match="head_dims"):
        RotNet.Config(head_dims=(0,))
    RotNet.check_views(RotNet.Config(), [24, 24])
