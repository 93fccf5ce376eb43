"""Augmentation in two halves: uint8 geometry per sample (workers), photometry per batch (device).

``crop_sample`` runs in a DataLoader worker: decode the image at the smallest size the
crops need (simplejpeg ``min_width/min_height`` or Pillow ``draft``), then per view a
random resized crop and a flip, resized on uint8 (torch's antialiased bilinear, as
Pillow's). Its randomness comes from ``hash(seed, epoch, key)``, never from global RNG state.

``Photometric`` runs on the training device over a whole batch: colour jitter, grayscale,
Gaussian blur, solarize and normalisation as batched tensor ops, with randomness from a
``torch.Generator`` seeded by ``(seed, epoch, step, rank)``. Colour jitter applies
brightness, contrast, saturation and hue in a random order per sample (as torchvision's
``ColorJitter``), each op a per-sample 3x3 colour matrix followed by a clamp to [0, 1];
the ops whose clamp cannot change anything merge with the next into one matrix, so the
result is torchvision's with fewer passes, and the per-sample order costs nothing extra.
Hue is a rotation of the chroma plane in YIQ space (as NVIDIA DALI does) rather than an
HSV round trip: the same hue circle, about 10x cheaper.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, field

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
CPU_CHUNK_BYTES = 1 << 20  # photometric ops on CPU work through the batch in chunks of this many float bytes


class CorruptSample(ValueError):
    """An image that cannot be decoded (bad bytes, unsupported format)."""


@dataclass(kw_only=True)
class ViewConfig:
    """One group of identically-distributed views (e.g. SwAV's 6 small crops)."""

    count: int = 1
    """How many views of this kind per image."""
    size: int = 224
    """Output side in pixels (square crops)."""
    scale: tuple[float, float] = (0.08, 1.0)
    """Random resized crop: range of the crop's area as a fraction of the image's area."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Random resized crop: range of the aspect ratio (w/h), sampled log-uniformly."""
    flip_p: float = 0.5
    """Probability of a horizontal flip."""
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    """Colour jitter strengths (brightness, contrast, saturation, hue): factors in [1-s, 1+s], hue in [-h, h]."""
    jitter_p: float = 0.8
    """Probability of applying colour jitter."""
    grayscale_p: float = 0.2
    """Probability of converting to grayscale (3 equal channels)."""
    blur_p: float = 0.0
    """Probability of a Gaussian blur."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Range of the blur's standard deviation in pixels (uniform)."""
    blur_kernel_frac: float = 0.1
    """Blur kernel size as a fraction of the view size, made odd (BYOL: 10%)."""
    solarize_p: float = 0.0
    """Probability of solarizing (invert pixels at or above the threshold)."""
    solarize_threshold: float = 0.5
    """Solarize threshold on the [0, 1] scale."""

    def __post_init__(self) -> None:
        if self.count < 1 or self.size < 1:
            raise ValueError(f"view count and size must be >= 1, got count={self.count} size={self.size}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if any(s < 0 for s in self.jitter) or self.jitter[3] > 0.5:
            raise ValueError(f"jitter strengths must be >= 0 and hue <= 0.5, got {self.jitter}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")


@dataclass(kw_only=True)
class AugmentConfig:
    """The views made of each image; their order is the order of ``Batch.views``."""

    views: list[ViewConfig] = field(default_factory=lambda: [ViewConfig(count=2)])
    """View groups, expanded in order: a group with count N gives N consecutive views."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean subtracted after the photometric ops."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation divided after the photometric ops."""
    decode_min_size: int = 0
    """Decode JPEGs at the smallest DCT scale (1/2, 1/4, 1/8) keeping the shorter side >= this; 0 means the largest view size."""
    jitter_order: str = "random"
    """Colour jitter op order: 'random' (a new permutation per sample, as torchvision) or 'fixed' (b, c, s, h)."""

    def __post_init__(self) -> None:
        if not self.views:
            raise ValueError("augment.views is empty; give at least one view group")
        if self.jitter_order not in ("random", "fixed"):
            raise ValueError(f"jitter_order must be 'random' or 'fixed', got {self.jitter_order!r}")
        if self.decode_min_size < 0:
            raise ValueError(f"decode_min_size must be >= 0, got {self.decode_min_size}")

    @property
    def num_views(self) -> int:
        return sum(v.count for v in self.views)

    def expanded(self) -> list[ViewConfig]:
        return [v for v in self.views for _ in range(v.count)]

    def min_decode_side(self) -> int:
        return self.decode_min_size or max(v.size for v in self.views)


def swav_multicrop(
    large: int = 224, small: int = 96, n_large: int = 2, n_small: int = 6, strength: float = 0.8
) -> AugmentConfig:
    """SwAV multi-crop: n_large x large at scale (0.14, 1) + n_small x small at (0.05, 0.14)."""
    s = strength
    common = dict(jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)
    views = [ViewConfig(count=n_large, size=large, scale=(0.14, 1.0), **common)]
    if n_small:
        views.append(ViewConfig(count=n_small, size=small, scale=(0.05, 0.14), **common))
    return AugmentConfig(views=views)


def byol_views(size: int = 224) -> AugmentConfig:
    """BYOL's asymmetric pair: view 1 always blurred, view 2 rarely blurred and sometimes solarized."""
    common = dict(size=size, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2)
    return AugmentConfig(views=[ViewConfig(blur_p=1.0, solarize_p=0.0, **common),
                                ViewConfig(blur_p=0.1, solarize_p=0.2, **common)])


# ---------------------------------------------------------------- randomness


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text; identical in every process and Python run."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


# ---------------------------------------------------------------- decode (worker side)

_EXIF_TRANSPOSE = {2: [Image.FLIP_LEFT_RIGHT], 3: [Image.ROTATE_180], 4: [Image.FLIP_TOP_BOTTOM],
                   5: [Image.TRANSPOSE], 6: [Image.ROTATE_270], 7: [Image.TRANSVERSE], 8: [Image.ROTATE_90]}


def _orientation(data: bytes) -> int:
    if b"Exif" not in data[:65536]:
        return 1
    try:
        return int(Image.open(io.BytesIO(data)).getexif().get(0x0112, 1))
    except Exception:
        return 1


def _orient_array(a: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation on an (H, W, 3) array, as Pillow's exif_transpose does it."""
    ops = {2: lambda x: x[:, ::-1], 3: lambda x: x[::-1, ::-1], 4: lambda x: x[::-1],
           5: lambda x: x.transpose(1, 0, 2), 6: lambda x: np.rot90(x, -1), 7: lambda x: np.rot90(x, -1)[::-1],
           8: lambda x: np.rot90(x, 1)}
    if orientation not in ops:
        return a
    return np.ascontiguousarray(ops[orientation](a))


def decode_array(data: bytes, min_side: int = 0) -> np.ndarray:
    """RGB uint8 (H, W, 3), EXIF-oriented, decoded at reduced size when the shorter side allows it.

    JPEG goes through simplejpeg (libjpeg-turbo DCT scaling: the smallest of 1/8..1 keeping
    both sides >= ``min_side``), anything else (PNG, CMYK JPEG, ...) through Pillow (with
    ``draft`` for JPEG). Raises CorruptSample for undecodable bytes.
    """
    if not data:
        raise CorruptSample("empty image bytes")
    arr = None
    if data[:2] == b"\xff\xd8":
        try:
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True,
                                         min_width=min_side, min_height=min_side)
        except (ValueError, RuntimeError):
            arr = None  # CMYK / odd JPEGs: let Pillow try
    if arr is None:
        try:
            img = Image.open(io.BytesIO(data))
            if min_side and img.format == "JPEG":
                img.draft("RGB", (min_side, min_side))
            arr = np.asarray(img.convert("RGB"))
        except Exception as e:
            raise CorruptSample(f"cannot decode image: {type(e).__name__}: {e}") from None
    return _orient_array(arr, _orientation(data))


def decode(data: bytes, min_side: int = 0) -> Image.Image:
    """:func:`decode_array` as a Pillow image."""
    return Image.fromarray(decode_array(data, min_side))


# ---------------------------------------------------------------- geometry (worker side)


def sample_crop(rng: np.random.Generator, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params on a numpy Generator: (left, top, w, h)."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def crop_views(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> list[torch.Tensor]:
    """One uint8 (3, size, size) tensor per expanded view: random resized crop + flip.

    The resize is torch's antialiased bilinear on uint8 (its AVX2 path, made to match
    Pillow's), about 2x faster than Pillow's own on these sizes.
    """
    height, width = img.shape[:2]
    t = torch.from_numpy(np.require(img, requirements="W")).permute(2, 0, 1)[None]  # (1, 3, H, W), HWC strides
    out = []
    for v in cfg.expanded():
        x, y, w, h = sample_crop(rng, width, height, v.scale, v.ratio)
        view = F.interpolate(t[:, :, y:y + h, x:x + w], size=(v.size, v.size), mode="bilinear",
                             antialias=True, align_corners=False)[0]
        if rng.random() < v.flip_p:
            view = view.flip(-1)
        out.append(view)
    return out


def crop_sample(data: bytes, key: str, cfg: AugmentConfig, seed: int, epoch: int) -> list[torch.Tensor]:
    """Decode one image and cut its views; deterministic in (seed, epoch, key)."""
    img = decode_array(data, cfg.min_decode_side())
    rng = np.random.Generator(np.random.PCG64(stable_seed(seed, epoch, key)))
    return crop_views(img, cfg, rng)


def stack_views(samples: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per view, the (B, 3, S, S) contiguous uint8 batch of the samples' crops."""
    return [torch.stack([s[v] for s in samples]).contiguous() for v in range(len(samples[0]))]


# ---------------------------------------------------------------- eval transform (worker side)


def center_view(data: bytes, size: int, resize: int) -> np.ndarray:
    """Shorter side to ``resize`` then a centred ``size`` square, uint8 (size, size, 3)."""
    img = decode(data, resize)
    # one resize with a box: the centre square of the resized image, mapped back to source pixels
    side = size * min(img.width, img.height) / resize
    left, top = (img.width - side) / 2, (img.height - side) / 2
    return np.asarray(img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side)))


# ---------------------------------------------------------------- photometry (device side)


@dataclass
class PhotometricParams:
    """Per-sample parameters of one view of a batch (for tests and inspection)."""

    jitter_on: torch.Tensor  # (B,) bool
    factors: torch.Tensor  # (B, 4): brightness, contrast, saturation factors; hue shift
    order: torch.Tensor  # (B, 4) permutation of 0..3
    gray_on: torch.Tensor  # (B,) bool
    blur_on: torch.Tensor  # (B,) bool
    sigma: torch.Tensor  # (B,)
    solarize_on: torch.Tensor  # (B,) bool


def sample_photometric(v: ViewConfig, n: int, gen: torch.Generator, random_order: bool) -> PhotometricParams:
    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo) + lo

    b, c, s, h = v.jitter
    factors = torch.stack([u(max(0.0, 1 - b), 1 + b), u(max(0.0, 1 - c), 1 + c), u(max(0.0, 1 - s), 1 + s), u(-h, h)], 1)
    if random_order:
        order = torch.argsort(torch.rand(n, 4, generator=gen), dim=1)
    else:
        order = torch.arange(4).expand(n, 4).clone()
    return PhotometricParams(
        jitter_on=torch.rand(n, generator=gen) < v.jitter_p,
        factors=factors.float(),
        order=order,
        gray_on=torch.rand(n, generator=gen) < v.grayscale_p,
        blur_on=torch.rand(n, generator=gen) < v.blur_p,
        sigma=u(*v.blur_sigma).float(),
        solarize_on=torch.rand(n, generator=gen) < v.solarize_p,
    )


_YIQ_FROM_RGB = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_RGB_FROM_YIQ = np.linalg.inv(_YIQ_FROM_RGB)


def _jitter_ops(p: PhotometricParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample and position: the op's colour matrix (B,4,3,3), contrast weight (B,4) and clamp need (B,4).

    Contrast is ``f * x + (1 - f) * mean(gray(x))``: the matrix holds ``f``, the weight
    ``1 - f`` multiplies the image's mean gray level, known only when the op runs. Hue
    rotates the chroma plane in YIQ space. The clamp to [0, 1] after an op can only
    change an image in [0, 1] after a hue shift or a factor above 1: brightness, contrast
    and saturation with a factor <= 1 map [0, 1] into itself (a scaling, or a convex
    combination with a gray level in [0, 1]).
    """
    order = p.order.numpy()
    op = np.where(p.jitter_on.numpy()[:, None], order, -1)[..., None, None]  # (B, 4, 1, 1), -1: no op
    f = np.take_along_axis(p.factors.double().numpy(), order, 1)[..., None, None]
    theta = 2 * math.pi * f[..., 0, 0]
    cos, sin = np.cos(theta), np.sin(theta)
    rot = np.zeros(theta.shape + (3, 3))
    rot[..., 0, 0], rot[..., 1, 1], rot[..., 1, 2], rot[..., 2, 1], rot[..., 2, 2] = 1, cos, -sin, sin, cos
    eye, gray = np.eye(3), np.asarray(GRAY)
    hue = _RGB_FROM_YIQ @ rot @ _YIQ_FROM_RGB
    m = np.select([op < 0, op <= 1, op == 2], [eye, f * eye, f * eye + (1 - f) * gray], hue)
    clamps = ((op == 3) & (f != 0)) | ((op >= 0) & (op <= 2) & (f > 1))
    return m, np.where(op == 1, 1 - f, 0.0)[..., 0, 0], clamps[..., 0, 0]


@dataclass
class _Segments:
    """Colour jitter as per-sample affine maps ``z -> m @ z + v @ mean(z)``, each then clamped to [0, 1].

    Slot ``s`` holds each sample's s-th segment (the identity once it has no more);
    ``clamp[i, s]`` says whether the clamp after it can change anything. The only
    constant term is contrast's blend towards a mean gray level, hence ``v``.
    """

    m: np.ndarray  # (B, S, 3, 3)
    v: np.ndarray  # (B, S, 3, 3): dependence on the segment input's channel means
    clamp: np.ndarray  # (B, S) bool
    count: np.ndarray  # (B,) segments per sample


def _jitter_segments(p: PhotometricParams, scale: float, jitter: bool) -> _Segments:
    """Compose each sample's jitter ops into as few clamped affine maps as keep torchvision's result.

    torchvision clamps to [0, 1] after every jitter op; where that clamp cannot change
    anything (:func:`_jitter_ops`) the op merges with the next one into one matrix, so a
    sample's four ops become one to four segments (2.9 on average at SwAV's strengths).
    Contrast blends towards the mean gray level of the image as it is at that point;
    inside a segment that mean is a linear function of the segment input's channel
    means, since the ops before it are linear there. A segment is built as the 3 x 6
    matrix ``[m | v]`` acting on ``[z; mean(z)]``. ``scale`` (uint8 -> [0, 1]) rides on
    the first segment.
    """
    n = p.order.shape[0]
    start = np.zeros((3, 6))
    start[:, :3] = np.eye(3)
    t = np.broadcast_to(start, (n, 3, 6)).copy()
    t[:, :, :3] *= scale
    segs = np.broadcast_to(start, (n, 4, 3, 6)).copy()
    done = np.zeros(n, dtype=np.int64)
    jittered = p.jitter_on.numpy() & jitter
    pending = jittered | (scale != 1.0)  # a segment under construction that is not the identity
    if jittered.any():
        ops, weights, clamps = _jitter_ops(p)
        to_mean = np.zeros((6, 6))  # t @ to_mean: the mean of the current image, [0 | m + v]
        to_mean[:3, 3:] = to_mean[3:, 3:] = np.eye(3)
        contrast = weights[..., None, None] * (np.ones((3, 1)) * np.asarray(GRAY))  # w 1 gray^T
        for pos in range(4):
            t = ops[:, pos] @ t + contrast[:, pos] @ t @ to_mean
            i = np.flatnonzero(clamps[:, pos])
            segs[i, done[i]] = t[i]
            done += clamps[:, pos]
            t = np.where(clamps[:, pos, None, None], start, t)
        pending &= ~jittered | ~clamps[:, 3]
    i = np.flatnonzero(pending)
    segs[i, done[i]] = t[i]
    return _Segments(segs[..., :3], segs[..., 3:], np.arange(4) < done[:, None], done + pending)


def _index_chunks(idx: np.ndarray, size: int, dev: torch.device):
    """``idx`` in pieces of ``size``: a slice where a piece is consecutive (views, no copies), else an index tensor."""
    for lo in range(0, len(idx), size):
        part = idx[lo:lo + size]
        if part[-1] - part[0] == len(part) - 1 and (len(part) == 1 or bool((np.diff(part) == 1).all())):
            yield slice(int(part[0]), int(part[0]) + len(part))
        else:
            yield torch.from_numpy(part).to(dev)


def _affine(z: torch.Tensor, m: torch.Tensor, c: torch.Tensor | None, diagonal: bool,
            out: torch.Tensor) -> torch.Tensor:
    """``m @ z + c`` per sample (z float (B,3,N), m (B,3,3), c (B,3) or None for 0) into ``out``, not ``z``.

    Diagonal matrices (brightness, contrast, normalisation) take a multiply instead of a
    matrix product, which costs about four such passes on CPU.
    """
    if diagonal:
        out = torch.mul(z, torch.diagonal(m, dim1=1, dim2=2)[..., None], out=out)
        return out if c is None else out.add_(c[..., None])
    return torch.bmm(m, z, out=out) if c is None else torch.baddbmm(c[..., None], m, z, out=out)


def _colour(flat: torch.Tensor, y: torch.Tensor, seg: _Segments, gray_on: np.ndarray, mean, std) -> None:
    """Jitter segments, grayscale and normalisation of ``flat`` (B,3,N) into ``y`` (B,3,N) float32.

    Grayscale and the normalisation form one final map, which rides on the last segment
    where no clamp follows it. On CPU the samples go through in chunks of about 1 MiB of
    floats, so a chain stays in the L2 cache; a one-sample chunk (a 224 px view) gets its
    own segment count and the diagonal shortcut for its brightness and contrast segments.
    """
    n, _, npix = flat.shape
    dev = flat.device
    inv_std = 1 / np.asarray(std, dtype=np.float64)
    shift = -np.asarray(mean, dtype=np.float64) * inv_std
    fin = np.where(gray_on[:, None, None], np.ones((3, 1)) * np.asarray(GRAY), np.eye(3)) * inv_std[:, None]
    # per sample and slot: (matrix, mean coefficients), plain or with the final map on it
    maps = {False: (seg.m, seg.v), True: (fin[:, None] @ seg.m, fin[:, None] @ seg.v)}
    diag = {k: (mm * (1 - np.eye(3)) == 0).all((2, 3)).tolist() for k, (mm, _) in maps.items()}
    maps = {k: [t.astype(np.float32) for t in ts] for k, ts in maps.items()}
    fin32, shift32 = fin.astype(np.float32), np.repeat(shift[None].astype(np.float32), n, 0)
    # Python lists: the per-chunk decisions below cost less than with numpy reductions
    count, clamp, has_v = seg.count.tolist(), seg.clamp.tolist(), (seg.v != 0).any((2, 3)).tolist()
    gray = gray_on.tolist()
    chunk = n if dev.type != "cpu" else max(1, CPU_CHUNK_BYTES // (3 * npix * 4))
    scratch = torch.empty(min(chunk, n), 3, npix, device=dev, dtype=torch.float32)
    for lo in range(0, n, chunk):
        sl = slice(lo, min(n, lo + chunk))
        rows = range(sl.start, sl.stop)
        z, pair = flat[sl], (y[sl], scratch[: len(rows)])  # the last stage writes y
        stages = max(count[r] for r in rows)
        fold = stages > 0 and not any(clamp[r][stages - 1] for r in rows)
        stages += not fold
        for s in range(stages):
            dst, other = pair[(stages - 1 - s) % 2], pair[(stages - s) % 2]
            if z.dtype != torch.float32:
                z = other.copy_(z)
            if fold or s < stages - 1:  # a jitter segment
                folded = fold and s == stages - 1
                m, mv = (torch.from_numpy(t[sl, s]).to(dev) for t in maps[folded])
                c = torch.from_numpy(shift32[sl]).to(dev) if folded else None
                if any(has_v[r][s] for r in rows):  # contrast: the segment input's channel means
                    c_mean = (mv @ z.mean(-1)[..., None]).squeeze(-1)
                    c = c_mean if c is None else c + c_mean
                z = _affine(z, m, c, all(diag[folded][r][s] for r in rows), dst)
                if any(clamp[r][s] for r in rows):
                    z.clamp_(0, 1)
            else:
                m, c = (torch.from_numpy(t[sl]).to(dev) for t in (fin32, shift32))
                z = _affine(z, m, c, not any(gray[r] for r in rows), dst)


def _gaussian_kernels(sigma: torch.Tensor, k: int, taps: torch.Tensor | None = None) -> torch.Tensor:
    """(N, k) normalised Gaussian kernels; sample i's cut to its own ``taps[i]`` (odd, <= k) centre taps."""
    x = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    w = torch.exp(-(x[None] ** 2) / (2 * sigma[:, None] ** 2))
    if taps is not None:
        w = torch.where(x[None].abs() <= (taps[:, None] - 1) // 2, w, 0.0)
    return w / w.sum(1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, k: int, out: torch.Tensor | None = None,
                  taps: torch.Tensor | None = None) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (and kernel size ``taps``, default k); x (N,3,H,W) float.

    Reflect padding. Each pass is k shifted multiply-adds over the padded image (on CPU
    faster than a depthwise convolution, whose oneDNN kernels are slow for few
    channels), the vertical pass over the full padded width so that its output is
    already padded for the horizontal one. ``out`` may be ``x``.
    """
    hgt, wid = x.shape[-2:]
    k = min(k, 2 * ((min(hgt, wid) - 1) // 2) + 1)  # reflect padding needs pad < side
    if k < 3:
        return x if out is None else out.copy_(x)
    taps = None if taps is None else taps.clamp(max=k)
    w = _gaussian_kernels(sigma.cpu(), k, taps).to(x.device, x.dtype)[:, :, None, None, None].unbind(1)  # k x (N,1,1,1)
    p = k // 2
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    t = padded[:, :, 0:hgt] * w[0]
    for i in range(1, k):
        t.addcmul_(padded[:, :, i:i + hgt], w[i])
    out = torch.mul(t[..., 0:wid], w[0], out=out)
    for i in range(1, k):
        out.addcmul_(t[..., i:i + wid], w[i])
    return out


def _blur(y: torch.Tensor, v: ViewConfig, p: PhotometricParams) -> None:
    """Gaussian blur, in place, of the samples of ``y`` (B,3,H,W) that ``p`` selects.

    Taps beyond 3 sigma weigh < 0.3%: each sample's kernel stops there (and at the
    view's ``blur_kernel_frac``). On CPU the samples go through in chunks of about 1 MiB,
    sorted by kernel size; a chunk runs its largest kernel, the others' zero-padded.
    """
    n, _, h, w = y.shape
    k_max = int(v.blur_kernel_frac * v.size) // 2 * 2 + 1
    taps = torch.clamp(2 * torch.ceil(3 * p.sigma) + 1, max=k_max).long()
    on = np.flatnonzero(p.blur_on.numpy())
    on = on[np.argsort(taps.numpy()[on], kind="stable")]
    chunk = n if y.device.type != "cpu" else max(1, CPU_CHUNK_BYTES // (3 * h * w * 4))
    for sel in _index_chunks(on, chunk, y.device):
        rows = sel if isinstance(sel, slice) else sel.cpu()
        k = int(taps[rows].max())
        if isinstance(sel, slice):
            gaussian_blur(y[sel], p.sigma[rows], k, out=y[sel], taps=taps[rows])
        else:
            y.index_copy_(0, sel, gaussian_blur(y.index_select(0, sel), p.sigma[rows], k, taps=taps[rows]))


def apply_photometric(x: torch.Tensor, v: ViewConfig, p: PhotometricParams, mean, std) -> torch.Tensor:
    """uint8 (B,H,W,3) or (B,3,H,W), or float in [0, 1] -> normalised float32 (B,3,H,W), the ops of ``p`` applied.

    Colour jitter, grayscale and normalisation run as the few clamped affine maps of
    :func:`_jitter_segments` and :func:`_colour`, exactly torchvision's op-by-op result.
    Blur and solarize follow on the normalised values of the samples they apply to:
    blur commutes exactly with the per-channel affine normalisation, and solarize maps to
    ``c - y`` above a per-channel threshold there, so the result equals blur/solarize
    before normalising.
    """
    if x.dtype == torch.uint8 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    n, _, h, w = x.shape
    dev = x.device
    y = torch.empty(n, 3, h * w, dtype=torch.float32, device=dev)
    seg = _jitter_segments(p, 1 / 255 if x.dtype == torch.uint8 else 1.0, any(s > 0 for s in v.jitter))
    _colour(x.reshape(n, 3, h * w), y, seg, p.gray_on.numpy(), mean, std)
    y = y.reshape(n, 3, h, w)
    _blur(y, v, p)
    sol_idx = p.solarize_on.nonzero().squeeze(1).to(dev)
    if len(sol_idx):
        inv_std = 1 / torch.tensor(std, device=dev, dtype=torch.float32)[None, :, None, None]
        shift = -torch.tensor(mean, device=dev, dtype=torch.float32)[None, :, None, None] * inv_std
        s = y.index_select(0, sol_idx)
        threshold = v.solarize_threshold * inv_std + shift  # in normalised units
        y.index_copy_(0, sol_idx, torch.where(s >= threshold, inv_std + 2 * shift - s, s))
    return y


class Photometric:
    """The batched photometric half of an AugmentConfig; call on the uint8 views of one batch."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg
        self.views = cfg.expanded()

    def __call__(self, views: list[torch.Tensor], *, seed: int, epoch: int, step: int, rank: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(stable_seed("photometric", seed, epoch, step, rank))
        out = []
        for x, v in zip(views, self.views):
            p = sample_photometric(v, x.shape[0], gen, self.cfg.jitter_order == "random")
            out.append(apply_photometric(x, v, p, self.cfg.mean, self.cfg.std))
        return out
