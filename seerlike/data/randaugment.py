"""RandAugment, Cutout and pixel shifts over a whole view group on the training device.

The strong and weak views of semi-supervised training (docs/semisup.md): FixMatch's weak
view is a flip and a shift of up to 12.5% of the side with reflect padding; its strong view
is RandAugment followed by Cutout; Noisy Student's student sees RandAugment. They run in the
training process on the uint8 crops of one view group, before the colour ops of
:class:`seerlike.data.augment.Photometric` (``ViewConfig.randaugment`` turns them on).

Ops follow Pillow's definitions on uint8 images (the ones RandAugment, AutoAugment and
FixMatch's code call): each op maps integer pixel values to integer pixel values, with
Pillow's rounding, so a batched op equals ``PIL.ImageOps`` / ``ImageEnhance`` / an affine
``Image.transform`` with nearest sampling on every row (the tests check it). Levels are on
AutoAugment's 0-10 scale (``PARAMETER_MAX = 10``, as FixMatch's and the TF RandAugment code):

===========  =====================================================  ========================
op           argument at level m                                    source of the range
===========  =====================================================  ========================
rotate       +-30 m/10 degrees (random sign), about the centre      AutoAugment / RandAugment
shear_x/y    +-0.3 m/10 (random sign)                               AutoAugment / RandAugment
translate_x/y +-0.3 m/10 of the side (random sign)                  FixMatch, Table 12
color, contrast, brightness, sharpness: factor 0.1 + 1.8 m/10       AutoAugment / FixMatch code
solarize     invert pixels >= 256 (1 - m/10)                        FixMatch code
posterize    keep 8 - round(4 m/10) bits                            FixMatch, Table 12 (4-8 bits)
autocontrast, equalize, identity: no argument
===========  =====================================================  ========================

Geometric ops fill uncovered pixels with gray (128). Levels above 10 (Noisy Student's code
uses up to 27 on the same scale) extrapolate linearly; solarize and posterize clamp at
their ends. Randomness: one draw of every row's parameters from a CPU generator (exact
resume; see ``Photometric``), then per slot and op one batched op over the rows that drew it,
chosen on the host without a read-back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

OPS = ("identity", "autocontrast", "equalize", "rotate", "solarize", "color", "posterize", "contrast",
       "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
"""RandAugment's 14 ops (Cubuk et al. 2020, and FixMatch's RandAugment variant)."""

GRAY = 128.0
"""Fill of the pixels a geometric op uncovers and of the Cutout square (Pillow's fillcolor in FixMatch's code)."""

_SIGNED = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}


@dataclass(kw_only=True)
class RandAugmentConfig:
    """RandAugment, Cutout and random shifts of a view's crops (all off by default)."""

    num_ops: int = 0
    """RandAugment's N: ops drawn per image, uniformly with replacement; 0 turns RandAugment off."""
    magnitude: float = 10.0
    """RandAugment's M on AutoAugment's 0-10 scale (10: each op's strongest setting, e.g. 30 degrees); up to 30."""
    random_magnitude: bool = False
    """Each drawn op takes a level uniform over the integers 1..magnitude (FixMatch's variant: 1..9) instead of M."""
    op_p: float = 1.0
    """Probability that a drawn op is applied (RandAugment: 1; FixMatch's RandAugment variant: 0.5)."""
    ops: tuple[str, ...] = OPS
    """The ops drawn from (default: RandAugment's 14)."""
    cutout: float = 0.0
    """Cutout after RandAugment: a gray square of this fraction of the side at a uniform centre (FixMatch: 0.5); 0 = off."""
    translate: float = 0.0
    """Shift by up to this fraction of the side in x and y, uniform whole pixels, reflect padding (FixMatch's weak view: 0.125)."""

    def __post_init__(self) -> None:
        if self.num_ops < 0:
            raise ValueError(f"randaugment.num_ops must be >= 0, got {self.num_ops}")
        if not 0 <= self.magnitude <= 30:
            raise ValueError(f"randaugment.magnitude must be in [0, 30] (AutoAugment's scale, 10 = strongest), "
                             f"got {self.magnitude}")
        if self.random_magnitude and self.magnitude < 1:
            raise ValueError("randaugment.random_magnitude draws levels 1..magnitude: magnitude must be >= 1")
        if not 0 <= self.op_p <= 1:
            raise ValueError(f"randaugment.op_p must be a probability in [0, 1], got {self.op_p}")
        unknown = [o for o in self.ops if o not in OPS]
        if unknown or not self.ops:
            raise ValueError(f"randaugment.ops: unknown {unknown or 'empty list'}; choose from {', '.join(OPS)}")
        if not 0 <= self.cutout <= 1 or not 0 <= self.translate < 0.5:
            raise ValueError(f"randaugment.cutout must be in [0, 1] and translate in [0, 0.5), got "
                             f"{self.cutout}, {self.translate}")

    @property
    def enabled(self) -> bool:
        return self.num_ops > 0 or self.cutout > 0 or self.translate > 0


