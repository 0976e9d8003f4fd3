"""The local image web used by the demo source and the tests.

A threaded HTTP server on 127.0.0.1, started lazily by ``ensure_server(cfg)`` (one per process, in a
daemon thread), answering ``GET /search?q=...&night=...&n=...`` with a JSON list of image URLs and
serving generated images under ``/img/...``. Everything is deterministic by (query, night): the
image for a URL is a pure function of the URL, so the same URL always returns the same bytes.

Night k shows a sliding window over an endless per-query stream of images: most of night k-1's
URLs come back, a quarter are new; some extra URLs are re-encoded/resized copies of earlier images
(near-duplicates with new bytes), and one URL per query and night is a bad file (a truncated JPEG
or an HTML page named .jpg).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import io
import json
import logging
import math
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import parse_qs, quote, urlsplit

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from freshnet.config import Config

log = logging.getLogger(__name__)

# Class i of cfg.classes is drawn as SHAPES[i % len(SHAPES)].
SHAPES = ["circle", "square", "triangle", "star", "ring", "cross", "hexagon", "arrow"]
_MAX_N = 1000


def night_index(night: str | int) -> int:
    """Map a night id to an integer >= 1: integers as-is, ISO dates as days (consecutive dates are
    consecutive nights), anything else by a stable hash."""
    text = str(night).strip()
    try:
        return max(1, int(text))
    except ValueError:
        pass
    try:
        day = dt.date.fromisoformat(text)
        return max(1, (day - dt.date(2026, 1, 1)).days + 1)
    except ValueError:
        pass
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 100_000 + 1


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")


def query_token(query: str) -> str:
    return hashlib.sha256(query.strip().lower().encode()).hexdigest()[:10]


# ---------------------------------------------------------------- rendering


def _polygon(
    shape: str, cx: float, cy: float, r: float, angle: float, rng: np.random.Generator
) -> list[tuple[float, float]]:
    pts: list[tuple[float, float]]
    if shape == "square":
        aspect = rng.uniform(0.8, 1.2)
        pts = [(-1, -aspect), (1, -aspect), (1, aspect), (-1, aspect)]
        pts = [(x * 0.8, y * 0.8) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        pts = [(x + rng.uniform(-0.1, 0.1), y + rng.uniform(-0.1, 0.1)) for x, y in pts]
    elif shape == "star":
        inner = rng.uniform(0.38, 0.5)
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rad = 1.0 if k % 2 == 0 else inner
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "hexagon":
        pts = [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]
    elif shape == "cross":
        t = rng.uniform(0.25, 0.35)
        pts = [
            (-t, -1),
            (t, -1),
            (t, -t),
            (1, -t),
            (1, t),
            (t, t),
            (t, 1),
            (-t, 1),
            (-t, t),
            (-1, t),
            (-1, -t),
            (-t, -t),
        ]
    elif shape == "arrow":
        pts = [(-1, -0.3), (0.2, -0.3), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, 0.3), (-1, 0.3)]
    else:  # pragma: no cover - round shapes are drawn as ellipses
        raise ValueError(shape)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    fill: tuple[int, int, int],
    rng: np.random.Generator,
    outline: tuple[int, int, int] | None = None,
    bg: object = None,
) -> None:
    angle = rng.uniform(0, 2 * math.pi)
    width = max(2, int(r * 0.06)) if outline is not None else 0
    if shape in ("circle", "ring"):
        aspect = rng.uniform(0.85, 1.15)
        box = [cx - r, cy - r * aspect, cx + r, cy + r * aspect]
        if shape == "circle":
            draw.ellipse(box, fill=fill, outline=outline, width=width)
        else:
            thick = max(3, int(r * rng.uniform(0.22, 0.35)))
            draw.ellipse(box, outline=fill, width=thick)
    else:
        draw.polygon(
            _polygon(shape, cx, cy, r, angle, rng), fill=fill, outline=outline, width=width
        )


def _colour(rng: np.random.Generator, avoid: np.ndarray | None = None) -> tuple[int, int, int]:
    for _ in range(20):
        c = rng.integers(0, 256, 3)
        if avoid is None or np.abs(c - avoid).sum() > 200:
            break
    return (int(c[0]), int(c[1]), int(c[2]))


@functools.lru_cache(maxsize=1)
def _grain_tile() -> np.ndarray:
    return np.random.default_rng(20261127).normal(0, 1, (600, 600)).astype(np.float32)


def render(shape: str, seed: int, drawing: bool = False) -> Image.Image:
    """One image of ``shape`` on a textured background with clutter; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(300, 501, 2))
    # Background: a two-colour gradient plus smooth low-frequency noise (texture).
    c1 = rng.integers(0, 256, 3).astype(np.float32)
    c2 = rng.integers(0, 256, 3).astype(np.float32)
    if drawing:  # drawings: pale paper-like backgrounds
        c1 = 180 + c1 * 0.3
        c2 = 180 + c2 * 0.3
    ang = rng.uniform(0, 2 * math.pi)
    # Built at 1/16 scale and upsampled: smooth texture at a fraction of the cost.
    sh, sw = h // 16 + 2, w // 16 + 2
    ys, xs = np.mgrid[0:sh, 0:sw].astype(np.float32)
    t = np.clip((xs * math.cos(ang) + ys * math.sin(ang)) / (sw + sh) + 0.5, 0, 1)[..., None]
    small = (
        c1 * (1 - t) + c2 * t + rng.normal(0, rng.uniform(10, 40), (sh, sw, 3)).astype(np.float32)
    )
    small = np.clip(small, 0, 255).astype(np.uint8)
    mean_bg = small.reshape(-1, 3).mean(0)
    img = Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC)
    # Fine grain on top: a window of a fixed noise tile (seeded, so bytes stay deterministic).
    oy, ox = (int(v) for v in rng.integers(0, 100, 2))
    sigma = float(rng.uniform(4, 20))
    grain_l = np.clip(_grain_tile()[oy : oy + h, ox : ox + w] * sigma + 128, 0, 255).astype(
        np.uint8
    )
    grain = Image.fromarray(grain_l, "L").convert("RGB")
    img = ImageChops.add(img, grain, 1.0, -128)
    draw = ImageDraw.Draw(img)
    side = min(w, h)
    # Clutter: lines and small shapes of any kind, kept much smaller than the subject.
    for _ in range(int(rng.integers(1, 5))):
        p = rng.uniform(0, 1, 4) * [w, h, w, h]
        draw.line([float(v) for v in p], fill=_colour(rng), width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(3, 9))):
        kind = SHAPES[int(rng.integers(0, 5))]
        r = side * rng.uniform(0.03, 0.07)
        _draw_shape(draw, kind, rng.uniform(0, w), rng.uniform(0, h), r, _colour(rng), rng)
    # The subject.
    r = side * rng.uniform(0.18, 0.34)
    cx = rng.uniform(r + 4, w - r - 4)
    cy = rng.uniform(r + 4, h - r - 4)
    outline = (20, 20, 20) if drawing else None
    _draw_shape(draw, shape, cx, cy, r, _colour(rng, mean_bg), rng, outline=outline)
    if rng.random() < 0.2:
        img = img.filter(ImageFilter.BoxBlur(float(rng.uniform(0.5, 1.5))))
    return img


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, "PNG", compress_level=1)
    else:
        img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@functools.lru_cache(maxsize=4096)
