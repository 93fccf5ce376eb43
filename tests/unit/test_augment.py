"""Augmentation: parameter distributions, op semantics, decode, determinism."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from seerlike.data import augment as aug
from seerlike.data.augment import (GRAY, AugmentConfig, PhotometricParams, ViewConfig, apply_photometric,
                                   byol_views, crop_sample, decode, sample_crop, sample_photometric, swav_multicrop)


# ---------------------------------------------------------------- distributions


def test_crop_area_and_aspect_follow_the_recipe() -> None:
    rng = np.random.default_rng(0)
    W, H = 640, 480
    for scale in [(0.14, 1.0), (0.05, 0.14), (0.08, 1.0)]:
        areas, logr = [], []
        for _ in range(3000):
            x, y, w, h = sample_crop(rng, W, H, scale, (3 / 4, 4 / 3))
            assert 0 <= x and x + w <= W and 0 <= y and y + h <= H
            areas.append(w * h / (W * H))
            logr.append(math.log(w / h))
        areas, logr = np.array(areas), np.array(logr)
        # rounding to whole pixels moves an area by < 1%
        assert areas.min() >= scale[0] * 0.98 and areas.max() <= scale[1] * 1.01
        assert abs(areas.mean() - (scale[0] + scale[1]) / 2) < 0.03 * scale[1] + 0.005 or scale[1] == 1.0
        assert logr.min() >= math.log(3 / 4) - 0.02 and logr.max() <= math.log(4 / 3) + 0.02
        if scale[1] < 0.5:  # no rejections: the aspect is exactly the log-uniform proposal
            assert abs(logr.mean()) < 0.01
            assert abs(logr.std() - 2 * math.log(4 / 3) / math.sqrt(12)) < 0.01
    # small crops never fall back; their mean area is the middle of the range
    areas = [np.prod(sample_crop(rng, W, H, (0.05, 0.14), (3 / 4, 4 / 3))[2:]) / (W * H) for _ in range(3000)]
    assert abs(np.mean(areas) - 0.095) < 0.004


def test_jitter_factors_and_probabilities_follow_the_recipe() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 20000
    swav = swav_multicrop().views[0]
    assert swav.jitter == pytest.approx((0.64, 0.64, 0.64, 0.16))
    for v in [swav, byol_views().views[0], byol_views().views[1]]:
        p = sample_photometric(v, n, gen, True)
        b, c, s, h = v.jitter
        for j, strength in enumerate((b, c, s)):
            f = p.factors[:, j]
            assert f.min() >= 1 - strength - 1e-6 and f.max() <= 1 + strength + 1e-6
            assert abs(float(f.mean()) - 1) < 0.01
            assert abs(float(f.std()) - 2 * strength / math.sqrt(12)) < 0.01
        hue = p.factors[:, 3]
        assert hue.min() >= -h - 1e-6 and hue.max() <= h + 1e-6 and abs(float(hue.mean())) < 0.005
        for got, want in [(p.jitter_on, v.jitter_p), (p.gray_on, v.grayscale_p), (p.blur_on, v.blur_p),
                          (p.solarize_on, v.solarize_p)]:
            assert abs(float(got.float().mean()) - want) < 0.015
        assert p.sigma.min() >= 0.1 - 1e-6 and p.sigma.max() <= 2.0 + 1e-6
        assert abs(float(p.sigma.mean()) - 1.05) < 0.02
        # random order: every op lands in every position about equally often
        first = torch.bincount(p.order[:, 0], minlength=4).float() / n
        assert torch.allclose(first, torch.full((4,), 0.25), atol=0.02)
        assert torch.equal(p.order.sort(1).values, torch.arange(4).expand(n, 4))


def test_recipes_have_the_paper_settings() -> None:
    swav = swav_multicrop()
    assert [(v.count, v.size, v.scale) for v in swav.views] == [(2, 224, (0.14, 1.0)), (6, 96, (0.05, 0.14))]
    assert all(v.jitter_p == 0.8 and v.grayscale_p == 0.2 and v.blur_p == 0.5 and v.blur_sigma == (0.1, 2.0)
               and v.flip_p == 0.5 for v in swav.views)
    v1, v2 = byol_views().views
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert v1.scale == v2.scale == (0.08, 1.0) and v1.jitter == (0.4, 0.4, 0.2, 0.1)
    with pytest.raises(ValueError, match="scale"):
        ViewConfig(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="probability"):
        ViewConfig(blur_p=1.5)


# ---------------------------------------------------------------- op semantics


def _params(n: int, **kw) -> PhotometricParams:
    off = torch.zeros(n, dtype=torch.bool)
    base = dict(jitter_on=off, factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(n, 1),
                order=torch.arange(4).repeat(n, 1), gray_on=off, blur_on=off, sigma=torch.ones(n), solarize_on=off)
    base.update(kw)
    return PhotometricParams(**base)


def _run(x01: torch.Tensor, p: PhotometricParams, v: ViewConfig | None = None) -> torch.Tensor:
    """Photometric ops on [0, 1] images with identity normalisation."""
    v = v or ViewConfig(size=x01.shape[-1])
    return apply_photometric(x01, v, p, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (torch.tensor(GRAY)[None, :, None, None] * x).sum(1, keepdim=True)


def test_jitter_ops_match_their_definitions() -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    on = torch.ones(4, dtype=torch.bool)
    f = torch.tensor([0.6, 1.3, 0.9, 1.5])

    def only(op: int) -> PhotometricParams:
        factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(4, 1)
        factors[:, op] = f if op < 3 else f - 1.0
        return _params(4, jitter_on=on, factors=factors)

    torch.testing.assert_close(_run(x, only(0)), (x * f[:, None, None, None]).clamp(0, 1))
    m = _gray(x).mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(_run(x, only(1)), (f[:, None, None, None] * x + (1 - f[:, None, None, None]) * m).clamp(0, 1))
    torch.testing.assert_close(_run(x, only(2)), (f[:, None, None, None] * x + (1 - f[:, None, None, None]) * _gray(x)).clamp(0, 1))
    # hue: a rotation of the chroma plane keeps luma (where nothing clips) and a full turn is the identity
    mid = 0.25 + 0.5 * x
    hued = _run(mid, only(3))
    assert not torch.allclose(hued, mid, atol=1e-3)
    inside = (hued > 0) & (hued < 1)
    assert inside.all(1).float().mean() > 0.5
    torch.testing.assert_close(_gray(hued)[inside.all(1, keepdim=True)], _gray(mid)[inside.all(1, keepdim=True)],
                               atol=2e-3, rtol=0)
    full_turn = _params(4, jitter_on=on, factors=torch.tensor([[1.0, 1.0, 1.0, 0.5]]).repeat(4, 1))
    pale = 0.4 + 0.2 * x  # little chroma: the half turns never clip
    torch.testing.assert_close(_run(_run(pale, full_turn), full_turn), pale, atol=1e-5, rtol=0)
    # samples with jitter off are untouched
    p = only(0)
    p.jitter_on = torch.tensor([True, False, True, False])
    out = _run(x, p)
    torch.testing.assert_close(out[1], x[1])
    torch.testing.assert_close(out[0], (x[0] * f[0]).clamp(0, 1))


def test_jitter_order_is_per_sample_and_matters() -> None:
    x = torch.rand(2, 3, 8, 8)
    on = torch.ones(2, dtype=torch.bool)
    factors = torch.tensor([[1.8, 0.3, 1.0, 0.0]]).repeat(2, 1)
    order = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3]])  # brightness first vs contrast first
    out = _run(x, _params(2, jitter_on=on, factors=factors, order=order))
    b_then_c = _run(_run(x, _params(2, jitter_on=on, factors=torch.tensor([[1.8, 1.0, 1.0, 0.0]]).repeat(2, 1))),
                    _params(2, jitter_on=on, factors=torch.tensor([[1.0, 0.3, 1.0, 0.0]]).repeat(2, 1)))
    torch.testing.assert_close(out[0], b_then_c[0])
    assert not torch.allclose(out[1], b_then_c[1], atol=1e-3)


def _jitter_op_by_op(x01: torch.Tensor, p: PhotometricParams) -> torch.Tensor:
    """torchvision's ColorJitter semantics, one sample and one op at a time, clamping after each op."""
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
    out = []
    for i in range(x01.shape[0]):
        z = x01[i].double()
        for op in p.order[i].tolist() if p.jitter_on[i] else []:
            f = float(p.factors[i, op])
            if op == 0:
                z = f * z
            elif op == 1:
                z = f * z + (1 - f) * _gray(z[None]).mean()
            elif op == 2:
                z = f * z + (1 - f) * _gray(z[None])[0]
            else:
                cos, sin = math.cos(2 * math.pi * f), math.sin(2 * math.pi * f)
                rot = torch.tensor([[1, 0, 0], [0, cos, -sin], [0, sin, cos]], dtype=torch.float64)
                z = torch.einsum("ij,jhw->ihw", torch.linalg.inv(yiq) @ rot @ yiq, z)
            z = z.clamp(0, 1)
        out.append(z)
    return torch.stack(out).float()


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30])  # one sample per chunk (CPU shortcuts) / whole batch (GPU path)
def test_fused_jitter_matches_op_by_op(monkeypatch, chunk_bytes: int) -> None:
    # merged segments and the analytic contrast means must give the clamp-after-every-op result
    monkeypatch.setattr(aug, "CPU_CHUNK_BYTES", chunk_bytes)
    gen = torch.Generator().manual_seed(7)
    v = ViewConfig(size=12, jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, grayscale_p=0.3)
    p = sample_photometric(v, 48, gen, True)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for top in (255, 128):  # full-range and dim images
        x = torch.randint(0, top + 1, (48, 3, 12, 12), dtype=torch.uint8, generator=gen)
        ref = _jitter_op_by_op(x.float() / 255, p)
        assert ((ref == 0) | (ref == 1)).float().mean() > 0.05  # the clamps do bite
        ref = torch.where(p.gray_on[:, None, None, None], _gray(ref).expand(-1, 3, -1, -1), ref)
        ref = (ref - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        torch.testing.assert_close(apply_photometric(x, v, p, mean, std), ref, atol=2e-5, rtol=0)


def test_grayscale_blur_solarize_normalise() -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32)
    g = _run(x, _params(3, gray_on=torch.tensor([True, False, True])))
    torch.testing.assert_close(g[0], _gray(x)[0].expand(3, -1, -1))
    torch.testing.assert_close(g[1], x[1])
    # blur: against a plain 2D convolution with the outer-product kernel, reflect padding
    sigma = torch.tensor([0.5, 1.0, 2.0])
    v = ViewConfig(size=32, blur_kernel_frac=0.5)
    b = _run(x, _params(3, blur_on=torch.ones(3, dtype=torch.bool), sigma=sigma), v)
    for i in range(3):
        k = 17  # the full size/2 kernel; ours stops at 3 sigma, which moves a pixel by < 0.3%
        t = torch.arange(k) - k // 2
        w = torch.exp(-(t.float() ** 2) / (2 * sigma[i] ** 2))
        w = w / w.sum()
        ref = F.conv2d(F.pad(x[i : i + 1], (k // 2,) * 4, mode="reflect"), (w[:, None] * w[None]).expand(3, 1, k, k),
                       groups=3)
        torch.testing.assert_close(b[i : i + 1], ref, atol=3e-3, rtol=0)
        assert (b[i : i + 1] - ref).abs().mean() < 3e-4
    s = _run(x, _params(3, solarize_on=torch.tensor([True, False, False])), ViewConfig(size=32, solarize_threshold=0.5))
    torch.testing.assert_close(s[0], torch.where(x[0] >= 0.5, 1 - x[0], x[0]))
    torch.testing.assert_close(s[1], x[1])
    # normalisation and the uint8 input path (B, H, W, 3)
    u8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = apply_photometric(u8, ViewConfig(size=32), _params(3), mean, std)
    ref = (u8.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(out, ref)
    assert out.dtype == torch.float32 and out.is_contiguous()


def test_photometric_is_deterministic_in_seed_epoch_step_rank() -> None:
    cfg = AugmentConfig(views=[ViewConfig(count=2, size=16, blur_p=0.5, solarize_p=0.5)])
    ph = aug.Photometric(cfg)
    views = [torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8) for _ in range(2)]
    a = ph(views, seed=1, epoch=0, step=3, rank=0)
    torch.manual_seed(123)  # global RNG state must not matter
    b = ph(views, seed=1, epoch=0, step=3, rank=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = ph(views, seed=1, epoch=0, step=4, rank=0)
    d = ph(views, seed=1, epoch=0, step=3, rank=1)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])


# ---------------------------------------------------------------- decode and crops


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_decode_reduces_size_but_keeps_the_shorter_side(photos_dir: Path) -> None:
    big = max((p for p in photos_dir.glob("*.jpg")), key=lambda p: p.stat().st_size)
    data = big.read_bytes()
    full = decode(data, 0)
    small = decode(data, 300)
    assert min(small.size) >= 300 and small.width * small.height < full.width * full.height / 3
    assert abs(small.width / small.height - full.width / full.height) < 0.02


def test_decode_applies_exif_orientation_and_handles_cmyk_gray_png(photos_dir: Path) -> None:
    import csv

    rows = list(csv.DictReader(open(photos_dir / "manifest.csv")))
    checked = set()
    for row in rows:
        path = photos_dir / row["file"] if "file" in row else photos_dir / row[next(iter(row))]
        if not path.exists() or path.stat().st_size > 3_000_000:
            continue
        data = path.read_bytes()
        img = decode(data, 0)
        ref = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        assert img.mode == "RGB" and img.size == ref.size, path.name
        # decoders differ by a few levels; a wrong rotation or flip differs by far more
        diff = np.abs(np.asarray(img, dtype=np.int16) - np.asarray(ref.convert("RGB"), dtype=np.int16))
        assert diff.mean() < 6, path.name
        checked.add(ref.mode if ref.mode in ("CMYK", "L") else path.suffix.lower())
        if ref.mode == "RGB" and path.suffix.lower() == ".png":
            assert np.array_equal(np.asarray(img), np.asarray(ref))
    assert {"CMYK", "L", ".jpg", ".png"} <= checked


def test_corrupt_bytes_raise_corrupt_sample() -> None:
    good = _jpeg(Image.new("RGB", (64, 48), (200, 10, 10)))
    for bad in [b"", b"not an image", good[:30], b"\xff\xd8" + b"\x00" * 100]:
        with pytest.raises(aug.CorruptSample):
            decode(bad, 32)


def _png(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **save)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA", "I;16"])
@pytest.mark.parametrize("export", [True, False])  # Pillow's own memory / no export (older Pillow, large images)
def test_crops_of_pillow_decodes_equal_those_of_the_rgb_conversion(monkeypatch, mode: str, export: bool) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    img = Image.fromarray(rgb).convert(mode) if mode != "I;16" else Image.fromarray(rgb[..., 0].astype(np.uint16) * 7)
    data = _png(img)
    if not export:
        import pyarrow as pa

        def no_export(*a, **k):
            raise pa.ArrowInvalid("no export")
        monkeypatch.setattr(pa, "array", no_export)
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    padded, orientation = aug._decode(data, 0, padded=True)
    assert padded.shape == want.shape[:2] + ((4,) if export else (3,)) and orientation == 1
    assert np.array_equal(padded[..., :3], want)
    stored = aug.decode_stored(data)[0]
    assert np.array_equal(stored, want) and stored.flags.c_contiguous
    cfg = AugmentConfig(views=[ViewConfig(count=3, size=16, scale=(0.2, 1.0))])
    got = crop_sample(data, "k", cfg, 0, 0)
    rng = np.random.Generator(np.random.PCG64(aug.stable_seed(0, 0, "k")))
    for a, b in zip(got, aug.crop_views(want, cfg, rng)):
        assert a.shape == (3, 16, 16) and a.is_contiguous() and torch.equal(a, b)


def test_a_png_is_decoded_once_also_when_it_mentions_exif(monkeypatch) -> None:
    # its orientation comes from the decoded image: asked before, Pillow decodes it a second time
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "Exif data follows the pixels")
    plain = _png(Image.new("RGB", (40, 30), (9, 99, 199)), pnginfo=info)
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = _png(Image.new("RGB", (40, 30), (9, 99, 199)), exif=exif)
    loads = []
    real_load = PngImagePlugin.PngImageFile.load

    def counting_load(self):
        if self.tile:  # pixels still to decode (a loaded image has none)
            loads.append(1)
        return real_load(self)
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", counting_load)
    assert aug.decode_stored(plain)[1] == 1 and len(loads) == 1
    assert aug.decode_stored(turned)[1] == 6 and len(loads) == 2