@dataclass
class RandAugmentParams:
    """Every row's draws: ``op``, ``on``, ``level`` and ``sign`` per slot (n, N); shift and Cutout centre per row."""

    op: torch.Tensor  # (n, N) int64: index into cfg.ops
    on: torch.Tensor  # (n, N) bool: the drawn op is applied (op_p)
    level: torch.Tensor  # (n, N) float64: level on the 0-10 scale
    sign: torch.Tensor  # (n, N) float64: +1 or -1 (rotate, shear, translate)
    shift: torch.Tensor  # (n, 2) int64: (dy, dx) in [-t, t] pixels
    centre: torch.Tensor  # (n, 2) int64: Cutout centre (y, x), uniform over the pixels


def sample_randaugment(cfg: RandAugmentConfig, n: int, size: tuple[int, int],
                       gen: torch.Generator) -> RandAugmentParams:
    """Parameters of ``n`` rows of ``size`` (H, W) from one draw of ``gen``: an (n, 4N + 4) block of uniforms."""
    N = cfg.num_ops
    u = torch.rand(n, 4 * N + 4, generator=gen, dtype=torch.float64)
    K = len(cfg.ops)
    op = (u[:, :N] * K).long().clamp_(max=K - 1)
    if cfg.random_magnitude:
        top = int(cfg.magnitude)
        level = 1 + (u[:, 2 * N:3 * N] * top).floor().clamp_(max=top - 1)
    else:
        level = torch.full((n, N), float(cfg.magnitude), dtype=torch.float64)
    sign = torch.where(u[:, 3 * N:4 * N] < 0.5, -1.0, 1.0).double()
    t = _shift_pixels(cfg, size)
    shift = (u[:, 4 * N:4 * N + 2] * (2 * t + 1)).long().clamp_(max=2 * t) - t
    h, w = size
    centre = torch.stack([(u[:, 4 * N + 2] * h).long().clamp_(max=h - 1),
                          (u[:, 4 * N + 3] * w).long().clamp_(max=w - 1)], 1)
    return RandAugmentParams(op=op, on=u[:, N:2 * N] < cfg.op_p, level=level, sign=sign, shift=shift, centre=centre)


def _shift_pixels(cfg: RandAugmentConfig, size: tuple[int, int]) -> int:
    return int(round(cfg.translate * min(size)))


def cutout_side(cfg: RandAugmentConfig, size: tuple[int, int]) -> int:
    """Side of the Cutout square in pixels."""
    return int(round(cfg.cutout * min(size)))


# ---------------------------------------------------------------- the ops, on integer-valued float images


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, as (r, 1, H, W)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


