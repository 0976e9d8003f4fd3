"""Reference implementations that freshnet's hashing is checked and measured against.

Used by tests/test_dedupe.py and benchmarks/dedupe.py only; the nightly path hashes bytes
(``freshnet.data.hashing.signals_from_bytes``) and searches with ``hamming_search.find_pairs``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from freshnet.data.hashing import _grey_thumbs, dhash_from_gray9x8, phash_from_gray32

log = logging.getLogger(__name__)
_U64 = np.uint64


def dhash_image(im: Image.Image) -> int:
    """64-bit dHash of a decoded image (same bits as imagehash.dhash)."""
    g = im.convert("L").resize((9, 8), Image.Resampling.LANCZOS)
    return int(dhash_from_gray9x8(np.asarray(g)[None])[0])


def _hash_chunk(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(paths)
    a = np.zeros((n, 32, 32), np.uint8)
    b = np.zeros((n, 8, 9), np.uint8)
    ok = np.zeros(n, bool)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                a[i], b[i] = _grey_thumbs(im)
            ok[i] = True
        except Exception as exc:  # noqa: BLE001 - one bad file must not lose the batch
            log.warning("cannot hash %s: %s", p, exc)
    return phash_from_gray32(a), dhash_from_gray9x8(b), ok


def hash_files(
    paths: Sequence[str | Path], workers: int | None = None, chunk: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pHash, dHash, ok) uint64/bool arrays for image files, hashed in ``workers`` threads."""
    names = [str(p) for p in paths]
    chunks = [names[i : i + chunk] for i in range(0, len(names), chunk)]
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if workers <= 1 or len(chunks) <= 1:
        parts = [_hash_chunk(c) for c in chunks]
    else:
        # Threads, not processes: Pillow releases the GIL while decoding, which is the whole cost.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(_hash_chunk, chunks))
    if not parts:
        empty = np.zeros(0, _U64)
        return empty, empty.copy(), np.zeros(0, bool)
    phash, dhash, has_dhash = (np.concatenate(x) for x in zip(*parts, strict=True))
    return phash, dhash, has_dhash


def brute_force_pairs(
    hashes: np.ndarray, k: int, block: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference all-pairs search (O(n²)); what ``find_pairs`` must equal."""
    hashes = np.asarray(hashes, dtype=_U64)
    out_i, out_j, out_d = [], [], []
    for s in range(0, len(hashes), block):
        rest = hashes[s:]  # upper triangle only: j >= s
        d = np.bitwise_count(hashes[s : s + block, None] ^ rest[None, :])
        i, j = np.nonzero(d <= k)
        keep = j > i
        i, j = i[keep], j[keep]
        out_d.append(d[i, j])
        out_i.append(i + s)
        out_j.append(j + s)
    if not out_i:
        e = np.zeros(0, np.int64)
        return e, e.copy(), e.copy()
    i, j, d = (np.concatenate(x).astype(np.int64) for x in (out_i, out_j, out_d))
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]
