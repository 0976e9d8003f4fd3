"""Perceptual image hashes: 64-bit pHash and dHash (imagehash-compatible) as uint64, batched.

The pHash is computed once at ingest and kept in the record; the dHash of the stored normalized
image is the second, independent signal that confirms a near-duplicate (see dedupe.py).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

HASH_BITS = 64
_U64 = np.uint64


# ---------------------------------------------------------------------------------------------
# Hash encoding helpers


def hex_to_u64(values: Iterable[str]) -> np.ndarray:
    """16-hex-char hashes to a uint64 array (bit 63 = first bit of the hash, as imagehash prints it)."""
    out = [int(v, 16) for v in values]
    return np.array(out, dtype=_U64)


def u64_to_hex(values: np.ndarray) -> list[str]:
    return [f"{int(v):016x}" for v in np.asarray(values, dtype=_U64)]


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Elementwise Hamming distance between uint64 hashes."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, dtype=_U64), np.asarray(b, dtype=_U64)))


def _bits_to_u64(bits: np.ndarray) -> np.ndarray:
    """(N, 64) booleans, row-major like imagehash, to uint64 (first bit most significant)."""
    packed = np.packbits(bits.astype(np.uint8), axis=1)  # (N, 8) big-endian bytes
    return packed.view(">u8").ravel().astype(_U64)


# ---------------------------------------------------------------------------------------------
# Perceptual hashes, vectorized over a batch


def _dct_matrix(n: int = 32, keep: int = 8) -> np.ndarray:
    # scipy.fftpack.dct type II, unnormalized: y[k] = 2 * sum x[n] cos(pi k (2n+1) / 2N)
    k = np.arange(keep)[:, None]
    i = np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))


_DCT = _dct_matrix()


def phash_from_gray32(gray: np.ndarray) -> np.ndarray:
    """pHash of (N, 32, 32) grey images: low 8×8 DCT coefficients above their median (imagehash algorithm)."""
    x = np.asarray(gray, dtype=np.float64).reshape(-1, 32, 32)
    low = np.einsum("ki,nij,lj->nkl", _DCT, x, _DCT, optimize=True).reshape(len(x), 64)
    med = np.median(low, axis=1, keepdims=True)
    return _bits_to_u64(low > med)


def dhash_from_gray9x8(gray: np.ndarray) -> np.ndarray:
    """dHash of (N, 8, 9) grey images: is each pixel brighter than its left neighbour (imagehash algorithm)."""
    x = np.asarray(gray, dtype=np.int16).reshape(-1, 8, 9)
    return _bits_to_u64((x[:, :, 1:] > x[:, :, :-1]).reshape(len(x), 64))


def _grey_thumbs(im: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    if im.format == "JPEG":
        # Decode at 1/2..1/8 DCT scale (still >= 32 px): most of the decoding cost disappears and
        # the 32×32 thumbnail is the same up to resampling noise (measured: benchmarks/dedupe.py).
        im.draft("L", (32, 32))
    g = im.convert("L")
    a = np.asarray(g.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.uint8)
    b = np.asarray(g.resize((9, 8), Image.Resampling.LANCZOS), dtype=np.uint8)
    return a, b


def signals_from_bytes(data: bytes) -> tuple[int, int]:
    """(pHash, dHash) of encoded image bytes, fast path (reduced-scale JPEG decode)."""
    with Image.open(io.BytesIO(data)) as im:
        a, b = _grey_thumbs(im)
    return int(phash_from_gray32(a[None])[0]), int(dhash_from_gray9x8(b[None])[0])


def phash_image(im: Image.Image) -> int:
    """64-bit pHash of a decoded image (same bits as imagehash.phash, up to float rounding)."""
    g = im.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    return int(phash_from_gray32(np.asarray(g)[None])[0])
