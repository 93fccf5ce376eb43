"""RandAugment, Cutout and shifts: Pillow's op definitions, the parameter distributions, the Photometric hook."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from seerlike.data import augment as aug
from seerlike.data import randaugment as ra
from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.data.randaugment import OPS, RandAugmentConfig, apply_randaugment, sample_randaugment

FILL = (128, 128, 128)


@pytest.fixture(scope="module")
def images(cifar_dir: Path) -> np.ndarray:
    files = sorted(cifar_dir.glob("train/*/*.jpg"))[::500]  # one per class
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def _pillow(img: np.ndarray, name: str, level: float, sign: float) -> np.ndarray:
    """The op as Pillow (FixMatch's and AutoAugment's code) does it, at a level on the 0-10 scale."""
    im = Image.fromarray(img)
    f = 0.1 + 1.8 * level / 10
    k = sign * 0.3 * level / 10
    w, h = im.size
    ops = {
        "identity": lambda: im,
        "autocontrast": lambda: ImageOps.autocontrast(im),
        "equalize": lambda: ImageOps.equalize(im),
        "solarize": lambda: ImageOps.solarize(im, int(256 * (1 - level / 10))),
        "posterize": lambda: ImageOps.posterize(im, int(8 - round(4 * level / 10))),
        "color": lambda: ImageEnhance.Color(im).enhance(f),
        "contrast": lambda: ImageEnhance.Contrast(im).enhance(f),
        "brightness": lambda: ImageEnhance.Brightness(im).enhance(f),
        "sharpness": lambda: ImageEnhance.Sharpness(im).enhance(f),
        "rotate": lambda: im.rotate(sign * 30 * level / 10, fillcolor=FILL),
        "shear_x": lambda: im.transform(im.size, Image.AFFINE, (1, k, 0, 0, 1, 0), fillcolor=FILL),
        "shear_y": lambda: im.transform(im.size, Image.AFFINE, (1, 0, 0, k, 1, 0), fillcolor=FILL),
        "translate_x": lambda: im.transform(im.size, Image.AFFINE, (1, 0, k * w, 0, 1, 0), fillcolor=FILL),
        "translate_y": lambda: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, k * h), fillcolor=FILL),
    }
    return np.asarray(ops[name]())


def _chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


# ---------------------------------------------------------------- op semantics


@pytest.mark.parametrize("name", OPS)
def test_every_op_equals_pillow_on_real_images(images: np.ndarray, name: str) -> None:
    x = _chw(images).float()
    n = len(images)
    for level in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 2.5):
        for sign in (1.0, -1.0):
            want = _chw(np.stack([_pillow(i, name, level, sign) for i in images])).float()
            got = ra.OP_FUNCTIONS[name](x.clone(), torch.full((n,), level, dtype=torch.float64),
                                        torch.full((n,), sign, dtype=torch.float64))
            assert torch.equal(got, want), (name, level, sign, float((got - want).abs().max()))
    if name not in ("identity", "equalize", "autocontrast"):  # every other op changes the images at level 9
        assert not torch.equal(got, x)


def _reference_row(img: np.ndarray, cfg: RandAugmentConfig, p: ra.RandAugmentParams, i: int) -> np.ndarray:
    """One row through Pillow: reflect-pad shift, the drawn ops in slot order, then the Cutout square."""
    h, w = img.shape[:2]
    t = round(cfg.translate * min(h, w))
    dy, dx = (int(v) for v in p.shift[i])
    out = np.pad(img, ((t, t), (t, t), (0, 0)), mode="reflect")[t + dy:t + dy + h, t + dx:t + dx + w]
    for slot in range(cfg.num_ops):
        if p.on[i, slot]:
            out = _pillow(out, cfg.ops[int(p.op[i, slot])], float(p.level[i, slot]), float(p.sign[i, slot]))
    side = round(cfg.cutout * min(h, w))
    if side:
        cy, cx = (int(v) for v in p.centre[i])
        out = out.copy()
        y0, x0 = cy - side // 2, cx - side // 2
        out[max(0, y0):max(0, y0 + side), max(0, x0):max(0, x0 + side)] = 128
    return out


def test_batched_policy_equals_pillow_row_by_row(images: np.ndarray) -> None:
    x = _chw(np.concatenate([images] * 6))  # 60 rows: every op is drawn several times
    cfg = RandAugmentConfig(num_ops=3, magnitude=9, random_magnitude=True, op_p=0.7, cutout=0.5, translate=0.125)
    p = sample_randaugment(cfg, x.shape[0], (32, 32), torch.Generator().manual_seed(3))
    assert set(p.op[p.on].tolist()) == set(range(len(OPS)))
    got = apply_randaugment(x, cfg, p)
    want = np.stack([_reference_row(x[i].permute(1, 2, 0).numpy(), cfg, p, i) for i in range(x.shape[0])])
    assert got.dtype == torch.uint8 and torch.equal(got, _chw(want))
    as_float = apply_randaugment(x.float() / 255, cfg, p)  # float input in [0, 1]: the same levels, as floats
    torch.testing.assert_close(as_float, got.float() / 255, rtol=0, atol=1e-6)


def test_cutout_is_a_gray_square_cut_at_the_borders() -> None:
    x = torch.zeros(3, 3, 10, 12)
    out = ra.cutout(x, torch.tensor([[5, 6], [0, 0], [9, 11]]), side=4)
    assert int((out[0, 0] == ra.GRAY).sum()) == 16 and torch.all(out[0, :, 3:7, 4:8] == ra.GRAY)
    assert int((out[1, 0] == ra.GRAY).sum()) == 4 and torch.all(out[1, :, 0:2, 0:2] == ra.GRAY)
    assert torch.all(out[2, :, 7:, 9:] == ra.GRAY) and int((out[2] != 0).sum()) == 3 * 9  # rows 7-9 x cols 9-11
    assert torch.equal(ra.cutout(x, torch.tensor([[5, 6]] * 3), side=0), x)


def test_shift_is_reflect_padding_then_a_crop() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    d = torch.tensor([[2, -1], [-2, 0]])
    out = ra.shift(x, d, 2)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    for i, (dy, dx) in enumerate(d.tolist()):
        np.testing.assert_array_equal(out[i].numpy(), padded[i, :, 2 + dy:10 + dy, 2 + dx:10 + dx])


# ---------------------------------------------------------------- distributions


def test_sampled_parameters_follow_the_configuration() -> None:
    n, size = 40000, (32, 32)
    cfg = RandAugmentConfig(num_ops=2, magnitude=9, random_magnitude=True, op_p=0.5, cutout=0.5, translate=0.125)
    p = sample_randaugment(cfg, n, size, torch.Generator().manual_seed(0))
    K = len(OPS)

    def chi2(counts: torch.Tensor, expected: float) -> float:
        return float(((counts.double() - expected) ** 2 / expected).sum())

    # chi-square with d degrees of freedom stays below d + 4 sqrt(2d) but for a 1e-4 chance
    for slot in range(2):
        assert chi2(torch.bincount(p.op[:, slot], minlength=K), n / K) < (K - 1) + 4 * math.sqrt(2 * (K - 1))
        levels = p.level[:, slot].long()
        assert levels.min() == 1 and levels.max() == 9 and torch.equal(p.level[:, slot], levels.double())
        assert chi2(torch.bincount(levels, minlength=10)[1:], n / 9) < 8 + 4 * 4
        on = float(p.on[:, slot].double().mean())
        assert abs(on - 0.5) < 4 * math.sqrt(0.25 / n)
        assert set(p.sign[:, slot].tolist()) == {-1.0, 1.0} and abs(float(p.sign[:, slot].mean())) < 4 / math.sqrt(n)
    for axis in range(2):  # whole-pixel shifts in [-4, 4], uniform
        s = p.shift[:, axis]
        assert s.min() == -4 and s.max() == 4
        assert chi2(torch.bincount(s + 4, minlength=9), n / 9) < 8 + 4 * 4
        c = p.centre[:, axis]
        assert c.min() == 0 and c.max() == 31
        assert chi2(torch.bincount(c, minlength=32), n / 32) < 31 + 4 * math.sqrt(62)
    # one uniform per parameter: no correlation between them
    cols = torch.stack([p.op[:, 0], p.op[:, 1], p.level[:, 0], p.level[:, 1], p.on[:, 0], p.sign[:, 1],
                        p.shift[:, 0], p.shift[:, 1], p.centre[:, 0], p.centre[:, 1]]).double()
    assert (torch.corrcoef(cols) - torch.eye(10, dtype=torch.float64)).abs().max() < 0.03
    # a fixed magnitude is M everywhere; op_p 1 applies every drawn op
    fixed = sample_randaugment(RandAugmentConfig(num_ops=2, magnitude=7.5), 100, size, torch.Generator().manual_seed(1))
    assert torch.all(fixed.level == 7.5) and bool(fixed.on.all()) and torch.all(fixed.shift == 0)


def test_configuration_is_checked() -> None:
    assert not RandAugmentConfig().enabled and RandAugmentConfig(cutout=0.5).enabled
    for bad in (dict(num_ops=-1), dict(magnitude=31), dict(op_p=1.5), dict(ops=("blur",)), dict(ops=()),
                dict(cutout=2.0), dict(translate=0.5), dict(random_magnitude=True, magnitude=0.5)):
        with pytest.raises(ValueError, match="randaugment"):
            RandAugmentConfig(**bad)


# ---------------------------------------------------------------- the hook in Photometric


def test_photometric_runs_randaugment_first_and_keeps_other_views_unchanged(images: np.ndarray) -> None:
    strong = RandAugmentConfig(num_ops=2, magnitude=9, random_magnitude=True, op_p=0.5, cutout=0.5)
    plain = dict(size=32, jitter_p=0.0, grayscale_p=0.0)
    cfg = AugmentConfig(views=[ViewConfig(**plain), ViewConfig(**plain, randaugment=strong)])
    x = _chw(images)
    out = aug.Photometric(cfg)([x, x.clone()], seed=1, epoch=0, step=5, rank=0)
    # view 0: only normalisation, exactly as without the new field
    base = aug.Photometric(AugmentConfig(views=[ViewConfig(**plain)]))([x], seed=1, epoch=0, step=5, rank=0)
    torch.testing.assert_close(out[0], base[0], rtol=0, atol=0)
    # view 1: the RandAugment draw of its own seed, then the same normalisation
    gen = torch.Generator().manual_seed(aug.stable_seed("randaugment", 1, 0, 5, 0, 1))
    p = sample_randaugment(strong, x.shape[0], (32, 32), gen)
    mean, std = torch.tensor(aug.IMAGENET_MEAN)[:, None, None], torch.tensor(aug.IMAGENET_STD)[:, None, None]
    want = (apply_randaugment(x, strong, p).float() / 255 - mean) / std
    torch.testing.assert_close(out[1], want, rtol=1e-6, atol=1e-6)
    again = aug.Photometric(cfg)([x, x.clone()], seed=1, epoch=0, step=6, rank=0)
    assert not torch.equal(again[1], out[1]) and torch.equal(again[0], out[0])
