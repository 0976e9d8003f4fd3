"""A hostile image web for the ingestion tests: every bad input of issues 3 and 13, generated at test time.

``CorpusServer`` serves on 127.0.0.2 (a loopback address of its own) so tests can allow exactly
that address and check that redirects to 127.0.0.1 and 169.254.169.254 are refused.
"""

from __future__ import annotations

import functools
import gzip
import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

HOST = "127.0.0.2"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A valid PNG header claiming a huge image, with a tiny body: decoding it would need ~10 GB."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


_ADLER_BASE = 65521


def _adler32_combine(a1: int, a2: int, len2: int) -> int:
    """Adler-32 of A + B from those of A and B (zlib's adler32_combine, which Python lacks)."""
    rem = len2 % _ADLER_BASE
    s1 = a1 & 0xFFFF
    s2 = (rem * s1) % _ADLER_BASE
    s1 += (a2 & 0xFFFF) + _ADLER_BASE - 1
    s2 += ((a1 >> 16) & 0xFFFF) + ((a2 >> 16) & 0xFFFF) + _ADLER_BASE - rem
    return (s1 % _ADLER_BASE) | ((s2 % _ADLER_BASE) << 16)


def _repeated_zlib(parts: list[tuple[bytes, int]]) -> bytes:
    """A zlib stream of ``unit * count`` for each part, without compressing every copy: after a
    full flush deflate starts afresh, so each copy of a unit is the same compressed block."""
    blocks, adler = [], 1
    for unit, count in parts:
        co = zlib.compressobj(9, zlib.DEFLATED, -15)
        blocks.append((co.compress(unit) + co.flush(zlib.Z_FULL_FLUSH)) * count)
        a, length = zlib.adler32(unit), len(unit)
        while count:  # Adler-32 of unit * count by doubling
            if count & 1:
                adler = _adler32_combine(adler, a, length)
            a, length, count = _adler32_combine(a, a, length), 2 * length, count >> 1
    end = zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # an empty final block
    return b"\x78\xda" + b"".join(blocks) + end + struct.pack(">I", adler)


