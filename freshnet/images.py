"""Validate, normalize and hash downloaded images: bytes in, an RGB JPEG with its hashes out."""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from freshnet.config import ImagesConfig
from freshnet.dedupe import phash_image

log = logging.getLogger(__name__)

# Formats we accept, decided by magic bytes only (never by extension or Content-Type).
_MAGIC: list[tuple[bytes, int, str]] = [
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
]


def image_key(sha: str) -> str:
    """Storage key of a normalized image: images/<sha[:2]>/<sha>.jpg."""
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError(f"not a sha256 hex digest: {sha!r}")
    return f"images/{sha[:2]}/{sha}.jpg"


class ImageRejected(Exception):
    """An input that is not a usable image; ``reason`` is a reason code, ``detail`` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # keep reason/detail across process-pool pickling
        return (ImageRejected, (self.reason, self.detail))


@dataclass
class Normalized:
    data: bytes
    sha256: str
    orig_sha256: str
    phash: str  # 16 hex chars, 64-bit DCT perceptual hash
    width: int
    height: int


def sniff(data: bytes) -> str | None:
    """The image format named by the magic bytes, or None."""
    for magic, offset, fmt in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return fmt
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _describe_non_image(data: bytes) -> str:
    if not data:
        return "empty body"
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "HTML document"
    if b"<svg" in head or head.startswith(b"<?xml"):
        return "SVG/XML document (vector images are not accepted)"
    return f"unknown format (first bytes {data[:8].hex()})"


def phash_hex(img: Image.Image) -> str:
    """64-bit DCT perceptual hash as 16 hex chars (same bits as imagehash.phash, up to float
    rounding; numpy instead of scipy, so workers neither import scipy nor pay its call cost)."""
    return f"{phash_image(img):016x}"


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit range to 8-bit
        elif mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        # Transparent pixels become white, not the black that a plain convert would give.
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def normalize(data: bytes, cfg: ImagesConfig) -> Normalized:
    """Validate and normalize image bytes to an RGB JPEG of at most cfg.max_side; raises ImageRejected."""
    fmt = sniff(data)
    if fmt is None:
        raise ImageRejected("not_image", _describe_non_image(data))
    orig_sha = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            # Our own cap below decides; Pillow's warning/limit must not pre-empt it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise ImageRejected("bomb", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is a bad file
        raise ImageRejected("decode_error", f"{fmt}: cannot open: {exc}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageRejected("decode_error", f"{fmt}: invalid size {w}x{h}")
    if w * h > cfg.max_pixels:
        # Rejected from the header alone: the pixels are never decoded.
        raise ImageRejected("bomb", f"{fmt} {w}x{h} = {w * h} pixels > max_pixels {cfg.max_pixels}")
    try:
        if fmt == "JPEG":
            # Decode at a reduced DCT scale when the result still covers max_side: much faster.
            im.draft(im.mode, (cfg.max_side, cfg.max_side))
        im.seek(0)  # animated: first frame only
        im.load()  # full decode: verify() does not catch truncated data
    except Exception as exc:  # noqa: BLE001
        raise ImageRejected("decode_error", f"{fmt} {w}x{h}: {exc}") from None
    if min(w, h) < cfg.min_side:
        raise ImageRejected("too_small", f"{w}x{h}: smaller than min_side {cfg.min_side}")
    try:
        # In place: without an orientation tag a copying transpose would copy the whole image.
        ImageOps.exif_transpose(im, in_place=True)
    except Exception as exc:  # noqa: BLE001 - a broken EXIF block should not lose the image
        log.debug("ignoring broken EXIF: %s", exc)
    im = _to_rgb(im)
    if max(im.size) > cfg.max_side:
        scale = cfg.max_side / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        # Only ever a downscale, where BOX is area averaging (antialiased, like INTER_AREA) at a
        # fraction of Lanczos' cost; this resize is the largest CPU item of ingest.
        im = im.resize(size, Image.Resampling.BOX)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=cfg.jpeg_quality)
    out = buf.getvalue()
    return Normalized(
        data=out,
        sha256=hashlib.sha256(out).hexdigest(),
        orig_sha256=orig_sha,
        phash=phash_hex(im),
        width=im.width,
        height=im.height,
    )
