"""images.normalize: magic bytes, bombs, full decode, modes, orientation, resize, hashes."""

from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from freshnet.config import ImagesConfig
from freshnet.images import ImageRejected, image_key, normalize, phash_hex, sniff
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
