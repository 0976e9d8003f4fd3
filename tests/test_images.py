"""images.normalize: magic bytes, bombs, memory budget, full decode, truncation, modes, orientation,
resize, hashes."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from freshnet.config_sections import ImagesConfig
from freshnet.data import images
from freshnet.data.images import ImageRejected, image_key, normalize, phash_hex, sniff
from tests import badcorpus

CFG = ImagesConfig()


def _open(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _reject(data: bytes, cfg: ImagesConfig = CFG) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        normalize(data, cfg)
    return info.value


def test_good_jpeg_is_normalized_and_hashed():
    data = badcorpus.big_jpeg()
    n = normalize(data, CFG)
    img = _open(n.data)
    assert img.format == "JPEG" and img.mode == "RGB"
    assert (n.width, n.height) == img.size == (400, 267)
    assert n.orig_sha256 == hashlib.sha256(data).hexdigest()
    assert n.sha256 == hashlib.sha256(n.data).hexdigest()
    assert len(n.phash) == 16 and int(n.phash, 16) >= 0
    assert (
        n.phash == phash_hex(img) or bin(int(n.phash, 16) ^ int(phash_hex(img), 16)).count("1") <= 4
    )
    # Left yellow, right green survive the resize.
    assert img.getpixel((20, 100))[0] > 200 and img.getpixel((380, 100))[0] < 60
    # Deterministic: same input, same output bytes.
    assert normalize(data, CFG).sha256 == n.sha256


def test_small_image_is_not_upscaled():
    n = normalize(badcorpus.good_jpeg((320, 240)), CFG)
    assert (n.width, n.height) == (320, 240)


def test_exif_orientation_applied():
    n = normalize(badcorpus.exif_rotated_jpeg(), CFG)
    img = _open(n.data)
    assert img.size == (120, 240)  # portrait after transpose
    top, bottom = img.getpixel((60, 20)), img.getpixel((60, 220))
    assert top[0] > 200 and top[2] < 60, top  # red on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        (badcorpus.cmyk_jpeg(), (255, 0, 0)),
        (badcorpus.png16(), (156, 156, 156)),
        (badcorpus.la_png(), (255, 255, 255)),
        (badcorpus.animated_gif(), (255, 0, 0)),
        (badcorpus.webp(), (0, 0, 255)),
    ],
    ids=["cmyk", "16bit", "la-transparent", "animated-first-frame", "webp"],
)
def test_modes_become_rgb(data, expect):
    img = _open(normalize(data, CFG).data)
    assert img.mode == "RGB"
    px = img.getpixel((img.width // 2, img.height // 2))
    assert all(abs(a - b) <= 12 for a, b in zip(px, expect, strict=True)), px


def test_palette_alpha_composited_on_white():
    img = _open(normalize(badcorpus.palette_png_transparent(), CFG).data)
    left, right = img.getpixel((20, 60)), img.getpixel((140, 60))
    assert min(left) > 240, left  # transparent -> white, not black
    assert right[1] > 180 and right[0] < 40, right


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not_image"),
        (b"<!DOCTYPE html><html></html>", "not_image"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "not_image"),
        (b"GIF89a" + b"\x00" * 4, "decode_error"),
        (badcorpus.big_jpeg()[:5000], "decode_error"),
        (badcorpus.png_bomb(), "bomb"),
        (badcorpus.png_bomb(9000, 9000), "bomb"),  # under Pillow's own limit, over ours
        (badcorpus._save(Image.new("RGB", (1, 1)), "PNG"), "too_small"),
        (badcorpus._save(Image.new("RGB", (300, 40)), "PNG"), "too_small"),
    ],
    ids=[
        "empty",
        "html",
        "svg",
        "gif-header-only",
        "truncated-jpeg",
        "png-bomb",
        "png-bomb-cap",
        "1x1",
        "thin",
    ],
)
def test_rejections(data, reason):
    err = _reject(data)
    assert err.reason == reason, err
    assert err.detail


def test_bomb_cap_is_configurable():
    data = badcorpus.good_jpeg((320, 240))
    assert _reject(data, ImagesConfig(max_pixels=50_000)).reason == "bomb"


def test_sniff_ignores_extension_and_header():
    assert sniff(badcorpus.webp()) == "WEBP"
    assert sniff(b"\xff\xd8\xff\xe0rest") == "JPEG"
    assert sniff(b"<html>") is None


def test_image_key():
    sha = "ab" + "0" * 62
    assert image_key(sha) == f"images/ab/{sha}.jpg"
    with pytest.raises(ValueError):
        image_key("../etc")


# ---------------------------------------------------------------- issue 13: memory and truncation


def test_memory_budget_counts_bytes_per_pixel_not_pixels():
    """Same pixel count: 8-bit grey fits a budget that the RGBA image (8 bytes/pixel) does not."""
    size = (2000, 1500)  # 3 Mpx: 3 MiB as L, 24 MiB as RGBA
    grey = badcorpus._save(Image.new("L", size, 90), "PNG")
    rgba = badcorpus._save(Image.new("RGBA", size, (90, 20, 20, 255)), "PNG")
    # L: 1 byte stored, shrunk in place; RGBA: 4 stored + 4 for the premultiplied resize copy.
    cfg = CFG.model_copy(update={"max_decode_mb": 16})
    assert normalize(grey, cfg).width == 400
    err = _reject(rgba, cfg)
    assert err.reason == "bomb"
    assert "RGBA" in err.detail and "8 bytes/pixel" in err.detail and "decode budget" in err.detail


@pytest.mark.parametrize(
    ("mode", "fmt", "bpp"),
    [
        ("L", "PNG", 1),
        ("I;16", "PNG", 2),
        ("RGB", "PNG", 4),
        ("RGBA", "PNG", 8),
        ("CMYK", "JPEG", 4),
        ("F", "TIFF", 4),
        ("LA", "PNG", 8),
        ("RGB", "WEBP", 8),
    ],
)
def test_decode_cost_is_mode_aware(mode, fmt, bpp):
    assert images.decode_cost(100, 10, mode, fmt, False) == 1000 * bpp


def test_palette_with_transparency_costs_its_rgba_copies():
    assert images.decode_cost(10, 10, "P", "PNG", True) > images.decode_cost(
        10, 10, "P", "PNG", False
    )


def test_pixel_bombs_of_issue_13():
    # 16-bit 7999² (under max_pixels): accepted, shrunk at 16 bits and converted by integer shift.
    n = normalize(badcorpus.png16_bomb(), CFG)
    img = _open(n.data)
    assert img.size == (400, 400) and img.mode == "RGB"
    assert all(abs(c - (40000 >> 8)) <= 2 for c in img.getpixel((200, 200)))
    # RGBA 7999² is under max_pixels too, but needs 8 bytes per pixel: refused from the header.
    err = _reject(badcorpus.rgba_bomb())
    assert err.reason == "bomb" and "7999x7999 RGBA" in err.detail
    # 12000² RGB: over max_pixels.
    err = _reject(badcorpus.png_huge())
    assert err.reason == "bomb" and "max_pixels" in err.detail


def test_sixteen_bit_gradient_keeps_its_levels():
    arr = (np.arange(1600, dtype=np.uint32)[None, :].repeat(1200, 0) * 40).astype(np.uint16)
    data = badcorpus._save(Image.fromarray(arr), "PNG")
    img = _open(normalize(data, CFG).data)
    assert img.size == (400, 300)
    row = np.asarray(img)[150, :, 0].astype(int)
    expected = (np.arange(400) * 4 + 1.5) * 40 / 256  # box average of 4 columns, high byte
    assert np.abs(row - expected).max() <= 3


def test_large_rotated_image_is_shrunk_then_rotated():
    img = badcorpus.halves((1200, 600), (255, 0, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = _open(normalize(badcorpus._save(img, "JPEG", quality=95, exif=exif.tobytes()), CFG).data)
    assert out.size == (200, 400)
    top, bottom = out.getpixel((100, 40)), out.getpixel((100, 360))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60, (top, bottom)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_large_alpha_images_composite_on_white_after_shrinking(mode):
    img = Image.new("RGBA", (1000, 800), (0, 0, 0, 0))
    img.paste(Image.new("RGBA", (500, 800), (0, 200, 0, 255)), (500, 0))
    if mode == "LA":
        img = img.convert("LA")
    elif mode == "PA":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE)
        img.info["transparency"] = img.getpixel((0, 0))
    out = _open(normalize(badcorpus._save(img, "PNG"), CFG).data)
    assert out.size == (400, 320)
    left, right = out.getpixel((50, 160)), out.getpixel((350, 160))
    assert min(left) > 240, left  # transparent -> white
    assert right != left and max(right) < 240, right


@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.97, 0.995])
def test_cut_jpeg_closed_with_eoi_is_rejected(fraction):
    err = _reject(badcorpus.cut_eoi_jpeg(fraction))
    assert err.reason == "decode_error" and "truncated" in err.detail, err


def test_real_photo_cut_and_closed_with_eoi_is_rejected(flower_photos):
    data = flower_photos["roses"][0].read_bytes()
    assert normalize(data, CFG)
    err = _reject(data[: len(data) * 4 // 5] + b"\xff\xd9")
    assert err.reason == "decode_error" and "truncated" in err.detail


@pytest.mark.parametrize(
    "bottom",
    [(124, 124, 124), (120, 128, 136), (0, 0, 0), (255, 255, 255)],
    ids=["grey-124", "tinted-grey", "black", "white"],
)
def test_flat_bottom_that_is_not_the_decoder_fill_is_kept(bottom):
    """Letterbox bars and studio backgrounds stay. (A flat bottom of exactly mid-grey 128, or
    within JPEG rounding of it, cannot be told from the decoder's fill; no real photo has one.)"""
    img = Image.open(io.BytesIO(badcorpus.photo_like_jpeg())).convert("RGB")
    img.paste(Image.new("RGB", (640, 120), bottom), (0, 360))
    n = normalize(badcorpus._save(img, "JPEG", quality=95), CFG)
    assert n.height == 300


def test_progressive_jpeg_cut_and_closed_is_kept_whole():
    """A cut progressive JPEG loses refinement scans only: blurrier, every pixel present."""
    data = badcorpus.photo_like_jpeg(progressive=True)
    assert normalize(data[: len(data) * 9 // 10] + b"\xff\xd9", CFG).height == 300


def _png_iend() -> bytes:
    return badcorpus._png_chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("fmt", "tail"),
    [("PNG", _png_iend()), ("WEBP", b""), ("GIF", b";")],
    ids=["png", "webp", "gif"],
)
@pytest.mark.parametrize("fraction", [0.8, 0.99])
def test_cut_png_webp_gif_closed_with_end_marker_is_rejected(fmt, tail, fraction):
    img = Image.open(io.BytesIO(badcorpus.photo_like_jpeg())).convert("RGB")
    data = badcorpus._save(img, fmt)
    assert normalize(data, CFG)
    err = _reject(data[: int(len(data) * fraction)] + tail)
    assert err.reason == "decode_error", err


@pytest.mark.slow
def test_no_real_photo_is_taken_for_truncated(shared_data):
    """Zero false rejections over every real photo (978 JPEGs) in shared/data."""
    paths = sorted((shared_data / "photos").rglob("*.jpg"))
    assert len(paths) >= 900
    rejected = []
    for path in paths:
        try:
            normalize(path.read_bytes(), CFG)
        except ImageRejected as exc:
            rejected.append((path.name, exc.reason, exc.detail))
    assert rejected == []
