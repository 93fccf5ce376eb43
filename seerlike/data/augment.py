"""Augmentation in two halves: uint8 geometry per sample (workers), photometry per batch (device).

``crop_sample`` runs in a DataLoader worker: decode the image at the smallest size the
crops need (simplejpeg ``min_width/min_height`` or Pillow ``draft``), then per view a
random resized crop and a flip, resized on uint8 (torch's antialiased bilinear, as
Pillow's) and turned upright after the resize (EXIF orientation). Its randomness comes from
``hash(seed, epoch, key)``, never from global RNG state. ``stack_views`` hands over one
uint8 tensor per view group.

``Photometric`` runs in the training process over a whole batch: colour jitter, grayscale,
Gaussian blur, solarize and normalisation. Per view group, one draw of all its rows'
parameters from a CPU ``torch.Generator`` seeded by ``(seed, epoch, step, rank)`` (the same
values on every device, so exact resume holds), host-side planning in numpy, one copy of
the per-row maps to the device, then batched tensor ops: on an accelerator every op over
the whole group at once (a fixed number of launches, no read-back), on CPU the rows in
cache-sized chunks. Colour jitter applies brightness, contrast, saturation and hue in a
random order per row (as torchvision's ``ColorJitter``), each op a per-row 3x3 colour
matrix followed by a clamp to [0, 1]; the ops whose clamp cannot change anything merge
with the next into one matrix, so the result is torchvision's with fewer passes, and the
per-row order costs nothing extra. Hue is a rotation of the chroma plane in YIQ space (as
NVIDIA DALI does) rather than an HSV round trip: the same hue circle, about 10x cheaper.
"""

from __future__ import annotations

import hashlib
import io
import math
import mmap
import warnings
import weakref
from dataclasses import dataclass, field

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

from seerlike.data.randaugment import RandAugmentConfig, randaugment_group
from sharding.process import jpeg_orientation

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
CPU_CHUNK_BYTES = 1 << 19  # photometric ops on CPU work through the batch in chunks of this many float bytes (half an L2)


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
    randaugment: RandAugmentConfig = field(default_factory=RandAugmentConfig)
    """RandAugment, Cutout and pixel shifts before the ops above (seerlike.data.randaugment; off by default)."""

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

def _exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) of an image Pillow has opened."""
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:
        return 1


# per EXIF orientation, what turns the stored pixels upright: (transpose, flip rows, flip columns), in that order
_UPRIGHT = {2: (False, False, True), 3: (False, True, True), 4: (False, True, False), 5: (True, False, False),
            6: (True, False, True), 7: (True, True, True), 8: (True, True, False)}


def _orient_array(a: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation on an (H, W, 3) array, as Pillow's exif_transpose does it."""
    transpose, flip_rows, flip_cols = _UPRIGHT.get(orientation, (False, False, False))
    if transpose:
        a = a.transpose(1, 0, 2)
    return np.ascontiguousarray(a[::-1 if flip_rows else 1, ::-1 if flip_cols else 1])


def _pillow_rgbx(img: Image.Image) -> np.ndarray | None:
    """Pillow's own memory of a decoded RGB image as (H, W, 4) uint8 (its 4th byte is padding), or None.

    Pillow keeps RGB as 4 bytes per pixel; ``np.asarray`` packs them into a new buffer
    (``tobytes``, ~3 ns per pixel: 3 ms for a 1 MP PNG), while its Arrow export (Pillow >=
    11.2) hands its memory over as it is. None where Pillow cannot export the image (stored
    in several blocks: > 16 MiB) or is older.
    """
    try:
        import pyarrow as pa  # here: only workers that meet a non-JPEG image pay its import

        a = pa.array(img)
        flat = a.values.to_numpy(zero_copy_only=True)
    except (ImportError, AttributeError, TypeError, ValueError, NotImplementedError):
        return None
    return flat.reshape(img.height, img.width, 4) if flat.size == img.height * img.width * 4 else None


def _decode(data: bytes, min_side: int, padded: bool) -> tuple[np.ndarray, int]:
    """:func:`decode_stored`; with ``padded`` an image decoded by Pillow may come as (H, W, 4), RGB + padding."""
    if not data:
        raise CorruptSample("empty image bytes")
    if data[:2] == b"\xff\xd8":
        try:
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True,
                                         min_width=min_side, min_height=min_side)
            # the EXIF orientation by a walk over the segment headers (the ingest's parser, ~100x
            # cheaper than asking Pillow)
            return arr, jpeg_orientation(data)
        except (ValueError, RuntimeError):
            pass  # CMYK / odd JPEGs: let Pillow try
    try:
        img = Image.open(io.BytesIO(data))
        if min_side and img.format == "JPEG":
            img.draft("RGB", (min_side, min_side))
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        arr = _pillow_rgbx(rgb) if padded else None
        if arr is None:
            arr = np.asarray(rgb)  # convert copies even RGB
    except Exception as e:
        raise CorruptSample(f"cannot decode image: {type(e).__name__}: {e}") from None
    # after the decode: a PNG's eXIf chunk may follow its pixels, and asked before, Pillow decodes them twice
    return arr, _exif_orientation(img)


