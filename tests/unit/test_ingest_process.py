"""Per-image processing: validation before decode, orientation, RGB conversion, resize, keep-original."""

from __future__ import annotations

import csv
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from sharding.config import IngestConfig
from sharding.process import REASONS, phash, process_image, target_size, to_rgb

CFG = IngestConfig(resize_short_side=256)


def crafted_png(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares ``width`` x ``height`` (valid CRCs, almost no pixel data)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def decoded(res) -> np.ndarray:
    assert res.reason is None, res
    im = Image.open(io.BytesIO(res.jpeg))
    assert im.format == "JPEG" and im.mode == "RGB"
    return np.asarray(im, dtype=np.float64)


def photos_by(photos_dir, **match) -> list[dict]:
    rows = list(csv.DictReader(open(photos_dir / "manifest.csv")))
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


# ---------------------------------------------------------------- rejects


def test_reject_reasons_without_decoding(photos_dir):
    jpeg = (photos_dir / "pillow_hopper.jpg").read_bytes()
    cases = {
        "zero_bytes": b"",
        "not_an_image": b"this is a text file named .jpg\n",
        "decompression_bomb": crafted_png(30000, 30000),
        "too_small": png_bytes(Image.new("RGB", (20, 300))),
        "extreme_aspect": png_bytes(Image.new("RGB", (600, 100))),
    }
    for reason, data in cases.items():
        assert process_image(data, CFG).reason == reason, reason
    assert process_image(jpeg, CFG.replace(max_bytes=1000)).reason == "too_many_bytes"
    # Below Pillow's own bomb limit, ours decides from the header: no pixel data is needed.
    res = process_image(crafted_png(2000, 2000), CFG.replace(max_pixels=1_000_000))
    assert res.reason == "decompression_bomb" and (res.orig_width, res.orig_height) == (2000, 2000)
    assert set(cases) <= set(REASONS)
    # A JPEG whose SOF declares 30000 x 30000: refused from the header on the simplejpeg path too.
    sof = jpeg.index(b"\xff\xc0")
    huge = jpeg[: sof + 5] + (30000).to_bytes(2, "big") * 2 + jpeg[sof + 9 :]
    res = process_image(huge, CFG)
    assert res.reason == "decompression_bomb" and (res.orig_width, res.orig_height) == (30000, 30000)


def test_truncated_jpeg_is_rejected(photos_dir):
    big = max(photos_by(photos_dir, format="JPEG", mode="RGB"), key=lambda r: int(r["bytes"]))
    data = (photos_dir / big["file"]).read_bytes()
    assert process_image(data[: int(len(data) * 0.6)], CFG).reason == "truncated"
    small = (photos_dir / "pillow_hopper.jpg").read_bytes()  # the keep-original path must validate too
    assert process_image(small[: int(len(small) * 0.7)], CFG.replace(resize_short_side=512)).reason == "truncated"


def test_animation_policy():
    frames = [Image.new("RGB", (64, 64), c) for c in ((250, 0, 0), (0, 0, 250), (0, 250, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    gif = buf.getvalue()
    assert process_image(gif, CFG.replace(animations="reject")).reason == "animated"
    px = decoded(process_image(gif, CFG)).reshape(-1, 3).mean(0)
    assert px[0] > 200 and px[2] < 40  # the first (red) frame


# ---------------------------------------------------------------- conversion


def test_matches_exif_transpose_on_every_real_photo(photos_dir):
    """Every photo (EXIF 2..8, CMYK, grayscale, PNG) equals Pillow's exif_transpose + RGB, resized."""
    checked = 0
    for row in photos_by(photos_dir):
        data = (photos_dir / row["file"]).read_bytes()
        res = process_image(data, CFG)
        if res.reason == "extreme_aspect":
            w, h = int(row["width"]), int(row["height"])
            assert max(w, h) / min(w, h) > CFG.max_aspect
            continue
        ref = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        got = decoded(res)
        assert (res.width, res.height) == target_size(*ref.size, CFG.resize_short_side), row["file"]
        ref_small = np.asarray(ref.resize((24, 24), Image.Resampling.BOX), dtype=np.float64)
        got_small = np.asarray(Image.fromarray(got.astype(np.uint8)).resize((24, 24), Image.Resampling.BOX), dtype=np.float64)
        assert np.abs(ref_small - got_small).mean() < 6, row["file"]
        checked += 1
    assert checked >= 89


def test_orientation_swaps_sides(photos_dir):
    row = photos_by(photos_dir, file="pillow_hopper_orientation_6.jpg")[0]
    data = (photos_dir / row["file"]).read_bytes()
    wide = Image.new("RGB", (120, 80))
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    wide.save(buf, format="JPEG", exif=exif)
    res = process_image(buf.getvalue(), CFG)
    assert (res.width, res.height) == (80, 120) and not res.kept_original
    assert process_image(data, CFG).reason is None


def test_cmyk_sixteen_bit_palette_and_alpha(photos_dir):
    cmyk = (photos_dir / "pillow_pil_sample_cmyk.jpg").read_bytes()
    ref = Image.open(io.BytesIO(cmyk)).convert("RGB")
    got = Image.fromarray(decoded(process_image(cmyk, CFG)).astype(np.uint8))
    small = [np.asarray(x.resize((10, 10), Image.Resampling.BOX), dtype=np.float64) for x in (ref, got)]
    assert np.abs(small[0] - small[1]).mean() < 3  # same colours (JPEG noise aside), not inverted

    gray = np.asarray(Image.open(photos_dir / "skimage_camera.png").convert("L"))
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)  # a real 16-bit grayscale PNG
    data16 = png_bytes(sixteen)
    assert Image.open(io.BytesIO(data16)).mode.startswith("I")
    out = decoded(process_image(data16, CFG))
    ref16 = np.asarray(Image.fromarray(gray).resize((256, 256), Image.Resampling.BICUBIC), dtype=np.float64)
    assert abs(out.mean() - ref16.mean()) < 2 and out.std() > 30  # scaled, not clipped to white

    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([0, 0, 0] * 128 + [10, 200, 10] * 128)
    pal.paste(200, (0, 0, 32, 64))  # left half green, right half index 0 = transparent
    out = decoded(process_image(png_bytes(pal, transparency=0), CFG))
    assert out[:, 40:].min() > 245 and out[:, :24, 1].mean() > 180

    rgba = Image.new("RGBA", (64, 64), (0, 0, 255, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 32, 64))
    out = decoded(process_image(png_bytes(rgba), CFG))
    assert out[:, 40:].min() > 245 and out[:, :24, 0].mean() > 240


def test_to_rgb_modes():
    for mode in ("1", "L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"):
        im = Image.new(mode, (8, 8))
        assert to_rgb(im).mode == "RGB", mode


def test_keep_original_only_when_it_conforms(cifar_dir, photos_dir):
    small = next((cifar_dir / "train").rglob("*.jpg")).read_bytes()
    res = process_image(small, CFG)
    assert res.kept_original and res.jpeg == small and (res.width, res.height) == (32, 32)
    res = process_image(small, CFG.replace(keep_original=False))
    assert not res.kept_original and res.jpeg != small
    gray = (photos_dir / "pillow_hopper_gray.jpg").read_bytes()
    assert not process_image(gray, CFG).kept_original  # grayscale is re-encoded as RGB
    big = (photos_dir / "exifsamples_jolla.jpg").read_bytes()
    res = process_image(big, CFG)
    assert not res.kept_original and min(res.width, res.height) == 256


def test_target_size():
    assert target_size(1000, 500, 256) == (512, 256)
    assert target_size(500, 1000, 256) == (256, 512)
    assert target_size(200, 100, 256) == (200, 100)
    assert target_size(3, 1001, 2) == (2, 667)


def test_phash_is_perceptual(photos_dir):
    a = Image.open(photos_dir / "skimage_astronaut.png").convert("RGB")
    b = Image.open(photos_dir / "skimage_coffee.png").convert("RGB")
    same = bin(phash(a) ^ phash(a.resize((200, 200)))).count("1")
    other = bin(phash(a) ^ phash(b)).count("1")
    assert same <= 6 < 20 <= other
    res = process_image(png_bytes(a), CFG.replace(phash=True))
    assert bin(res.phash ^ phash(a)).count("1") <= 6


@pytest.mark.parametrize("quality", [50, 95])
def test_jpeg_quality_is_applied(photos_dir, quality):
    data = (photos_dir / "skimage_astronaut.png").read_bytes()
    sizes = {q: len(process_image(data, CFG.replace(jpeg_quality=q)).jpeg) for q in (quality, 75)}
    assert (sizes[quality] > sizes[75]) == (quality > 75)
