"""A hostile image web for the ingestion tests: every bad input of issue 3, generated at test time.

``CorpusServer`` serves on 127.0.0.2 (a loopback address of its own) so tests can allow exactly
that address and check that redirects to 127.0.0.1 and 169.254.169.254 are refused.
"""

from __future__ import annotations

import gzip
import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    specs: dict[str, dict] = {}
    port = 0

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
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

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def __enter__(self) -> CorpusServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
