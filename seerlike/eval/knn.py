"""Weighted kNN classification on frozen features (the DINO / InstDisc protocol).

Cosine similarity to every training feature, the ``k`` nearest vote with weight
``exp(sim / T)``; top-1 / top-5 from the summed votes. Defaults k = 20, T = 0.07.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# KNNConfig is defined beside the training config's eval section (its eval.knn), which the engine must import
from seerlike.engine.monitor import KNNConfig


def knn_scores(train_x: Tensor, train_y: Tensor, query_x: Tensor, num_classes: int,
               cfg: KNNConfig = KNNConfig(), on_chunk: Callable[[int], None] | None = None) -> Tensor:
    """Summed class votes ``(num_query, num_classes)`` for each query row; ``on_chunk(rows)`` after each chunk."""
    if train_x.shape[0] != train_y.shape[0]:
        raise ValueError(f"{train_x.shape[0]} train features but {train_y.shape[0]} labels")
    if train_x.shape[1] != query_x.shape[1]:
        raise ValueError(f"train features have dim {train_x.shape[1]} but query features {query_x.shape[1]}")
    train_x = F.normalize(train_x.float(), dim=1)
    query_x = F.normalize(query_x.float(), dim=1)
    k = min(cfg.k, train_x.shape[0])
    out = torch.empty(query_x.shape[0], num_classes)
    for start in range(0, query_x.shape[0], cfg.chunk):
        sim = query_x[start:start + cfg.chunk] @ train_x.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / cfg.temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_y[top_idx], weights)
        out[start:start + cfg.chunk] = votes
        if on_chunk is not None:
            on_chunk(sim.shape[0])
    return out


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """``{"top1": %, "top5": %}``; a k above the class count counts as all classes."""
    result = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        hit = (scores.topk(kk, dim=1).indices == labels[:, None]).any(dim=1)
        result[f"top{k}"] = 100.0 * hit.float().mean().item()
    return result


def knn_eval(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int,
             cfg: KNNConfig = KNNConfig(), on_chunk: Callable[[int], None] | None = None
             ) -> tuple[dict[str, float], Tensor]:
    """Top-1/top-5 of kNN on ``val``; also returns the predicted class of every val row."""
    scores = knn_scores(train_x, train_y, val_x, num_classes, cfg, on_chunk)
    return topk_accuracy(scores, val_y), scores.argmax(dim=1)