def _rows(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-row parameter (computed on the host) as (r, 1, 1, 1) on ``x``'s device and dtype."""
    return t.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ``Image.blend(degenerate, x, factor)``: clip to [0, 255], then truncate."""
    f = _rows(factor, x)
    return torch.floor((degenerate + f * (x - degenerate)).clamp_(0, 255))


def _enhance_factor(level: torch.Tensor) -> torch.Tensor:
    return 0.1 + 1.8 * level / 10


def color(x, level, sign):
    return _blend(_luma(x).expand_as(x), x, _enhance_factor(level))


def contrast(x, level, sign):
    mean = torch.floor(_luma(x).double().mean(dim=(1, 2, 3), keepdim=True) + 0.5).to(x.dtype)  # exact sums
    return _blend(mean.expand_as(x), x, _enhance_factor(level))


def brightness(x, level, sign):
    return _blend(torch.zeros_like(x), x, _enhance_factor(level))


def sharpness(x, level, sign):
    """Blend with Pillow's SMOOTH filter (3x3, centre 5, the rest 1, / 13; border pixels kept).

    The 3x3 sum is nine shifted adds of whole pixel levels (exact in float32; a convolution
    may run in TF32 on a GPU and round differently from the CPU)."""
    _, _, h, w = x.shape
    smooth = x.clone()
    if h > 2 and w > 2:
        total = 4 * x[:, :, 1:-1, 1:-1]
        for dy in range(3):
            for dx in range(3):
                total = total + x[:, :, dy:h - 2 + dy, dx:w - 2 + dx]
        smooth[:, :, 1:-1, 1:-1] = torch.floor(total / 13 + 0.5).clamp_(0, 255)
    return _blend(smooth, x, _enhance_factor(level))


def solarize(x, level, sign):
    threshold = _rows((256 * (1 - level / 10)).clamp(min=0).floor(), x)
    return torch.where(x >= threshold, 255 - x, x)


def posterize(x, level, sign):
    step = _rows(torch.pow(2.0, torch.round(4 * level / 10).clamp(0, 7)), x)  # 2^(8 - bits), bits in 1..8
    return torch.floor(x / step) * step


def autocontrast(x, level, sign):
    """Pillow's ``ImageOps.autocontrast`` (no cutoff): each channel's [lo, hi] stretched to [0, 255], truncated."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = (hi - lo).double().clamp(min=1)
    # float64, Pillow's formula and a true division (scalar / tensor multiplies by a reciprocal): the
    # truncation that follows lands on exact integers, where one ulp changes the result
    scale = torch.full_like(span, 255.0) / span
    out = torch.floor(x.double() * scale - lo.double() * scale).clamp_(0, 255).to(x.dtype)
    return torch.where(hi > lo, out, x)


def equalize(x, level, sign):
    """Pillow's ``ImageOps.equalize`` per channel: a lookup table from the cumulative histogram."""
    r, c, h, w = x.shape
    v = x.reshape(r * c, h * w).long()
    hist = torch.zeros(r * c, 256, dtype=torch.int64, device=x.device).scatter_add_(1, v, torch.ones_like(v))
    top = torch.where(hist > 0, torch.arange(256, device=x.device), -1).amax(1, keepdim=True)
    step = (h * w - hist.gather(1, top)) // 255  # (total - count of the highest value present) // 255
    before = torch.cumsum(hist, 1) - hist  # pixels below each value
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp_(max=255)
    out = lut.gather(1, v).to(x.dtype)
    return torch.where(step > 0, out, v.to(x.dtype)).reshape(r, c, h, w)


def identity(x, level, sign):
    return x


def _affine(x: torch.Tensor, m: torch.Tensor, *, fixed: bool) -> torch.Tensor:
    """Pillow's ``transform(AFFINE, m, NEAREST, fillcolor=128)`` per row; outside the image: gray.

    Output pixel (x, y) reads the input at ``floor(m0 (x + .5) + m1 (y + .5) + m2, m3 (x + .5) + m4 (y + .5) + m5)``.
    Pillow evaluates that in 16.16 fixed point when the matrix mixes the axes (``fixed``: rotate,
    shear) and in doubles when it only scales and shifts (translate); near-integer coordinates
    round differently in the two, so both are reproduced.
    """
    r, c, h, w = x.shape
    m = m.to(torch.float64)  # computed on the host: the device sees exact integers (fixed) or IEEE sums
    xs = torch.arange(w, dtype=torch.float64, device=x.device)[None, None, :]
    ys = torch.arange(h, dtype=torch.float64, device=x.device)[None, :, None]
    if fixed:
        q = torch.floor(m * 65536 + 0.5).long()
        q2 = torch.floor((m[:, 2] + m[:, 0] * 0.5 + m[:, 1] * 0.5) * 65536 + 0.5).long()
        q5 = torch.floor((m[:, 5] + m[:, 3] * 0.5 + m[:, 4] * 0.5) * 65536 + 0.5).long()
        q, q2, q5 = (t.to(x.device) for t in (q, q2, q5))
        xl, yl = xs.long(), ys.long()
        ix = torch.div(q2[:, None, None] + yl * q[:, 1, None, None] + xl * q[:, 0, None, None], 65536,
                       rounding_mode="floor")  # Pillow's >> 16
        iy = torch.div(q5[:, None, None] + yl * q[:, 4, None, None] + xl * q[:, 3, None, None], 65536,
                       rounding_mode="floor")
    else:
        m = m.to(x.device)
        col = lambda i: m[:, i, None, None]  # noqa: E731
        ix = torch.floor(col(0) * (xs + 0.5) + col(1) * (ys + 0.5) + col(2)).long()
        iy = torch.floor(col(3) * (xs + 0.5) + col(4) * (ys + 0.5) + col(5)).long()
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    flat = (iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)).view(r, 1, h * w).expand(r, c, h * w)
    out = x.reshape(r, c, h * w).gather(2, flat).view(r, c, h, w)
    return torch.where(inside[:, None], out, torch.full_like(out, GRAY))