def test_crop_sample_is_deterministic_per_seed_epoch_key(cifar_dir: Path) -> None:
    data = next((cifar_dir / "train" / "cat").glob("*.jpg")).read_bytes()
    cfg = swav_multicrop(32, 16, 2, 3)
    a = crop_sample(data, "k", cfg, 0, 0)
    assert [tuple(x.shape) for x in a] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3 and a[0].dtype == torch.uint8
    assert all(torch.equal(x, y) for x, y in zip(a, crop_sample(data, "k", cfg, 0, 0)))
    assert not torch.equal(a[0], crop_sample(data, "k", cfg, 0, 1)[0])
    assert not torch.equal(a[0], crop_sample(data, "other", cfg, 0, 0)[0])


def test_crops_resize_like_pillow() -> None:
    rng = np.random.default_rng(0)
    img = np.asarray(Image.open(io.BytesIO(_jpeg(Image.radial_gradient("L").convert("RGB").resize((300, 200)))))).copy()
    img[50:120, 80:200] = (200, 30, 60)  # an edge to resize across
    cfg = AugmentConfig(views=[ViewConfig(count=4, size=48, scale=(0.1, 1.0), flip_p=0.0)])
    crops = aug.crop_views(img, cfg, np.random.default_rng(1))
    rng = np.random.default_rng(1)
    for crop in crops:
        x, y, w, h = sample_crop(rng, 300, 200, (0.1, 1.0), (3 / 4, 4 / 3))
        rng.random()
        ref = np.asarray(Image.fromarray(img).resize((48, 48), Image.BILINEAR, box=(x, y, x + w, y + h)))
        diff = np.abs(crop.permute(1, 2, 0).numpy().astype(int) - ref.astype(int))
        assert diff.mean() < 1.0 and diff.max() <= 8


