"""Web noise made at test time: disguised copies of real photos (shared by tests and benchmarks)."""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

WATERMARK = "\u00a9 stockphoto"


def disguise(path: Path, rng: random.Random) -> bytes:
    """A re-hosted copy: crop, rescale, watermark, brightness, maybe mirror, re-compress."""
    with Image.open(path) as src:
        im = src.convert("RGB")
    w, h = im.size
    # 3-10% of each axis comes off in total; a random share of it off the left (top) side.
    cx, cy, sx, sy = rng.uniform(0.03, 0.10), rng.uniform(0.03, 0.10), rng.random(), rng.random()
    box = (
        round(w * cx * sx),
        round(h * cy * sy),
        w - round(w * cx * (1 - sx)),
        h - round(h * cy * (1 - sy)),
    )
    im = im.crop(box)
    s = rng.uniform(0.5, 1.5)
    im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), WATERMARK, font=font)
    x = rng.randint(0, max(0, im.width - (right - left)))
    y = rng.randint(0, max(0, im.height - (bottom - top)))
    draw.text((x, y), WATERMARK, fill=(255, 255, 255), font=font)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.8, 1.2))
    if rng.random() < 0.5:
        im = ImageOps.mirror(im)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=rng.randint(40, 95))
    return buf.getvalue()