def _rows_matrix(a, b, c, d, e, f) -> torch.Tensor:
    return torch.stack([a, b, c, d, e, f], 1)


def rotate(x, level, sign):
    """Pillow's ``Image.rotate(degrees)`` (counter-clockwise, about the centre, nearest)."""
    _, _, h, w = x.shape
    theta = -torch.deg2rad(sign * 30 * level / 10)  # Pillow inverts the angle: the matrix maps output to input
    cos, sin = torch.round(torch.cos(theta), decimals=15), torch.round(torch.sin(theta), decimals=15)  # as Pillow
    cx, cy = w / 2, h / 2
    # input = R (out - centre) + centre
    return _affine(x, _rows_matrix(cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy), fixed=True)


def shear_x(x, level, sign):
    k = sign * 0.3 * level / 10
    one, zero = torch.ones_like(k), torch.zeros_like(k)
    return _affine(x, _rows_matrix(one, k, zero, zero, one, zero), fixed=True)


def shear_y(x, level, sign):
    k = sign * 0.3 * level / 10
    one, zero = torch.ones_like(k), torch.zeros_like(k)
    return _affine(x, _rows_matrix(one, zero, zero, k, one, zero), fixed=True)


def translate_x(x, level, sign):
    p = sign * 0.3 * level / 10 * x.shape[3]
    one, zero = torch.ones_like(p), torch.zeros_like(p)
    return _affine(x, _rows_matrix(one, zero, p, zero, one, zero), fixed=False)


def translate_y(x, level, sign):
    p = sign * 0.3 * level / 10 * x.shape[2]
    one, zero = torch.ones_like(p), torch.zeros_like(p)
    return _affine(x, _rows_matrix(one, zero, zero, zero, one, p), fixed=False)


OP_FUNCTIONS = {"identity": identity, "autocontrast": autocontrast, "equalize": equalize, "rotate": rotate,
                "solarize": solarize, "color": color, "posterize": posterize, "contrast": contrast,
                "brightness": brightness, "sharpness": sharpness, "shear_x": shear_x, "shear_y": shear_y,
                "translate_x": translate_x, "translate_y": translate_y}
