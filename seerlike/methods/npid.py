"""NPID, instance discrimination (Wu, Xiong, Yu, Lin 2018): every training image is its own
class, represented by a memory bank row that follows the image's embeddings.

An image's unit embedding is scored against its own bank row (the positive) and K rows drawn
uniformly from the bank (the negatives) with the NCE loss; after the step the row moves toward
the embedding (momentum 0.5). The bank, the sharded exact lookup, the negatives and the loss are
:mod:`seerlike.methods.memory_bank` (shared with PIRL).

No batch-norm leakage to guard against: the positive is a bank row made in an earlier epoch,
not another view in the same batch, so the statistics of the batch cannot reveal it. Collapse
is prevented by the negatives (every image must score its own row above K random others).

Views: the official recipe uses one augmented view per image. With more views each one is
scored against the bank (the losses averaged) and the bank takes the mean of their embeddings;
with one view this is exactly the official method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from seerlike.methods.base import MethodBase, MethodConfig, need_backbone_dim
from seerlike.methods.common import forward_views
from seerlike.methods.memory_bank import BankContrast


class NPID(MethodBase):
    """NPID over a backbone returning pooled features ``(B, backbone.out_dim)``: a linear head to
    ``embedding_dim``, L2-normalised, against a memory bank of ``num_samples`` rows."""

    needs_indices = True

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["npid"] = "npid"
        """NPID (Wu et al. 2018); defaults from the official code (zhirongw/lemniscate.pytorch: main.py flags, lib/NCEAverage.py)."""
        embedding_dim: int = 128
        """Width of the embedding and of the bank rows: a Linear after the trunk, then L2 normalisation (official --low-dim 128)."""
        num_negatives: int = 4096
        """Negatives drawn uniformly from the bank each step, shared by the batch (official --nce-k 4096; memory_bank.py)."""
        temperature: float = 0.07
        """Temperature of the scores exp(s / T) (official --nce-t 0.07)."""
        bank_momentum: float = 0.5
        """Momentum of the bank rows: row := normalise(m row + (1 - m) embedding) (official --nce-m 0.5)."""
        loss: Literal["nce", "softmax"] = "nce"
        """nce: the official NCECriterion (noise probability 1/N, Z estimated on the first batch); softmax: cross-entropy over the K+1 scores."""

        def __post_init__(self) -> None:
            if self.embedding_dim < 1:
                raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
            if self.num_negatives < 1:
                raise ValueError(f"num_negatives must be >= 1, got {self.num_negatives}")
            if self.temperature <= 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")
            if not 0.0 <= self.bank_momentum <= 1.0:
                raise ValueError(f"bank_momentum must be in [0, 1], got {self.bank_momentum}")

    def __init__(self, cfg: Config, backbone: nn.Module, *, num_samples: int) -> None:
        super().__init__()
        width = need_backbone_dim("NPID", backbone)
        self.cfg, self.backbone = cfg, backbone
        self.head = nn.Linear(width, cfg.embedding_dim)
        # the official bank starts from uniform rows, not normalised (lib/NCEAverage.py)
        self.memory = BankContrast(num_samples, cfg.embedding_dim, num_negatives=cfg.num_negatives,
                                   temperature=cfg.temperature, momentum=cfg.bank_momentum, loss=cfg.loss,
                                   normalize_init=False)

    def forward(self, views: list[Tensor], labels: Tensor | None = None,
                indices: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if indices is None:
            raise ValueError("NPID needs each sample's dataset index (forward(views, indices=...))")
        bs, n = views[0].shape[0], len(views)
        if indices.shape != (bs,):
            raise ValueError(f"indices must have shape ({bs},) like the batch, got {tuple(indices.shape)}")
        z = F.normalize(self.head(forward_views(self.backbone, views)).float(), dim=1)
        pos, neg, batch_idx = self.memory.lookup(indices)
        loss, acc = 0.0, 0.0
        for v in range(n):
            term, hit = self.memory.loss(z[v * bs:(v + 1) * bs], pos, neg)
            loss, acc = loss + term / n, acc + hit / n
        update = z.detach() if n == 1 else z.detach().view(n, bs, -1).mean(dim=0)
        self.memory.remember(batch_idx, update)
        return loss, {"acc": acc}

    def on_after_backward(self, step: int) -> None:
        self.memory.close_step()

    def on_step_end(self, step: int, max_steps: int) -> None:
        self.memory.commit()

    def reset_state(self) -> None:
        """The bank's initial rows, no draws yet, Z unknown."""
        self.memory.reset()