def test_crops_of_a_stored_image_equal_crops_of_the_upright_one() -> None:
    # crops are cut from the stored pixels and turned upright afterwards, for every EXIF orientation
    stored = np.asarray(Image.radial_gradient("L").resize((90, 60)).convert("RGB")).copy()
    stored[10:30, 20:70] = (200, 30, 60)
    stored[:, :5] = (0, 0, 255)  # asymmetric marks: a wrong flip or transpose shows
    cfg = AugmentConfig(views=[ViewConfig(count=6, size=24, scale=(0.1, 1.0), flip_p=0.5)])
    for orientation in range(1, 9):
        upright = aug._orient_array(stored, orientation)
        ref = np.asarray(ImageOps.exif_transpose(_with_orientation(stored, orientation)))
        assert np.array_equal(upright, ref), orientation  # our transform is Pillow's
        got = aug.crop_views(stored, cfg, np.random.default_rng(orientation), orientation)
        want = aug.crop_views(upright, cfg, np.random.default_rng(orientation))
        for a, b in zip(got, want):
            assert a.is_contiguous() and (a.int() - b.int()).abs().max() <= 1, orientation


def _with_orientation(a: np.ndarray, orientation: int) -> Image.Image:
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_center_view_is_the_middle_square() -> None:
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (50, 0, 150, 100))  # white middle square
    out = aug.center_view(_jpeg(img, quality=95), 32, 32)
    assert out.shape == (32, 32, 3) and out[2:-2, 2:-2].min() > 230


