"""Linear probe and low-shot classification on frozen features.

Features are standardised with the training set's statistics (the BatchNorm-without-affine
trick of MoCo/SwAV linear evaluation, done once since the features are frozen), then a
single linear layer is trained with SGD + momentum and a cosine schedule. Low-shot draws
``n`` examples per class with a seeded generator and reports the mean over several draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from seerlike.eval.knn import topk_accuracy


@dataclass(kw_only=True)
class LinearConfig:
    epochs: int = 100
    """Passes over the (frozen) training features."""
    batch_size: int = 256
    """Examples per SGD step."""
    lr: float = 0.1
    """Peak learning rate of the cosine schedule."""
    weight_decay: float = 1e-4
    """L2 penalty on the weights."""
    momentum: float = 0.9
    """SGD momentum."""
    seed: int = 0
    """Seeds initialisation and batch order."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"linear probe needs epochs >= 1 and batch_size >= 1, got {self.epochs}, {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"linear probe lr must be > 0, got {self.lr}")


@dataclass(kw_only=True)
class LowShotConfig:
    shots: tuple[int, ...] = (1, 5, 10)
    """Training examples per class."""
    draws: int = 3
    """Independent samples of the training subset per shot count (mean and std are reported)."""
    seed: int = 0
    """Seeds the subset draws."""
    probe: LinearConfig = field(default_factory=lambda: LinearConfig(epochs=200, batch_size=64, weight_decay=5e-4))
    """The linear classifier trained on each subset."""

    def __post_init__(self) -> None:
        if not self.shots or min(self.shots) < 1:
            raise ValueError(f"low-shot shots must be positive integers, got {self.shots}")
        if self.draws < 1:
            raise ValueError(f"low-shot draws must be >= 1, got {self.draws}")


class LinearProbe(torch.nn.Module):
    """Standardisation (fixed statistics) followed by a linear layer."""

    def __init__(self, mean: Tensor, std: Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.fc = torch.nn.Linear(mean.numel(), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc((x - self.mean) / self.std)


def train_linear(train_x: Tensor, train_y: Tensor, num_classes: int, cfg: LinearConfig = LinearConfig(),
                 on_epoch: Callable[[int], None] | None = None) -> LinearProbe:
    """Fit a linear classifier on frozen features; returns it in eval mode. ``on_epoch(1)`` after each epoch."""
    if train_x.shape[0] != train_y.shape[0]:
        raise ValueError(f"{train_x.shape[0]} train features but {train_y.shape[0]} labels")
    x = train_x.float()
    gen = torch.Generator().manual_seed(cfg.seed)
    probe = LinearProbe(x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6), num_classes)
    with torch.no_grad():
        probe.fc.weight.normal_(0, 0.01, generator=gen)
        probe.fc.bias.zero_()
    opt = torch.optim.SGD(probe.fc.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(x.shape[0] / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    step = 0
    probe.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            for group in opt.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(probe(x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if on_epoch is not None:
            on_epoch(1)
    return probe.eval()


@torch.no_grad()
def linear_eval(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int,
                cfg: LinearConfig = LinearConfig(), on_epoch: Callable[[int], None] | None = None
                ) -> tuple[dict[str, float], Tensor]:
    """Top-1/top-5 of a linear probe on ``val``; also the predicted class of every val row."""
    with torch.enable_grad():
        probe = train_linear(train_x, train_y, num_classes, cfg, on_epoch)
    scores = probe(val_x.float())
    return topk_accuracy(scores, val_y), scores.argmax(dim=1)


def sample_per_class(labels: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Indices of ``n`` random examples of every class present; fails if a class has fewer."""
    picked = []
    for c in labels.unique(sorted=True).tolist():
        members = (labels == c).nonzero().flatten()
        if members.numel() < n:
            raise ValueError(f"class {c} has only {members.numel()} training examples, fewer than the {n} shots asked for")
        picked.append(members[torch.randperm(members.numel(), generator=generator)[:n]])
    return torch.cat(picked)


def lowshot_eval(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int,
                 cfg: LowShotConfig = LowShotConfig(), on_probe: Callable[[int], None] | None = None
                 ) -> tuple[dict[str, dict[str, float]], Tensor]:
    """Per shot count: mean/std top-1 and mean top-5 over ``draws`` subsets.

    Returns the results keyed ``"{n}shot"`` and the predictions of the largest-shot,
    first-draw probe (for a confusion matrix); ``on_probe(1)`` after each probe.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    results: dict[str, dict[str, float]] = {}
    preds = torch.empty(0, dtype=torch.long)
    for n in sorted(cfg.shots):
        top1, top5 = [], []
        for draw in range(cfg.draws):
            idx = sample_per_class(train_y, n, gen)
            acc, p = linear_eval(train_x[idx], train_y[idx], val_x, val_y, num_classes, cfg.probe)
            top1.append(acc["top1"])
            top5.append(acc["top5"])
            if draw == 0:
                preds = p
            if on_probe is not None:
                on_probe(1)
        t1 = torch.tensor(top1)
        results[f"{n}shot"] = {"top1": t1.mean().item(), "top1_std": t1.std(unbiased=False).item(),
                               "top5": float(sum(top5) / len(top5)), "draws": cfg.draws}
    return results, preds