def _base_image(seed_text: str, shape: str, token: str, j: int) -> bytes:
    seed = _seed(seed_text, shape, token, j)
    rng = np.random.default_rng(seed ^ 0x5EED)
    drawing = token.endswith(("0", "1", "2", "3", "4", "5", "6", "7"))  # about half the queries
    img = render(shape, seed, drawing=drawing)
    return _encode(img, "PNG" if rng.random() < 0.08 else "JPEG", int(rng.integers(80, 96)))


@functools.lru_cache(maxsize=4096)
def image_bytes(path: str) -> tuple[bytes, str]:
    """Bytes and Content-Type for an /img/ path; raises KeyError for anything else."""
    parts = path.strip("/").split("/")
    if len(parts) != 5 or parts[0] != "img" or parts[2] not in SHAPES:
        raise KeyError(path)
    _, seed_text, shape, token, name = parts
    stem = name.rsplit(".", 1)[0]
    head, _, variant = stem.partition("-")
    if not head.isdigit():
        raise KeyError(path)
    j = int(head)
    base = _base_image(seed_text, shape, token, j)
    if not variant:
        return base, "image/png" if base.startswith(b"\x89PNG") else "image/jpeg"
    if variant.startswith("copy"):
        # A re-encoded, resized copy: new bytes, same picture (a near-duplicate).
        rng = np.random.default_rng(_seed(path))
        img = Image.open(io.BytesIO(base)).convert("RGB")
        scale = rng.uniform(0.6, 0.95)
        img = img.resize(
            (max(64, int(img.width * scale)), max(64, int(img.height * scale))),
            Image.Resampling.LANCZOS,
        )
        return _encode(img, "JPEG", int(rng.integers(60, 90))), "image/jpeg"
    if variant == "trunc":
        jpeg = (
            base
            if base.startswith(b"\xff\xd8")
            else _encode(Image.open(io.BytesIO(base)).convert("RGB"), "JPEG", 85)
        )
        return jpeg[: len(jpeg) * 3 // 5], "image/jpeg"
    if variant == "html":
        html = f"<!doctype html><html><head><title>{shape}</title></head><body><p>Sorry, this image moved.</p></body></html>"
        return html.encode(), "text/html; charset=utf-8"
    raise KeyError(path)


def search_paths(query: str, night: str | int, n: int, shape: str, seed: int = 0) -> list[str]:
    """The /img/ paths the image web answers for ``query`` on ``night`` (deterministic)."""
    n = max(1, min(int(n), _MAX_N))
    k = night_index(night)
    token = query_token(query)
    step = max(1, n // 4)  # new images per night
    start = (k - 1) * step
    prefix = f"/img/{seed}/{shape}/{token}"
    paths = [f"{prefix}/{j}.jpg" for j in range(start, start + n)]
    rng = np.random.default_rng(_seed(seed, token, k))
    # Copies of earlier images (or, on the first night, of tonight's own).
    pool_end = start if start > 0 else n
    for c in range(max(1, n // 10)):
        j = int(rng.integers(0, pool_end))
        paths.append(f"{prefix}/{j}-copy{k}x{c}.jpg")
    bad = "trunc" if (k + int(token[:2], 16)) % 2 == 0 else "html"
    paths.append(f"{prefix}/{int(rng.integers(start, start + n))}-{bad}.jpg")
    order = rng.permutation(len(paths))
    return [paths[i] for i in order]


# ---------------------------------------------------------------- server


@dataclass
class _State:
    classes: list[str]
    seed: int


class _Handler(BaseHTTPRequestHandler):
    server_version = "freshnet-demo/1"
    state: _State  # set on the subclass made by ensure_server

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("demo web: " + fmt, *args)

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == "/search":
            self._search(parse_qs(parts.query))
            return
        try:
            body, ctype = image_bytes(parts.path)
        except KeyError:
            self._send(404, b"not found", "text/plain")
            return
        self._send(200, body, ctype)

    def _search(self, qs: dict[str, list[str]]) -> None:
        query = (qs.get("q") or [""])[0]
        night = (qs.get("night") or ["1"])[0]
        try:
            n = int((qs.get("n") or ["40"])[0])
        except ValueError:
            self._send(400, b'{"error": "n must be an integer"}', "application/json")
            return
        given = qs.get("label")
        label: str | None = given[0] if given else None
        classes = self.state.classes
        if label is None:
            hits = [c for c in classes if c.lower() in query.lower()]
            label = max(hits, key=len) if hits else None
        if label not in classes:
            self._send(200, b"[]", "application/json")
            return
        shape = SHAPES[classes.index(label) % len(SHAPES)]
        addr = cast(tuple[str, int], self.server.server_address)  # a TCP server's (host, port)
        host = f"http://{addr[0]}:{addr[1]}"
        urls = [host + quote(p) for p in search_paths(query, night, n, shape, self.state.seed)]
        self._send(200, json.dumps(urls).encode(), "application/json")


_lock = threading.Lock()
_server: ThreadingHTTPServer | None = None
_state: _State | None = None


def ensure_server(cfg: Config) -> str:
    """Start the image web once per process (daemon thread) and return its base URL."""
    global _server, _state
    with _lock:
        if _server is None:
            _state = _State(list(cfg.classes), cfg.source.demo_seed)
            handler = type("DemoHandler", (_Handler,), {"state": _state})
            srv = ThreadingHTTPServer(("127.0.0.1", cfg.source.demo_port), handler)
            srv.daemon_threads = True
            threading.Thread(
                target=srv.serve_forever, name="freshnet-demo-web", daemon=True
            ).start()
            _server = srv
            log.info("demo image web on http://127.0.0.1:%d", srv.server_address[1])
        else:
            # One server per process: a later config only changes which classes it answers.
            assert _state is not None
            _state.classes = list(cfg.classes)
            _state.seed = cfg.source.demo_seed
        return f"http://127.0.0.1:{_server.server_address[1]}"


def stop_server() -> None:
    """Stop the image web (tests)."""
    global _server
    with _lock:
        if _server is not None:
            _server.shutdown()
            _server.server_close()
            _server = None