"""op name -> f(x (r, 3, H, W) integer-valued float in [0, 255] on any device, level (r,), sign (r,) float64 on
the host) -> the same; parameters are turned into per-row numbers on the host, so every device gets the same result."""


def shift(x: torch.Tensor, d: torch.Tensor, t: int) -> torch.Tensor:
    """Rows shifted by ``d`` (r, 2) = (dy, dx) pixels in [-t, t], reflect padding (pad by t, then a random crop)."""
    if t == 0:
        return x
    r, c, h, w = x.shape
    padded = F.pad(x, (t, t, t, t), mode="reflect")
    d = d.to(x.device)
    rows = (torch.arange(h, device=x.device)[None] + t + d[:, 0:1]).view(r, 1, h, 1).expand(r, c, h, w + 2 * t)
    out = padded.gather(2, rows)
    cols = (torch.arange(w, device=x.device)[None] + t + d[:, 1:2]).view(r, 1, 1, w).expand(r, c, h, w)
    return out.gather(3, cols)


def cutout(x: torch.Tensor, centre: torch.Tensor, side: int) -> torch.Tensor:
    """A gray ``side`` square at each row's centre (y, x), cut at the borders (rows [y - side//2, y + side//2))."""
    if side <= 0:
        return x
    r, _, h, w = x.shape
    centre = centre.to(x.device)
    half = side // 2
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_y = (ys[None] >= centre[:, 0:1] - half) & (ys[None] < centre[:, 0:1] - half + side)
    in_x = (xs[None] >= centre[:, 1:2] - half) & (xs[None] < centre[:, 1:2] - half + side)
    box = (in_y[:, :, None] & in_x[:, None, :])[:, None]
    return torch.where(box, torch.full_like(x, GRAY), x)


def apply_randaugment(x: torch.Tensor, cfg: RandAugmentConfig, p: RandAugmentParams) -> torch.Tensor:
    """The shift, RandAugment ops and Cutout of ``p`` on ``x`` (n, 3, H, W): uint8 -> uint8 (float in [0, 1] -> float).

    Per slot, each op runs once over the rows that drew it (chosen on the host from ``p``);
    each op rounds as Pillow does, so the values stay whole pixel levels and the result goes on
    as uint8, exactly like crops that had no RandAugment.
    """
    n, _, h, w = x.shape
    y = x.float() if x.dtype == torch.uint8 else torch.round(x.float() * 255)
    y = shift(y, p.shift, _shift_pixels(cfg, (h, w)))
    op, on = p.op.numpy(), p.on.numpy()
    for slot in range(cfg.num_ops):
        for k, name in enumerate(cfg.ops):
            if name == "identity":
                continue
            rows = np.flatnonzero((op[:, slot] == k) & on[:, slot])
            if len(rows) == 0:
                continue
            idx = torch.from_numpy(rows).to(y.device)
            level, sign = p.level[rows, slot], p.sign[rows, slot]
            y.index_copy_(0, idx, OP_FUNCTIONS[name](y.index_select(0, idx), level, sign).to(y.dtype))
    y = cutout(y, p.centre, cutout_side(cfg, (h, w)))
    return y.to(torch.uint8) if x.dtype == torch.uint8 else y.div_(255)


def randaugment_group(x: torch.Tensor, cfg: RandAugmentConfig, seed: int) -> torch.Tensor:
    """One view group's crops through ``cfg`` with parameters from ``torch.Generator().manual_seed(seed)``;
    ``x`` itself when ``cfg`` is off (the hook of ``seerlike.data.augment.Photometric``)."""
    if not cfg.enabled:
        return x
    gen = torch.Generator().manual_seed(seed)
    return apply_randaugment(x, cfg, sample_randaugment(cfg, x.shape[0], tuple(x.shape[-2:]), gen))

