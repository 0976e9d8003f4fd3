"""Validate, normalize and hash downloaded images: bytes in, an RGB JPEG with its hashes out."""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from freshnet.config_sections import ImagesConfig
from freshnet.data.hashing import phash_image

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

    # Keep reason/detail across process-pool pickling.
    def __reduce__(self) -> tuple[type[ImageRejected], tuple[str, str]]:
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


# Decoding memory is budgeted in bytes, not pixels (images.max_decode_mb): a 16-bit or RGBA image
# costs several times what an 8-bit greyscale one does at the same pixel count. The default 256 MiB
# lets a 64-megapixel RGB PNG (the default max_pixels) through, and keeps a worker's peak a
# fraction of a small machine.

# Bytes per pixel Pillow stores for each mode (3-channel modes use 4 bytes per pixel).
_STORAGE_BPP = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}

# Full-size working copies normalize() makes before shrinking, in bytes per pixel: modes whose
# resampling is not area averaging are converted first, and alpha is premultiplied by Pillow's
# resize (LA -> La, RGBA -> RGBa), a full-size copy.
_WORKING_BPP = {"1": 1, "P": 4, "PA": 8, "LA": 4, "RGBA": 4}

_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# The value libjpeg gives every pixel of blocks it never received (all DCT coefficients zero).
_JPEG_FILL = 128
# A fill run must cover this many pixels and 1/8 of the last row to count as truncation.
_MIN_FILL_RUN = 8


def decode_budget(cfg: ImagesConfig) -> int:
    """The per-image decoding budget in bytes (``images.max_decode_mb``)."""
    return int(cfg.max_decode_mb * 2**20)


def decode_cost(width: int, height: int, mode: str, fmt: str, has_transparency: bool) -> int:
    """Peak bytes normalize() needs for an image decoded at width x height in ``mode``."""
    bpp = _STORAGE_BPP.get(mode, 4)
    if mode == "P" and has_transparency:
        bpp += _WORKING_BPP["PA"]
    else:
        bpp += _WORKING_BPP.get(mode, 0)
    if fmt == "WEBP":
        bpp += 4  # libwebp decodes into a buffer of its own, then Pillow copies it
    return width * height * bpp


def header_cost(data: bytes, max_side: int) -> int:
    """decode_cost() read from the header alone (0 if the header cannot be read: the worker
    then rejects the file); cheap enough to run before handing the bytes to a worker."""
    fmt = sniff(data)
    if fmt is None:
        return 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                if fmt == "JPEG":
                    im.draft(im.mode, (max_side, max_side))
                return decode_cost(*im.size, im.mode, fmt, "transparency" in im.info)
    except Exception:  # noqa: BLE001 - not our call to judge the file here
        return 0


def _flat_fill_run(row: np.ndarray) -> int:
    """How many pixels at the right end of a decoded row are exactly the JPEG fill value."""
    flat = np.all(row.reshape(row.shape[0], -1) == _JPEG_FILL, axis=1)
    if flat.all():
        return int(flat.size)
    return int(flat.size - 1 - np.flatnonzero(~flat)[-1])


def _check_jpeg_complete(im: Image.Image, fmt: str, size: tuple[int, int]) -> None:
    """Reject a JPEG whose entropy-coded data ends early but that Pillow decodes anyway.

    A file cut and closed with an EOI marker loads without error: libjpeg warns (Pillow drops the
    warning) and fills every block it did not receive with zero coefficients, i.e. exactly 128
    in every channel, in scan order up to the bottom-right corner. So the last row ends in a run
    of exact 128 pixels (the whole row when the cut was above the last block row). A real photo
    practically never has a bottom-right run of exactly (128, 128, 128): over the 978 real photos
    in shared/data no image has one of even 8 pixels (tests/test_images.py).
    """
    if fmt != "JPEG" or im.mode not in ("L", "RGB", "CMYK") or im.info.get("progressive"):
        return  # a cut progressive JPEG only loses refinement scans: blurrier, but whole
    w, h = im.size
    row = np.asarray(im.crop((0, h - 1, w, h)))[0]
    run = _flat_fill_run(row)
    if run >= max(_MIN_FILL_RUN, w // 8):
        raise ImageRejected(
            "decode_error",
            f"JPEG {size[0]}x{size[1]} is truncated: its scan data ends early and the decoder "
            f"filled the rest with flat grey (last row: {run} of {w} pixels)",
        )


def _shrink(im: Image.Image, max_side: int) -> Image.Image:
    """Downscale to max_side in the decoded mode, before any full-size mode conversion."""
    if max(im.size) <= max_side:
        return im
    if im.mode == "1":
        im = im.convert("L")
    elif im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    elif im.mode == "PA":
        im = im.convert("RGBA")
    scale = max_side / max(im.size)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    # Only ever a downscale, where BOX is area averaging (antialiased, like INTER_AREA) at a
    # fraction of Lanczos' cost; this resize is the largest CPU item of ingest. Pillow
    # premultiplies alpha for LA/RGBA itself.
    return im.resize(size, Image.Resampling.BOX)


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB from any mode; called on the shrunk image, so its copies are small."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16"):
        # Integer high byte: 16-bit to 8-bit without a float copy.
        high = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(high, "L").convert("RGB")
    if mode in ("I", "F"):
        arr = np.asarray(im)
        top = arr.max(initial=0)
        if mode == "I" and top > 255:
            arr = np.right_shift(np.clip(arr, 0, 65535), 8)  # 16-bit range to 8-bit
        elif mode == "F" and top <= 1.0:
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


def _orientation(im: Image.Image) -> Image.Transpose | None:
    try:
        tag = im.getexif().get(0x0112)
        return _ORIENTATION.get(tag) if tag is not None else None
    except Exception as exc:  # noqa: BLE001 - a broken EXIF block should not lose the image
        log.debug("ignoring broken EXIF: %s", exc)
        return None


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
            im: Image.Image = Image.open(io.BytesIO(data), formats=[fmt])
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
    if fmt == "JPEG":
        # Decode at a reduced DCT scale when the result still covers max_side: much faster,
        # and the budget below is then checked against the reduced size.
        im.draft(im.mode, (cfg.max_side, cfg.max_side))
    cost = decode_cost(*im.size, im.mode, fmt, "transparency" in im.info)
    budget = decode_budget(cfg)
    if cost > budget:
        # Also from the header alone: bytes per pixel, so 16-bit, alpha and CMYK count fully.
        raise ImageRejected(
            "bomb",
            f"{fmt} {w}x{h} {im.mode} needs ~{cost / 2**20:.0f} MiB to decode "
            f"({cost // (im.width * im.height)} bytes/pixel) > decode budget "
            f"{budget / 2**20:.0f} MiB",
        )
    try:
        im.seek(0)  # animated: first frame only
        im.load()  # full decode: verify() does not catch truncated data
    except Exception as exc:  # noqa: BLE001
        raise ImageRejected("decode_error", f"{fmt} {w}x{h}: {exc}") from None
    if min(w, h) < cfg.min_side:
        raise ImageRejected("too_small", f"{w}x{h}: smaller than min_side {cfg.min_side}")
    _check_jpeg_complete(im, fmt, (w, h))
    orientation = _orientation(im)
    # Shrink first, then convert and rotate: every full-size copy is avoided (a 16-bit or alpha
    # image used to be converted at full size, one float64 copy alone 8 bytes per pixel).
    im = _to_rgb(_shrink(im, cfg.max_side))
    if orientation is not None:
        im = im.transpose(orientation)
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