@functools.cache
def flat_png(width: int, height: int, bit_depth: int, colour_type: int, pixel: bytes) -> bytes:
    """A valid PNG of one repeated pixel, never held as pixels: a decode-time memory bomb of
    hundreds of MB costs a few hundred KB and a few milliseconds to build."""
    row = b"\x00" + pixel * width
    k = 64  # rows per compressed unit
    idat = _repeated_zlib([(row * k, height // k), (row, height % k)])
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


# Issue 13's memory bombs, all under the 64-megapixel cap but for the 12000² one:
# 16-bit grey 7999² (~140 KB; decoding used to peak at 1.2 GB), 8-bit RGB 12000² (~450 KB),
# and RGBA 7999² (~270 KB; 8 bytes per pixel to decode and shrink: 512 MB).
def png16_bomb() -> bytes:
    return flat_png(7999, 7999, 16, 0, b"\x9c\x40")  # grey 40000 of 65535


def png_huge() -> bytes:
    return flat_png(12000, 12000, 8, 2, b"\x80\x60\x40")


def rgba_bomb() -> bytes:
    return flat_png(7999, 7999, 8, 6, b"\x80\x40\x20\xff")


@functools.cache
def photo_like_jpeg(size: tuple[int, int] = (640, 480), progressive: bool = False) -> bytes:
    """Smooth gradients plus noise: no exact-grey areas, like a real photo."""
    w, h = size
    rng = np.random.default_rng(13)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 200 // w, y * 200 // h, (x + y) * 100 // (w + h)], axis=-1) + 20
    arr = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
    return _save(Image.fromarray(arr, "RGB"), "JPEG", quality=90, progressive=progressive)


def cut_eoi_jpeg(fraction: float = 0.8) -> bytes:
    """A JPEG cut at ``fraction`` of its bytes and closed with an EOI marker: Pillow decodes it
    without an error, the missing blocks flat grey."""
    data = photo_like_jpeg()
    return data[: int(len(data) * fraction)] + b"\xff\xd9"


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def halves(size: tuple[int, int], left: tuple, right: tuple, mode: str = "RGB") -> Image.Image:
    """Left half one colour, right half another: lets tests check orientation after EXIF transpose."""
    img = Image.new(mode, size, left)
    img.paste(Image.new(mode, (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return img


def good_jpeg(size=(320, 240), colour=(200, 30, 30)) -> bytes:
    return _save(Image.new("RGB", size, colour), "JPEG", quality=92)


def exif_rotated_jpeg() -> bytes:
    """Stored 240x120 landscape (left red, right blue) with EXIF orientation 6: displays as portrait, red on top."""
    img = halves((240, 120), (255, 0, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(img, "JPEG", quality=95, exif=exif.tobytes())


def cmyk_jpeg() -> bytes:
    return _save(Image.new("CMYK", (200, 150), (0, 255, 255, 0)), "JPEG", quality=95)  # red


def png16() -> bytes:
    img = Image.new("I;16", (160, 120), 40000)
    return _save(img, "PNG")


def palette_png_transparent() -> bytes:
    """Palette PNG: left half transparent, right half green."""
    img = Image.new("P", (160, 120), 0)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    img.paste(1, (80, 0, 160, 120))
    return _save(img, "PNG", transparency=0)


def la_png() -> bytes:
    img = Image.new("LA", (100, 100), (50, 0))  # fully transparent grey -> white
    return _save(img, "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (120, 90), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def webp() -> bytes:
    return _save(Image.new("RGB", (200, 100), (0, 0, 255)), "WEBP", quality=90)


def big_jpeg() -> bytes:
    return _save(halves((1200, 800), (255, 255, 0), (0, 128, 0)), "JPEG", quality=90)


# path -> (expected status, response spec); specs are interpreted by the handler below.
def corpus() -> dict[str, tuple[str, dict]]:
    trunc = big_jpeg()
    gz_bomb = gzip.compress(b"\x00" * 40_000_000, compresslevel=9)
    return {
        "/good.jpg": ("accepted", {"body": good_jpeg()}),
        "/zero.jpg": ("not_image", {"body": b""}),
        "/truncated.jpg": ("decode_error", {"body": trunc[: len(trunc) // 2]}),
        "/page.jpg": (
            "not_image",
            {"body": b"<!DOCTYPE html><html><body>hi</body></html>", "ctype": "image/jpeg"},
        ),
        "/vector.svg": (
            "not_image",
            {
                "body": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="500" height="500"/>'
            },
        ),
        "/bomb.png": ("bomb", {"body": png_bomb()}),
        "/gzip-bomb.jpg": ("too_large", {"body": gz_bomb, "headers": {"Content-Encoding": "gzip"}}),
        "/sixteen.png": ("accepted", {"body": png16()}),
        "/cmyk.jpg": ("accepted", {"body": cmyk_jpeg()}),
        "/palette.png": ("accepted", {"body": palette_png_transparent()}),
        "/la.png": ("accepted", {"body": la_png()}),
        "/anim.gif": ("accepted", {"body": animated_gif()}),
        "/image.webp": ("accepted", {"body": webp()}),
        "/rotated.jpg": ("accepted", {"body": exif_rotated_jpeg()}),
        "/big.jpg": ("accepted", {"body": big_jpeg()}),
        "/pixel.png": ("too_small", {"body": _save(Image.new("RGB", (1, 1)), "PNG")}),
        "/drip.jpg": ("timeout", {"drip": good_jpeg()}),
        "/loop-a": ("too_many_redirects", {"redirect": "/loop-b"}),
        "/loop-b": ("too_many_redirects", {"redirect": "/loop-a"}),
        "/chain-0": ("too_many_redirects", {"redirect": "/chain-1"}),
        "/to-good": ("accepted", {"redirect": "/good2.jpg"}),
        "/good2.jpg": ("accepted", {"body": good_jpeg(colour=(10, 200, 10))}),
        "/to-localhost": ("blocked_address", {"redirect": "http://127.0.0.1:{port}/good.jpg"}),
        "/to-metadata": (
            "blocked_address",
            {"redirect": "http://169.254.169.254/latest/meta-data/"},
        ),
        "/missing.jpg": ("http_4xx", {"status": 404}),
        "/error.jpg": ("http_5xx", {"status": 500}),
        "/lying-length.jpg": (
            "truncated",
            {"body": good_jpeg(), "headers": {"Content-Length": "500000"}},
        ),
        "/declared-huge.jpg": (
            "too_large",
            {"body": b"\xff\xd8\xff" + b"\x00" * 100, "headers": {"Content-Length": "999999999"}},
        ),
        # Bodies given as functions are built on first request (once per session).
        "/sixteen-bomb.png": ("accepted", {"body": png16_bomb}),  # within the byte budget
        "/huge.png": ("bomb", {"body": png_huge}),  # over max_pixels
        "/rgba-bomb.png": ("bomb", {"body": rgba_bomb}),  # under max_pixels, over the byte budget
        "/cut-eoi.jpg": ("decode_error", {"body": cut_eoi_jpeg}),
        "/cut-eoi-late.jpg": ("decode_error", {"body": lambda: cut_eoi_jpeg(0.97)}),
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    specs: dict[str, dict] = {}
    port = 0

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path.startswith("/chain-"):
            k = int(path.rsplit("-", 1)[1])
            self.send_response(302)
            self.send_header("Location", f"/chain-{k + 1}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        spec = self.specs.get(path)
        if spec is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if "status" in spec:
            body = b"nope"
            self.send_response(spec["status"])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if "redirect" in spec:
            self.send_response(302)
            self.send_header("Location", spec["redirect"].format(port=self.port))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if "drip" in spec:
            body = spec["drip"]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for i in range(0, len(body), 16):  # 16 bytes every 0.2 s: each read is "fast"
                    self.wfile.write(body[i : i + 16])
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
            self.close_connection = True
            return
        body = spec["body"]
        if callable(body):
            body = body()
        headers = {
            "Content-Type": spec.get("ctype", "application/octet-stream"),
            "Content-Length": str(len(body)),
        }
        headers.update(spec.get("headers", {}))
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass
        self.close_connection = True


class CorpusServer:
    """Serve ``corpus()`` on HOST in a daemon thread; ``url(path)`` builds absolute URLs."""

    def __init__(self, host: str = HOST):
        self.cases = corpus()
        handler = type(
            "CorpusHandler", (_Handler,), {"specs": {p: s for p, (_, s) in self.cases.items()}}
        )
        self.server = ThreadingHTTPServer((host, 0), handler)
        self.server.daemon_threads = True
        handler.port = self.server.server_address[1]
        self.host = host
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def build_all(self) -> CorpusServer:
        """Build every lazy body now (a body built on request can outlast a short read timeout)."""
        for spec in self.server.RequestHandlerClass.specs.values():
            if callable(spec.get("body")):
                spec["body"] = spec["body"]()
        return self

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def __enter__(self) -> CorpusServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