def test_normalising_before_blur_and_solarize_changes_nothing() -> None:
    # blur and solarize run on normalised values; the result must equal normalising last
    torch.manual_seed(1)
    x = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8)
    v = ViewConfig(size=24, blur_p=0.5, solarize_p=0.5, grayscale_p=0.5)
    p = sample_photometric(v, 6, torch.Generator().manual_seed(3), True)
    p.blur_on[:3] = True
    p.solarize_on[::2] = True
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    got = apply_photometric(x, v, p, mean, std)
    plain = apply_photometric(x, v, p, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    ref = (plain - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- the vectorised batch ops


def _reference_row(x: torch.Tensor, v: ViewConfig, p: PhotometricParams, i: int, mean, std) -> torch.Tensor:
    """Row i the plain way, in float64: each jitter op clamped, grayscale, its own blur kernel, solarize, normalise."""
    one = PhotometricParams(**{k: getattr(p, k)[i:i + 1] for k in vars(p)})
    z = _jitter_op_by_op(x[i:i + 1].double() / 255, one).double()[0]
    if p.gray_on[i]:
        z = _gray(z[None].double()).double()[0].expand(3, -1, -1)
    side = z.shape[-1]
    taps = min(2 * math.ceil(3 * float(p.sigma[i])) + 1, int(v.blur_kernel_frac * v.size) // 2 * 2 + 1,
               2 * ((side - 1) // 2) + 1)
    if p.blur_on[i] and taps >= 3:
        t = torch.arange(taps, dtype=torch.float64) - taps // 2
        w = torch.exp(-t ** 2 / (2 * float(p.sigma[i]) ** 2))
        w = w / w.sum()
        padded = F.pad(z[None], (taps // 2,) * 4, mode="reflect")
        z = F.conv2d(padded, (w[:, None] * w[None]).expand(3, 1, taps, taps), groups=3)[0]
    if p.solarize_on[i]:
        z = torch.where(z >= v.solarize_threshold, 1 - z, z)
    mean, std = (torch.tensor(t, dtype=torch.float64)[:, None, None] for t in (mean, std))
    return (z - mean) / std


@pytest.mark.parametrize("every_row", [False, True])  # CPU chunks / the accelerator form, run on CPU
def test_batched_ops_match_a_per_sample_reference(every_row: bool) -> None:
    gen = torch.Generator().manual_seed(11)
    v = ViewConfig(count=3, size=20, jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, grayscale_p=0.3, blur_p=0.6,
                   blur_kernel_frac=0.5, solarize_p=0.4, solarize_threshold=0.6)
    cfg = AugmentConfig(views=[v])
    p = sample_photometric(v, 24, gen, True)
    p.sigma[:4] = torch.tensor([0.2, 0.9, 1.6, 2.0])  # kernels of 3, 7, 11 and (capped) 11 taps
    p.blur_on[:4] = True
    x = torch.randint(0, 256, (24, 3, 20, 20), dtype=torch.uint8, generator=gen)
    got = torch.cat(aug.Photometric(cfg, every_row=every_row).apply_group(x, v, p))
    ref = torch.stack([_reference_row(x, v, p, i, cfg.mean, cfg.std) for i in range(24)]).float()
    assert p.blur_on.sum() > 6 and p.solarize_on.sum() > 4 and p.gray_on.sum() > 3  # every op is exercised
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_accelerator_form_matches_cpu_chunks() -> None:
    # the every-row form (fixed shapes, identity parameters where a row has no op) on CPU as the device
    cfg = AugmentConfig(views=[ViewConfig(count=2, size=40, blur_p=0.5, solarize_p=0.3, blur_kernel_frac=0.3),
                               ViewConfig(count=3, size=16, blur_p=0.5, grayscale_p=0.5)])
    gen = torch.Generator().manual_seed(2)
    views = [torch.randint(0, 256, (16, 3, 40, 40), dtype=torch.uint8, generator=gen),
             torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8, generator=gen)]
    chunks = aug.Photometric(cfg)(views, seed=3, epoch=1, step=5, rank=0)
    whole = aug.Photometric(cfg, every_row=True)(views, seed=3, epoch=1, step=5, rank=0)
    assert [tuple(t.shape) for t in whole] == [(8, 3, 40, 40)] * 2 + [(8, 3, 16, 16)] * 3
    for a, b in zip(chunks, whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_accelerator_form_runs_the_same_ops_for_any_batch_size() -> None:
    # O(1) host work per batch: the ops launched do not grow with the batch (no per-sample loop)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    # every op present in every batch (so that only the batch size differs): jitter, blur of one size, gray
    cfg = AugmentConfig(views=[ViewConfig(count=2, size=16, jitter_p=1.0, blur_p=1.0, blur_sigma=(1.5, 1.5),
                                          grayscale_p=0.5, blur_kernel_frac=0.6)])
    counts = []
    for batch in (64, 256):
        views = [torch.randint(0, 256, (2 * batch, 3, 16, 16), dtype=torch.uint8)]
        with Count() as c:
            aug.Photometric(cfg, every_row=True)(views, seed=0, epoch=0, step=0, rank=0)
        counts.append(c.ops)
    assert counts[0] == counts[1] < 200


def test_views_go_over_per_group_and_per_view_alike() -> None:
    cfg = swav_multicrop(24, 12, 2, 3)
    gen = torch.Generator().manual_seed(0)
    samples = [[torch.randint(0, 256, (3, s, s), dtype=torch.uint8, generator=gen) for s in (24, 24, 12, 12, 12)]
               for _ in range(4)]
    groups = aug.stack_views(samples, cfg)
    assert [tuple(g.shape) for g in groups] == [(8, 3, 24, 24), (12, 3, 12, 12)]
    assert torch.equal(groups[1][4 + 2], samples[2][3])  # view-major: row = view * batch + sample
    per_view = [torch.stack([s[j] for s in samples]) for j in range(5)]
    ph = aug.Photometric(cfg)
    a = ph(groups, seed=0, epoch=0, step=0, rank=0)
    b = ph(per_view, seed=0, epoch=0, step=0, rank=0)
    assert len(a) == 5 and all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="view groups or 5 views"):
        ph(per_view[:3], seed=0, epoch=0, step=0, rank=0)


def test_cpu_outputs_reuse_memory_only_once_released() -> None:
    # outputs of >= 2 MiB come from a pool; a buffer is reused only when no tensor (or view of one) holds it
    cfg = AugmentConfig(views=[ViewConfig(count=2, size=96, jitter_p=0.0)])
    ph = aug.Photometric(cfg)
    views = [torch.randint(0, 256, (40, 3, 96, 96), dtype=torch.uint8)]  # 2 x 20 rows: 2.2 MB per view
    ptrs = lambda out: {t.untyped_storage().data_ptr() for t in out}  # noqa: E731
    first = ph(views, seed=0, epoch=0, step=0, rank=0)
    held = first[1][:, :1]  # a view keeps its buffer
    snapshot = held.clone()
    first_ptrs = ptrs(first)
    del first
    second = ph(views, seed=0, epoch=0, step=1, rank=0)
    assert torch.equal(held, snapshot)  # not overwritten
    assert held.untyped_storage().data_ptr() not in ptrs(second)
    second_ptrs = ptrs(second)
    del second
    third = ph(views, seed=0, epoch=0, step=2, rank=0)
    assert ptrs(third) <= (first_ptrs | second_ptrs) - {held.untyped_storage().data_ptr()}  # reused, not new
    del held
    torch.testing.assert_close(third[0], ph(views, seed=0, epoch=0, step=2, rank=0)[0])


def test_sampled_parameters_cover_exactly_the_configured_ranges() -> None:
    # distinct ranges per parameter, so that a swapped column or a range off by a factor fails
    v = ViewConfig(jitter=(0.3, 0.5, 0.7, 0.15), jitter_p=0.3, grayscale_p=0.6, blur_p=0.45, blur_sigma=(0.3, 1.7),
                   solarize_p=0.25)
    n = 40000
    p = sample_photometric(v, n, torch.Generator().manual_seed(123), True)
    columns = {"brightness": (p.factors[:, 0], 0.7, 1.3), "contrast": (p.factors[:, 1], 0.5, 1.5),
               "saturation": (p.factors[:, 2], 0.3, 1.7), "hue": (p.factors[:, 3], -0.15, 0.15),
               "sigma": (p.sigma, 0.3, 1.7)}
    for name, (x, lo, hi) in columns.items():
        x = x.double()
        width = hi - lo
        assert lo - 1e-6 <= float(x.min()) < lo + 0.002 * width, name  # reaches both ends, never beyond
        assert hi - 0.002 * width < float(x.max()) <= hi + 1e-6, name
        assert abs(float(x.mean()) - (lo + hi) / 2) < 4 * width / math.sqrt(12 * n), name
        assert abs(float(x.std()) / (width / math.sqrt(12)) - 1) < 0.02, name
    for name, (flag, prob) in {"jitter": (p.jitter_on, 0.3), "gray": (p.gray_on, 0.6), "blur": (p.blur_on, 0.45),
                               "solarize": (p.solarize_on, 0.25)}.items():
        assert abs(float(flag.double().mean()) - prob) < 4 * math.sqrt(prob * (1 - prob) / n), name
    # parameters are independent of each other (one column each)
    stacked = torch.stack([p.factors[:, 0], p.factors[:, 1], p.factors[:, 2], p.factors[:, 3], p.sigma,
                           p.jitter_on.float(), p.gray_on.float(), p.blur_on.float(), p.solarize_on.float()]).double()
    corr = torch.corrcoef(stacked) - torch.eye(9, dtype=torch.float64)
    assert corr.abs().max() < 0.03
    # all 24 jitter orders equally likely (chi-square, 23 degrees of freedom, p = 0.001 at 49.7)
    code = (p.order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.unique(code, return_counts=True)[1].double()
    assert len(counts) == 24 and float(((counts - n / 24) ** 2 / (n / 24)).sum()) < 49.7


@pytest.mark.gpu
def test_photometric_on_cuda_matches_cpu() -> None:
    cfg = swav_multicrop(64, 32, 2, 2)
    cfg.views[0].solarize_p = 0.3
    ph = aug.Photometric(cfg)
    views = [torch.randint(0, 256, (2 * 16, 3, s, s), dtype=torch.uint8) for s in (64, 32)]
    cpu = ph(views, seed=0, epoch=0, step=0, rank=0)
    on_cuda = [v.cuda() for v in views]
    ph(on_cuda, seed=0, epoch=0, step=1, rank=0)  # warm-up: workspace, pinned staging memory
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any read-back from the device raises
    try:
        gpu = ph(on_cuda, seed=0, epoch=0, step=0, rank=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(cpu, gpu):
        assert b.is_cuda
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=0)
