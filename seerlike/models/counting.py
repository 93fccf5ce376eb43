"""Analytic complexity of conv nets, counted the way pycls counts it.

FLOPs are multiply-adds of convolutions and linear layers (biases add one per output);
BN, ReLU, pooling and the residual add cost nothing. Params count trainable tensors
(BN's gamma and beta, not its running statistics). Activations are the output elements
of every conv, pool and linear layer. Spatial sizes follow "same" padding with odd
kernels: out = (in - 1) // stride + 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Cx:
    """A running (h, w, flops, params, acts) tally through a network."""

    h: int
    """Current feature-map height."""
    w: int
    """Current feature-map width."""
    flops: int = 0
    params: int = 0
    acts: int = 0
    parts: list[dict] = field(default_factory=list)
    """One entry per named part (stem, each block, head), filled by ``part``."""

    def conv(self, w_in: int, w_out: int, k: int, *, stride: int = 1, groups: int = 1, bias: bool = False) -> Cx:
        assert k % 2 == 1, "only odd kernels (same padding) are counted"
        self.h, self.w = (self.h - 1) // stride + 1, (self.w - 1) // stride + 1
        self.flops += k * k * w_in * w_out * self.h * self.w // groups + (w_out if bias else 0)
        self.params += k * k * w_in * w_out // groups + (w_out if bias else 0)
        self.acts += w_out * self.h * self.w
        return self

    def norm(self, w_in: int) -> Cx:
        self.params += 2 * w_in
        return self

    def pool(self, w_in: int, k: int, *, stride: int = 1) -> Cx:
        assert k % 2 == 1, "only odd kernels (same padding) are counted"
        self.h, self.w = (self.h - 1) // stride + 1, (self.w - 1) // stride + 1
        self.acts += w_in * self.h * self.w
        return self

    def gap(self) -> Cx:
        self.h, self.w = 1, 1
        return self

    def linear(self, w_in: int, w_out: int, *, bias: bool = True) -> Cx:
        self.flops += w_in * w_out + (w_out if bias else 0)
        self.params += w_in * w_out + (w_out if bias else 0)
        self.acts += w_out
        return self

    def se(self, w_in: int, w_se: int) -> Cx:
        """Squeeze-excitation: global pool, 1x1 conv down, 1x1 conv up (with biases)."""
        h, w = self.h, self.w
        self.gap().conv(w_in, w_se, 1, bias=True).conv(w_se, w_in, 1, bias=True)
        self.h, self.w = h, w
        return self

    def part(self, name: str, start: tuple[int, int, int]) -> None:
        """Record what was added since ``start = self.mark()`` under ``name``."""
        flops, params, acts = start
        self.parts.append(
            {
                "name": name,
                "flops": self.flops - flops,
                "params": self.params - params,
                "acts": self.acts - acts,
                "out_hw": (self.h, self.w),
            }
        )

    def mark(self) -> tuple[int, int, int]:
        return self.flops, self.params, self.acts

    def result(self, **extra) -> dict:
        return {"params": self.params, "flops": self.flops, "acts": self.acts, **extra, "parts": self.parts}
