"""Colorization (Zhang, Isola & Efros 2016): predict the colours of an image from its lightness.

Every view is an independent image. It is turned back into sRGB (the data pipeline normalised
it with ``mean``/``std``), converted to CIE Lab, and the trunk sees the lightness alone (one
input channel: the method replaces the trunk's first convolution, ``Backbone.set_in_channels``,
and exports record ``in_channels: 1``). A per-pixel head (1x1 convolutions) on the trunk's
last spatial map (``res5``, before pooling) gives, for every cell of that map, a distribution
over the quantised ab colour bins. The target is the paper's: every ground-truth ab value is
soft-encoded over its ``soft_neighbours`` nearest bins with a Gaussian of ``soft_sigma``, and
the per-pixel cross-entropy is weighted by the class-rebalancing weight of the pixel's nearest
bin, so rare (saturated) colours count as much as the common desaturated ones.

Resolution: the prediction lives on the res5 map (stride 32 for ResNet-50); the targets on a
grid ``target_cells`` times finer (ab averaged over each target pixel's area), and every
target pixel is scored against the prediction of the res5 cell it lies in (the prediction
upsampled by nearest neighbour). With ``target_cells=1`` there is one target per cell.

The ab bins (:func:`in_gamut_ab_bins`): ab quantised on a grid of 10, keeping the bins some
8-bit sRGB colour falls in (ab rounded to the nearest multiple of 10). That gives 261 bins, not
the paper's 313: the paper's released bin centres (``pts_in_hull.npy``) include cells no sRGB
colour reaches by this rule (colours of those bins never occur in sRGB images, so their prior
is zero and they only add never-used classes); the derivation is documented in docs/methods.md
and its count checked by the tests.

The colour prior (for the rebalancing weights) is estimated from the data seen: ``ab_counts``,
a persistent buffer (so checkpoints carry it), counts every target pixel's nearest bin over all
ranks (one no-grad all-reduce per step keeps it identical everywhere and equal to one process
on the global batch). Weights: p = the counts normalised (uniform before any data), smoothed by
a Gaussian of ``prior_sigma`` over the bins; w = 1 / ((1 - lambda) p + lambda / Q), scaled so
that the expected weight under p is 1 (the official ``PriorFactor``). Images whose |a| and |b|
never exceed ``gray_threshold`` (grayscale views) get weight 0 and are not counted (the official
``NonGrayMaskLayer``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from seerlike.data.augment import IMAGENET_MEAN, IMAGENET_STD
from seerlike.methods.base import MethodBase, MethodConfig
from seerlike.methods.common import world_and_rank
from seerlike.methods.pretext_ops import lightness_input, same_size_runs, srgb_to_lab, unnormalise

AB_GRID = 10
"""Side of the ab quantisation cells (the paper's grid size)."""


@functools.lru_cache(maxsize=4)
def _gamut_bins(grid: int) -> Tensor:
    # The colours on the surface of the 8-bit RGB cube (6 faces of 256 x 256) reach every cell
    # the whole cube reaches (tests/unit/test_colorization.py checks the full 2^24 colours).
    v = torch.arange(256, dtype=torch.float32) / 255
    a, b = torch.meshgrid(v, v, indexing="ij")
    a, b = a.flatten(), b.flatten()
    faces = []
    for fixed in range(3):
        for value in (0.0, 1.0):
            channels = [a, b]
            channels.insert(fixed, torch.full_like(a, value))
            faces.append(torch.stack(channels))
    ab = srgb_to_lab(torch.cat(faces, dim=1)[..., None])[1:, :, 0]  # (2, N)
    return cells_reached(ab, grid)


def cells_reached(ab: Tensor, grid: int) -> Tensor:
    """Centres ``(Q, 2)`` of the ``grid`` cells (ab rounded to the nearest multiple) that the ``(2, N)`` values reach,
    sorted by a, then b."""
    q = torch.round(ab / grid).long()
    half = int(q.abs().max()) + 1
    seen = torch.zeros(2 * half + 1, 2 * half + 1, dtype=torch.bool)
    seen[q[0] + half, q[1] + half] = True
    return ((seen.nonzero() - half) * grid).float()


def in_gamut_ab_bins(grid: int = AB_GRID) -> Tensor:
    """The ab bin centres ``(Q, 2)`` that 8-bit sRGB colours reach (Q = 261 at grid 10; see the module docstring)."""
    return _gamut_bins(grid).clone()


def soft_encode(ab: Tensor, bins: Tensor, k: int, sigma: float) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest bins of every ab value ``(N, 2)`` (nearest first) and Gaussian weights over
    them, ``exp(-d^2 / (2 sigma^2))`` normalised to sum to 1: (indices ``(N, k)``, weights ``(N, k)``)."""
    d2 = (ab.float()[:, None, :] - bins[None, :, :]).pow(2).sum(-1)  # (N, Q)
    d2, idx = d2.topk(k, dim=1, largest=False)
    return idx, torch.softmax(-d2 / (2 * sigma * sigma), dim=1)


def rebalancing_weights(counts: Tensor, bins: Tensor, lam: float, sigma: float) -> Tensor:
    """Per-bin weights ``(Q,)`` from bin counts: the normalised counts (uniform when empty) smoothed by a
    Gaussian over the bin centres, mixed with the uniform distribution, inverted, and scaled so that
    their expectation under the smoothed prior is 1 (Zhang et al., eq. 4; the official ``PriorFactor``)."""
    counts = counts.double()
    q = counts.numel()
    total = counts.sum()
    prior = torch.where(total > 0, counts / total.clamp_min(1e-300), torch.full_like(counts, 1.0 / q))
    d2 = (bins.double()[:, None, :] - bins.double()[None, :, :]).pow(2).sum(-1)
    kernel = torch.exp(-d2 / (2 * sigma * sigma))
    smoothed = (kernel / kernel.sum(dim=0, keepdim=True)) @ prior  # each bin's mass spread over its neighbours
    w = 1.0 / ((1 - lam) * smoothed + lam / q)
    return (w / (smoothed * w).sum()).float()


class Colorization(MethodBase):
    """Colorization over a seerlike backbone (``forward_features`` up to ``res5``, ``set_in_channels``)."""

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["colorization"] = "colorization"
        """Colorization (Zhang et al. 2016); defaults from the paper and its official code (richzhang/colorization)."""
        soft_neighbours: int = 5
        """Bins each ground-truth ab value is soft-encoded over (paper: 5; the released training layer uses 10)."""
        soft_sigma: float = 5.0
        """Std of the Gaussian over the distances to those bins, in ab units (paper and code: 5)."""
        rebalance_lambda: float = 0.5
        """Weight of the uniform distribution mixed into the colour prior before inverting it (paper and code: 0.5; 1 = no rebalancing)."""
        prior_sigma: float = 5.0
        """Std of the Gaussian (ab units) smoothing the colour prior estimated from the data seen (paper: 5)."""
        gray_threshold: float = 5.0
        """Images whose |a| and |b| never exceed this (grayscale views) get no loss and no prior count (official: 5)."""
        target_cells: int = 4
        """Target pixels per res5 cell along each side; each is scored against its cell's prediction (1: one per cell)."""
        head_dims: tuple[int, ...] = ()
        """Hidden widths (1x1 conv-BN-ReLU) of the per-pixel head on res5 before the 1x1 conv to the bins."""
        mean: tuple[float, float, float] = IMAGENET_MEAN
        """The views' normalisation mean: must equal data.augment.mean (undone to get sRGB back)."""
        std: tuple[float, float, float] = IMAGENET_STD
        """The views' normalisation std: must equal data.augment.std."""

        def __post_init__(self) -> None:
            if self.soft_neighbours < 1 or self.target_cells < 1:
                raise ValueError(f"soft_neighbours and target_cells must be >= 1, got {self.soft_neighbours}, "
                                 f"{self.target_cells}")
            if self.soft_sigma <= 0 or self.prior_sigma <= 0 or not 0.0 <= self.rebalance_lambda <= 1.0:
                raise ValueError("soft_sigma and prior_sigma must be > 0 and rebalance_lambda in [0, 1]")
            if self.gray_threshold < 0 or any(s <= 0 for s in self.std) or any(d < 1 for d in self.head_dims):
                raise ValueError("gray_threshold must be >= 0, std > 0 and head_dims positive")

    input_channels = 1  # the trunk sees the lightness alone

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        if not sizes:
            raise ValueError("colorization needs at least one view per image; set data.augment.views")

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__()
        dims = getattr(backbone, "feature_dims", None)
        spatial = hasattr(backbone, "forward_features") and bool(dims) and "res5" in dims
        if not (spatial and hasattr(backbone, "set_in_channels")):
            raise ValueError("colorization needs a seerlike backbone (forward_features with res5, feature_dims, "
                             "set_in_channels): it predicts colours on the last spatial map from the lightness alone")
        self.cfg = cfg
        self.backbone = backbone.set_in_channels(self.input_channels)
        bins = in_gamut_ab_bins()
        if cfg.soft_neighbours > len(bins):
            raise ValueError(f"soft_neighbours={cfg.soft_neighbours} exceeds the {len(bins)} ab bins")
        layers: list[nn.Module] = []
        for a, b in zip((dims["res5"], *cfg.head_dims), cfg.head_dims):
            layers += [nn.Conv2d(a, b, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(cfg.head_dims[-1] if cfg.head_dims else dims["res5"], len(bins), 1))
        self.head = nn.Sequential(*layers)
        self.register_buffer("ab_bins", bins)
        self.register_buffer("ab_counts", torch.zeros(len(bins), dtype=torch.float64))

    @torch.no_grad()
    def reset_state(self) -> None:
        self.ab_bins.copy_(in_gamut_ab_bins())
        self.ab_counts.zero_()

    @torch.no_grad()
    def count_colours(self, nearest: Tensor, weight: Tensor) -> None:
        """Add the nearest bins of this rank's target pixels (``weight`` 0 leaves a pixel out) to the prior,
        summed over all ranks."""
        hist = torch.zeros_like(self.ab_counts).index_add_(0, nearest, weight.to(self.ab_counts.dtype))
        if world_and_rank()[0] > 1:
            dist.all_reduce(hist)
        self.ab_counts += hist

    def targets(self, lab: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """ab averaged over the target grid ``size``: (flattened ab ``(N, 2)``, colour-image mask per pixel ``(N,)``,
        the ab map ``(B, 2, H, W)``)."""
        ab = F.adaptive_avg_pool2d(lab[:, 1:], size)
        colourful = (ab.abs() > self.cfg.gray_threshold).flatten(1).any(dim=1)
        mask = colourful.repeat_interleave(size[0] * size[1]).float()
        return ab.permute(0, 2, 3, 1).reshape(-1, 2), mask, ab

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        loss_sum = torch.zeros((), device=views[0].device)
        hits = torch.zeros((), device=views[0].device)
        pixels, clipped, values = 0, torch.zeros((), device=views[0].device), 0
        for batch in same_size_runs(views):
            rgb = unnormalise(batch, cfg.mean, cfg.std)
            clipped = clipped + ((rgb < -0.02) | (rgb > 1.02)).float().sum()  # a normalisation mismatch shows here
            values += rgb.numel()
            lab = srgb_to_lab(rgb)
            feats = self.backbone.forward_features(lightness_input(lab), until="res5")["res5"]
            logp = F.log_softmax(self.head(feats).float(), dim=1)  # (B, Q, h, w)
            b, q, h, w = logp.shape
            r = cfg.target_cells
            ab, mask, _ = self.targets(lab, (h * r, w * r))
            idx, soft = soft_encode(ab, self.ab_bins, cfg.soft_neighbours, cfg.soft_sigma)
            if self.training:
                self.count_colours(idx[:, 0], mask)
            weight = rebalancing_weights(self.ab_counts, self.ab_bins, cfg.rebalance_lambda, cfg.prior_sigma)
            pixel_w = weight[idx[:, 0]] * mask
            # the res5 cell of every target pixel: its prediction is the cell's (nearest upsampling)
            rows = torch.arange(h * r, device=logp.device) // r
            cols = torch.arange(w * r, device=logp.device) // r
            cell = (rows[:, None] * w + cols[None, :]).flatten()
            cell = (torch.arange(b, device=logp.device)[:, None] * (h * w) + cell[None, :]).flatten()
            per_cell = logp.permute(0, 2, 3, 1).reshape(-1, q)  # (B h w, Q)
            ce = -(soft * per_cell[cell[:, None], idx]).sum(dim=1)
            loss_sum = loss_sum + (pixel_w * ce).sum()
            hits = hits + (per_cell.detach().argmax(dim=1)[cell] == idx[:, 0]).float().sum()
            pixels += ce.numel()
        return loss_sum / pixels, {"acc": hits / pixels, "rgb_out_of_range": clipped / values}