def decode_stored(data: bytes, min_side: int = 0) -> tuple[np.ndarray, int]:
    """RGB uint8 (H, W, 3) as stored, decoded at reduced size when the shorter side allows it, and its EXIF orientation.

    JPEG goes through simplejpeg (libjpeg-turbo DCT scaling: the smallest of 1/8..1 keeping
    both sides >= ``min_side``), anything else (PNG, CMYK JPEG, ...) through Pillow (with
    ``draft`` for JPEG). Raises CorruptSample for undecodable bytes.
    """
    return _decode(data, min_side, padded=False)


def decode_array(data: bytes, min_side: int = 0) -> np.ndarray:
    """:func:`decode_stored`, turned upright (EXIF orientation applied)."""
    return _orient_array(*decode_stored(data, min_side))


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


def _read_only_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor over ``a`` without a copy, also when numpy marks it read-only (Pillow's arrays): it is only read."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def crop_views(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator,
               orientation: int = 1) -> list[torch.Tensor]:
    """One uint8 (3, size, size) tensor per expanded view: random resized crop + flip of the upright image.

    ``img`` (H, W, 3) is as stored, with its EXIF ``orientation``: each crop is drawn in
    upright coordinates, cut from the stored pixels and turned upright after the resize
    (which commutes with flips and transposes), so the whole image is never copied to turn
    it. The resize is torch's antialiased bilinear on uint8 (its AVX2 path, made to match
    Pillow's), about 2x faster than Pillow's own on these sizes. ``img`` may also be
    (H, W, 4), RGB and a padding byte (Pillow's layout): all four channels are resized,
    as fast as three, and the fourth dropped (a 3-channel view of it would make every box
    a strided copy, 2x slower).
    """
    transpose, flip_rows, flip_cols = _UPRIGHT.get(orientation, (False, False, False))
    height, width = img.shape[:2]
    up_h, up_w = (width, height) if transpose else (height, width)
    t = _read_only_tensor(img).permute(2, 0, 1)[None]  # (1, 3 or 4, H, W), HWC strides
    out = []
    for v in cfg.expanded():
        x, y, w, h = sample_crop(rng, up_w, up_h, v.scale, v.ratio)
        if flip_rows:  # the box in the transposed-only frame
            y = up_h - y - h
        if flip_cols:
            x = up_w - x - w
        box = t[:, :, x:x + w, y:y + h] if transpose else t[:, :, y:y + h, x:x + w]
        view = F.interpolate(box, size=(v.size, v.size), mode="bilinear", antialias=True, align_corners=False)[0, :3]
        if transpose:
            view = view.transpose(1, 2)
        flips = [d for d, f in ((1, flip_rows), (2, flip_cols != (rng.random() < v.flip_p))) if f]
        out.append((view.flip(flips) if flips else view).contiguous())
    return out


def crop_sample(data: bytes, key: str, cfg: AugmentConfig, seed: int, epoch: int) -> list[torch.Tensor]:
    """Decode one image and cut its views; deterministic in (seed, epoch, key)."""
    img, orientation = _decode(data, cfg.min_decode_side(), padded=True)
    rng = np.random.Generator(np.random.PCG64(stable_seed(seed, epoch, key)))
    return crop_views(img, cfg, rng, orientation)


def stack_views(samples: list[list[torch.Tensor]], cfg: AugmentConfig) -> list[torch.Tensor]:
    """Per view group, the (count x B, 3, S, S) uint8 batch of the samples' crops, view-major.

    What a worker hands over: one tensor per view group, so that the training process
    moves and augments each group as a whole (``Photometric``).
    """
    out, first = [], 0
    for v in cfg.views:
        out.append(torch.stack([s[j] for j in range(first, first + v.count) for s in samples]))
        first += v.count
    return out


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
    """Per-row parameters of one view group of a batch (rows view-major: view 0's samples, then view 1's, ...)."""

    jitter_on: torch.Tensor  # (N,) bool
    factors: torch.Tensor  # (N, 4): brightness, contrast, saturation factors; hue shift
    order: torch.Tensor  # (N, 4) permutation of 0..3
    gray_on: torch.Tensor  # (N,) bool
    blur_on: torch.Tensor  # (N,) bool
    sigma: torch.Tensor  # (N,)
    solarize_on: torch.Tensor  # (N,) bool


def sample_photometric(v: ViewConfig, n: int, gen: torch.Generator, random_order: bool) -> PhotometricParams:
    """Parameters of ``n`` rows from one draw of ``gen``: an (n, 13) block of uniforms, one column per parameter.

    Factors are uniform in [max(0, 1 - s), 1 + s], the hue shift in [-h, h], sigma in
    ``blur_sigma``; the jitter order is the argsort of four uniforms (a uniformly random
    permutation per row); each flag is a uniform below its probability.
    """
    u = torch.rand(n, 13, generator=gen, dtype=torch.float64)
    b, c, s, h = v.jitter
    lo = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h], dtype=torch.float64)
    hi = torch.tensor([1 + b, 1 + c, 1 + s, h], dtype=torch.float64)
    order = torch.argsort(u[:, 5:9], dim=1) if random_order else torch.arange(4).expand(n, 4).clone()
    s_lo, s_hi = v.blur_sigma
    return PhotometricParams(
        jitter_on=u[:, 0] < v.jitter_p,
        factors=(lo + u[:, 1:5] * (hi - lo)).float(),
        order=order,
        gray_on=u[:, 9] < v.grayscale_p,
        blur_on=u[:, 10] < v.blur_p,
        sigma=(s_lo + u[:, 11] * (s_hi - s_lo)).float(),
        solarize_on=u[:, 12] < v.solarize_p,
    )


_GRAY_ROWS = np.ones((3, 1)) * np.asarray(GRAY)  # every channel := the gray level
_YIQ_FROM_RGB = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_RGB_FROM_YIQ = np.linalg.inv(_YIQ_FROM_RGB)
# hue by theta = _HUE[0] + cos(theta) _HUE[1] + sin(theta) _HUE[2]: the YIQ chroma rotation in RGB
_HUE = np.stack([_RGB_FROM_YIQ @ r @ _YIQ_FROM_RGB for r in
                 (np.diag([1.0, 0, 0]), np.diag([0, 1.0, 1]), np.array([[0, 0, 0], [0, 0, -1.0], [0, 1, 0]]))])


def _jitter_ops(p: PhotometricParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row and position: the op's colour matrix (N,4,3,3), contrast weight (N,4) and clamp need (N,4).

    Contrast is ``f * x + (1 - f) * mean(gray(x))``: the matrix holds ``f``, the weight
    ``1 - f`` multiplies the image's mean gray level, known only when the op runs. Hue
    rotates the chroma plane in YIQ space. The clamp to [0, 1] after an op can only
    change an image in [0, 1] after a hue shift or a factor above 1: brightness, contrast
    and saturation with a factor <= 1 map [0, 1] into itself (a scaling, or a convex
    combination with a gray level in [0, 1]).
    """
    order = p.order.numpy()
    op = np.where(p.jitter_on.numpy()[:, None], order, -1)  # (N, 4), -1: no op
    f = np.take_along_axis(p.factors.double().numpy(), order, 1)
    theta = 2 * math.pi * f
    hue = _HUE[0] + np.cos(theta)[..., None, None] * _HUE[1] + np.sin(theta)[..., None, None] * _HUE[2]
    scale = np.where(op < 0, 1.0, f)[..., None, None]  # brightness, contrast, saturation: f I (+ (1 - f) G)
    m = np.where((op == 3)[..., None, None], hue,
                 scale * np.eye(3) + np.where(op == 2, 1 - f, 0.0)[..., None, None] * _GRAY_ROWS)
    clamps = ((op == 3) & (f != 0)) | ((op >= 0) & (op <= 2) & (f > 1))
    return m, np.where(op == 1, 1 - f, 0.0), clamps


def _jitter_segments(p: PhotometricParams, scale: float, jitter: bool):
    """Each row's jitter ops composed into as few clamped affine maps as keep torchvision's result.

    torchvision clamps to [0, 1] after every jitter op; where that clamp cannot change
    anything (:func:`_jitter_ops`) the op merges with the next one into one matrix, so a
    row's four ops become one to four segments (2.9 on average at SwAV's strengths).
    Contrast blends towards the mean gray level of the image as it is at that point;
    inside a segment that mean is a linear function of the segment input's channel
    means, since the ops before it are linear there: a segment is ``z -> m z + v mean(z)``
    (``mean`` per channel); ``scale`` (uint8 -> [0, 1]) rides on the first. Returns ``m``
    and ``v`` (N,4,3,3) per slot (the identity after a row's last segment), whether a
    clamp follows each slot (N,4) and the segment count (N,).
    """
    n = p.order.shape[0]
    start = np.zeros((3, 6))
    start[:, :3] = np.eye(3)
    t = np.broadcast_to(start * scale, (n, 3, 6)).copy()  # the segment under construction: [m | v]
    segs = np.broadcast_to(start, (n, 4, 3, 6)).copy()
    done = np.zeros(n, dtype=np.int64)
    jittered = p.jitter_on.numpy() & jitter
    pending = jittered | (scale != 1.0)  # a segment under construction that is not the identity
    if jittered.any():
        ops, weights, clamps = _jitter_ops(p)
        weights = weights[..., None, None] * _GRAY_ROWS[0]  # (N, 4, 1, 3): w gray^T
        for pos in range(4):
            # the op: a z + w 1 gray^T mean(current image), and mean(current image) = (m + v) mean(z)
            mean_gray = weights[:, pos] @ (t[:, :, :3] + t[:, :, 3:])  # (N, 1, 3)
            t = ops[:, pos] @ t
            t[:, :, 3:] += mean_gray
            i = np.flatnonzero(clamps[:, pos])
            segs[i, done[i]] = t[i]
            done[i] += 1
            t[i] = start
        pending &= ~jittered | ~clamps[:, 3]
    i = np.flatnonzero(pending)
    segs[i, done[i]] = t[i]
    return segs[..., :3], segs[..., 3:], np.arange(4) < done[:, None], done + pending


def _gaussian_kernels(sigma: np.ndarray, k: int, taps: np.ndarray) -> np.ndarray:
    """(N, k) normalised Gaussian kernels, row i cut to its centre ``taps[i]`` (odd, <= k); taps < 3: the identity."""
    x = np.arange(k) - (k - 1) / 2
    w = np.exp(-(x[None] ** 2) / (2 * sigma[:, None] ** 2))
    w = np.where(np.abs(x[None]) <= (np.maximum(taps, 1)[:, None] - 1) // 2, w, 0.0)
    w = w / w.sum(1, keepdims=True)
    return np.where(taps[:, None] >= 3, w, x == 0)


ColourMap = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # matrix (N,3,3), its diagonal (N,3,1), v (N,3,3)


@dataclass
class _Plan:
    """What the ops need per row, from the parameters, computed on the host.

    The maps live on the training device, cut from one table (one host-to-device copy
    per view group); the flags stay on the host (numpy), where they choose which ops run
    without reading anything back from the device.
    """

    plain: list[ColourMap]  # per slot: the jitter segment, v on the segment input's channel sums
    folded: list[ColourMap]  # per slot: the segment followed by grayscale + normalisation
    fin: ColourMap  # grayscale + normalisation (v unused)
    shift: torch.Tensor  # (N, 3, 1) normalisation offset
    blur_w: torch.Tensor  # (N, K) blur kernels (the identity for rows without blur), K = the largest
    sol_threshold: torch.Tensor  # (N, 3, 1, 1) in normalised units; +inf for rows without solarize
    sol_top: torch.Tensor  # (N, 3, 1, 1) solarize maps y to sol_top - y
    # host
    blur_host: np.ndarray  # blur_w on the host
    count: np.ndarray  # (N,) segments per row
    clamp: np.ndarray  # (N, S) a clamp follows the slot
    has_v: np.ndarray  # (N, S)
    diag: np.ndarray  # (N, S) the slot's map is diagonal
    diag_fin: np.ndarray  # (N, S) its map with the final map on it is diagonal
    gray: np.ndarray  # (N,)
    taps: np.ndarray  # (N,) blur kernel size, 0: no blur
    solarize: np.ndarray  # (N,)
    order: np.ndarray | None = None  # plan row i is input row order[i] (sorted plans), else the identity


def _is_diagonal(m: np.ndarray) -> np.ndarray:
    return ~m.reshape(m.shape[:-2] + (9,))[..., [1, 2, 3, 5, 6, 7]].any(-1)


def _diagonal(m: np.ndarray) -> np.ndarray:
    return np.diagonal(m, axis1=-2, axis2=-1)[..., None]


def _plan(p: PhotometricParams, v: ViewConfig, scale: float, mean, std, hw: tuple[int, int],
          device: torch.device, sort_blocks: int = 0) -> _Plan:
    """The plan of the rows of ``p``; with ``sort_blocks`` the rows of each block of that many
    (a view) in the order of ``_Plan.order``: alike rows next to each other (see ``_photometric_into``)."""
    m, mv, clamp, count = _jitter_segments(p, scale, any(s > 0 for s in v.jitter))
    n = count.shape[0]
    slots = int(count.max()) if n else 0
    m, mv, clamp = m[:, :slots], mv[:, :slots] / (hw[0] * hw[1]), clamp[:, :slots]  # mv: on channel sums
    # blur: each row's kernel stops at 3 sigma (taps beyond weigh < 0.3%), at the view's
    # blur_kernel_frac, and below the side (reflect padding needs pad < side)
    cap = min(int(v.blur_kernel_frac * v.size) // 2 * 2 + 1, 2 * ((min(hw) - 1) // 2) + 1)
    sigma = p.sigma.double().numpy()
    taps = np.minimum(2 * np.ceil(3 * sigma) + 1, cap).astype(np.int64)
    taps = np.where(p.blur_on.numpy() & (taps >= 3), taps, 0)
    gray, solarize = p.gray_on.numpy(), p.solarize_on.numpy()
    order = None
    if sort_blocks and n:  # by blur kernel, then by colour stages (segments, + 1 if the last one clamps)
        last = np.take_along_axis(clamp, np.maximum(count - 1, 0)[:, None], 1)[:, 0] if slots else count > 0
        order = np.lexsort((last | (count == 0), count, gray, taps, np.arange(n) // sort_blocks))
        m, mv, clamp, count, sigma, taps, gray, solarize = (a[order] for a in
                                                             (m, mv, clamp, count, sigma, taps, gray, solarize))
    inv_std = 1 / np.asarray(std, dtype=np.float64)
    shift = -np.asarray(mean, dtype=np.float64) * inv_std
    fin = np.where(gray[:, None, None], _GRAY_ROWS, np.eye(3)) * inv_std[:, None]
    m_fin, v_fin = fin[:, None] @ m, fin[:, None] @ mv
    blur_w = _gaussian_kernels(sigma, max(1, int(taps.max()) if n else 1), taps)
    maps = {"m": m, "d": _diagonal(m), "v": mv, "m_fin": m_fin, "d_fin": _diagonal(m_fin), "v_fin": v_fin,
            "fin": fin, "fin_d": _diagonal(fin), "shift": np.broadcast_to(shift[:, None], (n, 3, 1)), "blur_w": blur_w,
            "sol_threshold": np.where(solarize[:, None], v.solarize_threshold * inv_std + shift,
                                      np.inf)[..., None, None],
            "sol_top": np.broadcast_to((inv_std + 2 * shift)[:, None, None], (n, 3, 1, 1))}
    # one table, one copy to the device (asynchronous from pinned memory on CUDA)
    table = np.empty((n, sum(math.prod(t.shape[1:]) for t in maps.values())), dtype=np.float32)
    col, spans = 0, {}
    for name, t in maps.items():
        width = math.prod(t.shape[1:])
        table[:, col:col + width] = t.reshape(n, width)
        spans[name] = (col, width, t.shape[1:])
        col += width
    table = torch.from_numpy(table)
    if device.type != "cpu":
        table = (table.pin_memory() if device.type == "cuda" else table).to(device, non_blocking=True)
    on = {name: table[:, col:col + width].view((n,) + shape) for name, (col, width, shape) in spans.items()}
    plain = list(zip(*(on[k].unbind(1) for k in ("m", "d", "v")))) if slots else []
    folded = list(zip(*(on[k].unbind(1) for k in ("m_fin", "d_fin", "v_fin")))) if slots else []
    return _Plan(plain=plain, folded=folded, fin=(on["fin"], on["fin_d"], on["fin"]), shift=on["shift"],
                 blur_w=on["blur_w"], sol_threshold=on["sol_threshold"], sol_top=on["sol_top"], blur_host=blur_w,
                 count=count, clamp=clamp, has_v=mv.reshape(n, slots, 9).any(-1), diag=_is_diagonal(m),
                 diag_fin=_is_diagonal(m_fin), gray=gray, taps=taps, solarize=solarize, order=order)


@dataclass
class _ChunkOps:
    """The host's choice of ops for one chunk of rows."""

    slots: int  # jitter segments to run
    fold: bool  # grayscale + normalisation ride on the last segment (no row clamps after it)
    diag: list[bool]  # per slot: every row's map is diagonal (a multiply instead of a matrix product)
    diag_fin: bool  # the same for the folded last slot
    has_v: list[bool]  # per slot: some row needs the channel sums (contrast)
    clamp: list[bool]  # per slot: some row clamps after it
    gray: bool  # some row is grayscale
    blur_k: int  # blur kernel size (0: no blur)
    blur_rows: torch.Tensor | None  # the rows to blur when not all (CPU)
    solarize: bool


def _chunk_ops(P: _Plan, bounds: list[tuple[int, int]], every_row: bool) -> list[_ChunkOps]:
    """Per chunk (``bounds``: consecutive plan rows), the ops its rows need: numpy reductions over all chunks."""
    lo, hi = bounds[0][0], bounds[-1][1]
    starts = np.array([a for a, _ in bounds]) - lo
    sizes = np.array([b - a for a, b in bounds])

    def any_(flags: np.ndarray) -> np.ndarray:
        if flags.shape[1:] == (0,):
            return np.zeros((len(bounds), 0), dtype=bool)
        return np.logical_or.reduceat(flags[lo:hi], starts, axis=0)

    slots = np.maximum.reduceat(P.count[lo:hi], starts)
    if P.clamp.shape[1]:
        last = np.maximum(np.repeat(slots, sizes) - 1, 0)[:, None]
        fold = (slots > 0) & ~np.logical_or.reduceat(np.take_along_axis(P.clamp[lo:hi], last, 1)[:, 0], starts)
        diag_fin = np.logical_and.reduceat(np.take_along_axis(P.diag_fin[lo:hi], last, 1)[:, 0], starts)
    else:
        fold = diag_fin = np.zeros(len(bounds), dtype=bool)
    taps = P.taps[lo:hi]
    blurred = np.add.reduceat(taps > 0, starts)
    cols = [slots, fold, ~any_(~P.diag), diag_fin, any_(P.has_v), any_(P.clamp), any_(P.gray[:, None])[:, 0],
            np.maximum.reduceat(taps, starts), blurred == sizes, blurred > 0, any_(P.solarize[:, None])[:, 0]]
    out = []
    for (a, b), (s, f, d, df, hv, cl, g, k, every, some, sol) in zip(bounds, zip(*(c.tolist() for c in cols))):
        rows = None if every or every_row or not some else torch.from_numpy(np.flatnonzero(taps[a - lo:b - lo]))
        out.append(_ChunkOps(slots=s, fold=f, diag=d[:s], diag_fin=df, has_v=hv[:s], clamp=cl[:s], gray=g,
                             blur_k=k if some else 0, blur_rows=rows, solarize=sol))
    return out


class _Workspace:
    """Scratch tensors kept from call to call: fresh memory costs more than the ops on it (see _OutputPool).

    A named buffer grows when a larger shape asks for it; views made before (``blur_views``)
    keep the old one, so each stays consistent.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._views: dict[tuple[str, torch.device, tuple[int, ...]], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], device: torch.device,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
        view = self._views.get((name, device, shape))
        if view is None:
            numel = math.prod(shape)
            buf = self._bufs.get((name, device))
            if buf is None or buf.numel() < numel:
                buf = self._bufs[(name, device)] = torch.empty(numel, device=device, dtype=dtype)
                self._views = {k: t for k, t in self._views.items() if k[:2] != (name, device)}
            view = self._views[(name, device, shape)] = buf[:numel].view(shape)
        return view

    def blur_views(self, shape: tuple[int, ...], k: int, device: torch.device):
        """The padded input of a blur of (n,3,h,w) rows with k taps, its k row-shifted views, the vertical
        pass's output and its k column-shifted views: made once per shape and k, then reused."""
        key = ("blur views", device, shape + (k,))
        views = self._views.get(key)
        if views is None:
            n, c, h, w = shape
            p = k // 2
            padded = self.get("blur_pad", (n, c, h + 2 * p, w + 2 * p), device)
            t = self.get("blur_v", (n, c, h, w + 2 * p), device)
            views = self._views[key] = (padded, [padded[:, :, i:i + h] for i in range(k)], t,
                                        [t[..., i:i + w] for i in range(k)])
        return views


class _Cut:
    """Chunk ``ci``'s rows of per-row tensors (plan rows ``starts[ci]`` to ``starts[ci] + sizes[ci]``)."""

    def __init__(self, starts: list[int], sizes: list[int]):
        self.bounds = [slice(a, a + n) for a, n in zip(starts, sizes)]

    def __call__(self, t: torch.Tensor, ci: int) -> torch.Tensor:
        return t[self.bounds[ci]]


def _colour(z: torch.Tensor, y: torch.Tensor, scratch: torch.Tensor, P: _Plan, cut: _Cut, ci: int,
            ops: _ChunkOps) -> None:
    """Jitter segments, grayscale and normalisation of chunk ``ci``: ``z`` (n,3,P) uint8 or float -> ``y`` float32.

    Each stage is ``m @ z + c`` per row, a multiply where every map of the chunk is
    diagonal (a matrix product costs about three multiplies on CPU; a multiply also
    reads uint8 directly), then a clamp where some row needs one. The stages alternate
    between ``y`` and ``scratch`` so that the last one writes ``y``; grayscale and
    normalisation form one final map, folded into the last segment where no clamp follows.
    """
    stages = ops.slots + (not ops.fold)
    bufs = (y, scratch)
    for s in range(stages):
        dst, other = bufs[(stages - 1 - s) % 2], bufs[(stages - s) % 2]
        if s < ops.slots:  # a jitter segment
            folded = ops.fold and s == stages - 1
            m, d, v = (P.folded if folded else P.plain)[s]
            shift, diagonal, has_v = P.shift if folded else None, ops.diag_fin if folded else ops.diag[s], ops.has_v[s]
        else:  # grayscale + normalisation
            (m, d, v), shift, diagonal, has_v = P.fin, P.shift, not ops.gray, False
        if z.dtype != torch.float32 and (has_v or not diagonal):
            z = other.copy_(z)
        c = cut(shift, ci) if shift is not None else None
        if has_v:  # contrast: a constant from the segment input's channel sums
            sums = z.sum(-1, keepdim=True)
            c = torch.bmm(cut(v, ci), sums) if c is None else torch.baddbmm(c, cut(v, ci), sums)
        if diagonal:  # a multiply and an add beat one fused multiply-add with a broadcast offset on CPU
            z = torch.mul(z, cut(d, ci), out=dst)
            if c is not None:
                z.add_(c)
        else:
            z = torch.bmm(cut(m, ci), z, out=dst) if c is None else torch.baddbmm(c, cut(m, ci), z, out=dst)
        if s < ops.slots and ops.clamp[s]:
            z.clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, w: torch.Tensor | list[float], out: torch.Tensor | None = None,
                  work: _Workspace | None = None) -> torch.Tensor:
    """Separable Gaussian blur of x (n,3,H,W) float with per-row kernels ``w`` (n,k), k odd; reflect padding.

    ``w`` may also be one kernel as a list of floats, for every row. Each pass is k
    shifted multiply-adds over the padded image (on CPU faster than a depthwise
    convolution, whose oneDNN kernels are slow for few channels, and than banded matrix
    products), the vertical pass over the full padded width so that its output is
    already padded for the horizontal one. ``out`` may be ``x``.
    """
    n, _, h, wd = x.shape
    k = len(w) if isinstance(w, list) else w.shape[1]
    work = work or _Workspace()
    padded, vertical, t, horizontal = work.blur_views((n, 3, h, wd), k, x.device)
    torch.ops.aten.reflection_pad2d.out(x, [k // 2] * 4, out=padded)
    if isinstance(w, list):
        torch.mul(vertical[0], w[0], out=t)
        for i in range(1, k):
            t.add_(vertical[i], alpha=w[i])
        out = torch.mul(horizontal[0], w[0], out=out)
        for i in range(1, k):
            out.add_(horizontal[i], alpha=w[i])
        return out
    taps = w.to(x.dtype)[:, :, None, None, None].unbind(1)  # k x (n,1,1,1)
    torch.mul(vertical[0], taps[0], out=t)
    for i in range(1, k):
        t.addcmul_(vertical[i], taps[i])
    out = torch.mul(horizontal[0], taps[0], out=out)
    for i in range(1, k):
        out.addcmul_(horizontal[i], taps[i])
    return out


def _blur(y: torch.Tensor, P: _Plan, cut: _Cut, ci: int, a: int, ops: _ChunkOps, work: _Workspace) -> None:
    """Gaussian blur, in place, of the rows of ``y`` (chunk ``ci``, from plan row ``a``) that have one.

    A one-row chunk on CPU takes its kernel as Python floats (no per-tap tensors); a
    chunk with only some rows blurred blurs a gathered copy of those rows.
    """
    k = ops.blur_k
    off = (P.blur_w.shape[1] - k) // 2  # kernels are centred: a smaller one is the middle columns
    if ops.blur_rows is None:
        one_row = y.shape[0] == 1 and y.device.type == "cpu"
        w = P.blur_host[a, off:off + k].tolist() if one_row else cut(P.blur_w, ci)[:, off:off + k]
        gaussian_blur(y, w, out=y, work=work)
        return
    rows = ops.blur_rows.to(y.device)
    picked = torch.index_select(y, 0, rows, out=work.get("blur_rows", (len(rows),) + y.shape[1:], y.device))
    w = cut(P.blur_w, ci)[:, off:off + k].index_select(0, rows)
    y.index_copy_(0, rows, gaussian_blur(picked, w, out=picked, work=work))


def _solarize(y: torch.Tensor, P: _Plan, cut: _Cut, ci: int) -> None:
    """Solarize, in place, in normalised units: ``top - y`` at or above each row's threshold (+inf: off)."""
    torch.where(y >= cut(P.sol_threshold, ci), cut(P.sol_top, ci) - y, y, out=y)


def _chunks(n: int, rows_per_chunk: int) -> list[int]:
    """The sizes of ``n`` rows cut into nearly equal consecutive chunks of at most ``rows_per_chunk``."""
    pieces = -(-n // max(1, rows_per_chunk))
    return [n * (i + 1) // pieces - n * i // pieces for i in range(pieces)]


def _photometric_into(x: torch.Tensor, y: torch.Tensor, P: _Plan, row0: int, every_row: bool,
                      work: _Workspace) -> None:
    """The photometric ops of ``x`` (n,3,H,W uint8, or float in [0, 1]) into ``y`` (n,3,H,W float32).

    Row i of ``x`` is plan row ``row0 + i`` (or, for a sorted plan, the plan row that names
    it in ``P.order``). With ``every_row`` (accelerators) the rows go through as one chunk
    and every op runs on all of them (identity parameters where a row has no such op): a
    fixed number of launches, no data-dependent shapes. On CPU they go through in chunks of
    about ``CPU_CHUNK_BYTES`` of floats, each chunk through colour, blur and solarize while
    it is in the cache, with only the ops its rows need; where a chunk holds several rows,
    the plan sorts them so that a chunk's rows need the same ops (same blur kernel, same
    number of colour stages) and the rows go through in that order.
    """
    n, _, h, w = x.shape
    if n == 0:
        return
    out = y
    if P.order is not None:  # a sorted plan: gather the rows in its order, scatter the result back
        rows = P.order[row0:row0 + n] - row0
        x = torch.index_select(x, 0, torch.from_numpy(rows),
                               out=work.get("sorted_in", tuple(x.shape), x.device, x.dtype))
        y = work.get("sorted_out", tuple(y.shape), y.device)
    sizes = _chunks(n, n if every_row else CPU_CHUNK_BYTES // (3 * h * w * 4))
    starts = [row0 + sum(sizes[:i]) for i in range(len(sizes))]
    cut = _Cut(starts, sizes)
    chunk_ops = _chunk_ops(P, [(a, a + size) for a, size in zip(starts, sizes)], every_row)
    xs, ys, ys4 = x.reshape(n, 3, h * w).split(sizes), y.view(n, 3, h * w).split(sizes), y.split(sizes)
    for ci, (a, size, ops) in enumerate(zip(starts, sizes, chunk_ops)):
        _colour(xs[ci], ys[ci], work.get("colour", (size, 3, h * w), y.device), P, cut, ci, ops)
        if ops.blur_k:
            _blur(ys4[ci], P, cut, ci, a, ops, work)
        if ops.solarize:
            _solarize(ys4[ci], P, cut, ci)
    if P.order is not None:
        torch.index_select(y, 0, torch.from_numpy(np.argsort(rows)), out=out)


_HUGE_PAGE = 2 << 20


def _new_cpu_buffer(nbytes: int) -> mmap.mmap:
    """Private anonymous memory of ``nbytes`` + 2 MiB (to align a tensor to huge pages), advised for huge pages."""
    buf = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared: no THP
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # THP unavailable: plain pages
        pass
    return buf


def _float_tensor_on(buf: mmap.mmap, shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor of ``shape`` on ``buf``, 2 MiB-aligned; its storage keeps ``buf`` alive."""
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    start = -raw.data_ptr() % _HUGE_PAGE
    return raw[start:start + math.prod(shape) * 4].view(torch.float32).view(shape)


class _OutputPool:
    """Float32 CPU outputs whose memory is reused once no tensor holds it any more.

    A batch's output is new memory every step, and on the KVM guest measured here
    faulting fresh pages in costs ~0.8 ms per MB (~0.4 with 2 MiB pages), more than all
    the arithmetic on it (docs/benchmarks.md, "Multi-crop augmentation per view group").
    A buffer is handed out again only when the weak reference to the storage over it is
    dead, i.e. no tensor (view, autograd's saved input, ...) uses it; at most ``keep``
    buffers of each size are kept (two batches' worth: the one in use and the next).
    """

    def __init__(self) -> None:
        self._bufs: dict[int, list[tuple[mmap.mmap, weakref.ref]]] = {}

    def tensor(self, shape: tuple[int, ...], keep: int) -> torch.Tensor:
        nbytes = math.prod(shape) * 4
        if nbytes < _HUGE_PAGE:
            return torch.empty(shape)
        bufs = self._bufs.setdefault(nbytes, [])
        for i, (buf, storage) in enumerate(bufs):
            if storage() is None:
                break
        else:
            buf, i = _new_cpu_buffer(nbytes), len(bufs)
            if i >= keep:
                return _float_tensor_on(buf, shape)
            bufs.append((buf, None))
        out = _float_tensor_on(buf, shape)
        bufs[i] = (buf, weakref.ref(out.untyped_storage()))
        return out


def apply_photometric(x: torch.Tensor, v: ViewConfig, p: PhotometricParams, mean, std, *,
                      every_row: bool | None = None) -> torch.Tensor:
    """uint8 (N,H,W,3) or (N,3,H,W), or float in [0, 1] -> normalised float32 (N,3,H,W), the ops of ``p`` applied.

    Colour jitter, grayscale and normalisation run as the few clamped affine maps of
    :func:`_jitter_segments`, exactly torchvision's op-by-op result. Blur and solarize
    follow on the normalised values: blur commutes exactly with the per-channel affine
    normalisation, and solarize maps to ``top - y`` above a per-channel threshold there,
    so the result equals blur/solarize before normalising. ``every_row`` picks the
    accelerator form of the ops (default: on any device but the CPU).
    """
    if x.dtype == torch.uint8 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    n, _, h, w = x.shape
    dev = x.device
    every_row = dev.type != "cpu" if every_row is None else every_row
    plan = _plan(p, v, 1 / 255 if x.dtype == torch.uint8 else 1.0, mean, std, (h, w), dev)
    y = torch.empty(n, 3, h, w, device=dev)
    _photometric_into(x, y, plan, 0, every_row, _Workspace())
    return y


class Photometric:
    """The batched photometric half of an AugmentConfig; call on the uint8 crops of one batch.

    Per view group: one draw of the parameters of all its rows from a generator seeded by
    ``(seed, epoch, step, rank)`` (a CPU generator, so that every device gets the same
    values and resume is exact), one host-to-device copy of the per-row maps, then the
    ops on the whole group (``every_row``, the default on accelerators) or in cache-sized
    chunks of each view (CPU). No per-sample Python, no read-back from the device.
    ``every_row`` forces either form (tests run the accelerator form on CPU).
    """

    def __init__(self, cfg: AugmentConfig, *, every_row: bool | None = None):
        self.cfg = cfg
        self.every_row = every_row
        self._pool = _OutputPool()
        self._work = _Workspace()
        self._views_of_size: dict[int, int] = {}
        for v in cfg.views:
            self._views_of_size[v.size] = self._views_of_size.get(v.size, 0) + v.count

    def groups(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The uint8 crops per view group (count x B rows, view-major), from per-group or per-view tensors."""
        groups = self.cfg.views
        if len(views) == len(groups):  # per group (the same as per view when every count is 1)
            for x, v in zip(views, groups):
                if x.shape[0] % v.count:
                    raise ValueError(f"a view group of {v.count} views got {x.shape[0]} rows, not a multiple")
            return list(views)
        if len(views) != self.cfg.num_views:
            raise ValueError(f"expected {len(groups)} view groups or {self.cfg.num_views} views, got {len(views)}")
        out, i = [], 0
        for v in groups:
            out.append(torch.cat(views[i:i + v.count]))
            i += v.count
        return out

    def __call__(self, views: list[torch.Tensor], *, seed: int, epoch: int, step: int, rank: int) -> list[torch.Tensor]:
        """Normalised float32 (B,3,S,S) per view, in AugmentConfig view order."""
        gen = torch.Generator().manual_seed(stable_seed("photometric", seed, epoch, step, rank))
        out = []
        for group, (x, v) in enumerate(zip(self.groups(views), self.cfg.views)):
            p = sample_photometric(v, x.shape[0], gen, self.cfg.jitter_order == "random")
            # its own generator: views without RandAugment draw exactly what they drew before
            x = randaugment_group(x, v.randaugment, stable_seed("randaugment", seed, epoch, step, rank, group))
            out.extend(self.apply_group(x, v, p))
        return out

    def apply_group(self, x: torch.Tensor, v: ViewConfig, p: PhotometricParams) -> list[torch.Tensor]:
        """The ops of ``p`` on one view group's crops ``x`` (count x B rows); one float32 tensor per view."""
        n, _, h, w = x.shape
        dev = x.device
        every_row = dev.type != "cpu" if self.every_row is None else self.every_row
        b = n // v.count
        sort = not every_row and CPU_CHUNK_BYTES // (3 * h * w * 4) > 1  # chunks of several rows: alike rows together
        plan = _plan(p, v, 1 / 255 if x.dtype == torch.uint8 else 1.0, self.cfg.mean, self.cfg.std, (h, w), dev,
                     sort_blocks=b if sort else 0)
        if every_row:  # one pass of every op over the group
            y = torch.empty(n, 3, h, w, device=dev)
            _photometric_into(x, y, plan, 0, True, self._work)
            return list(y.view(v.count, b, 3, h, w).unbind(0))
        out = []
        for i in range(v.count):  # on CPU each view is its own output, from the pool (see _OutputPool)
            y = self._pool.tensor((b, 3, h, w), keep=2 * self._views_of_size[v.size])
            _photometric_into(x[i * b:(i + 1) * b], y, plan, i * b, False, self._work)
            out.append(y)
        return out
