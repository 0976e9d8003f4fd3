"""Exact and near-duplicate detection: 64-bit perceptual hashes, a multi-index Hamming search, groups.

Near-duplicates are found with the pHash (imagehash-compatible, computed once at ingest) and a
Hamming threshold, then confirmed with a second, independent signal: a 64-bit dHash of the stored
normalized image. At a million images a loose pHash threshold alone yields thousands of chance
matches between unrelated photos; requiring both signals makes those vanishingly rare.

The search is multi-index hashing: the 64 bits are split into ``m`` bands; by the pigeonhole
principle two hashes within distance ``k`` agree within ``k // m`` bits on at least one band, so
candidates come from a dense bucket table per band (numpy, no Python loop per image) and are
verified with a popcount. The index is persisted as append-only segments (``.npy`` arrays inside
one ``.npz`` per night), so a night writes O(new) bytes and searches O(new × bucket) candidates.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

from freshnet.storage import NotFound, Storage

log = logging.getLogger(__name__)

HASH_BITS = 64
_U64 = np.uint64


class IndexError_(RuntimeError):
    """The persisted near-duplicate index is missing, corrupt or out of step with the catalog."""


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


# ---------------------------------------------------------------------------------------------
# Multi-index Hamming search


def _flip_masks(width: int, radius: int) -> np.ndarray:
    masks = [0]
    for r in range(1, radius + 1):
        for bits in combinations(range(width), r):
            m = 0
            for b in bits:
                m |= 1 << b
            masks.append(m)
    return np.array(masks, dtype=np.int64)


def _ball(width: int, radius: int) -> int:
    return sum(math.comb(width, r) for r in range(radius + 1))


def plan_bands(k: int, n: int) -> tuple[list[int], list[int]]:
    """Band widths and per-band search radii for threshold ``k`` over ``n`` hashes (cheapest plan)."""
    best: tuple[float, list[int], list[int]] | None = None
    for m in range(3, 17):
        widths = [HASH_BITS // m + (1 if i < HASH_BITS % m else 0) for i in range(m)]
        if max(widths) > 22:  # dense bucket tables stay <= 16 MiB per band
            continue
        # Pigeonhole: sum(r_i + 1) > k guarantees one band within its radius; spread evenly.
        radii = [(k + 1) // m + (1 if i < (k + 1) % m else 0) - 1 for i in range(m)]
        radii = sorted(radii)  # widest bands (first) get the smallest radius
        cost = 0.0
        for w, r in zip(widths, radii, strict=True):
            if r < 0:
                continue
            v = _ball(w, r)
            cost += v * (1.0 + max(n, 1) / 2.0**w)
        if best is None or cost < best[0]:
            best = (cost, widths, radii)
    assert best is not None
    return best[1], best[2]


@dataclass
class _Band:
    shift: int
    width: int
    radius: int
    masks: np.ndarray  # (V,) int32 flips that enumerate the ball of ``radius`` bits
    counts: np.ndarray  # (2**width + 1,) int32 bucket sizes; the extra last bucket stays empty
    offsets: np.ndarray  # (2**width,) int32 bucket starts into ``order``
    order: np.ndarray  # (n,) int32 positions sorted by band key
    sorted_keys: np.ndarray  # (n,) int32 band keys in that order
    sorted_hashes: np.ndarray  # hashes[order]: the popcount reads them contiguously

    def keys_of(self, hashes: np.ndarray) -> np.ndarray:
        return ((hashes >> _U64(self.shift)) & _U64((1 << self.width) - 1)).astype(np.int32)


def _build_bands(hashes: np.ndarray, k: int) -> list[_Band]:
    if len(hashes) >= 2**31:
        raise ValueError(
            f"near-duplicate index holds {len(hashes)} hashes; at most 2**31 - 1 supported"
        )
    widths, radii = plan_bands(k, len(hashes))
    bands = []
    shift = HASH_BITS
    for w, r in zip(widths, radii, strict=True):
        shift -= w
        if r < 0:
            continue
        keys = ((hashes >> _U64(shift)) & _U64((1 << w) - 1)).astype(np.int32)
        order = np.argsort(keys, kind="stable").astype(np.int32)
        counts = np.zeros((1 << w) + 1, np.int32)
        counts[: 1 << w] = np.bincount(keys, minlength=1 << w)
        offsets = np.zeros(1 << w, np.int32)
        np.cumsum(counts[:-2], out=offsets[1:])
        masks = _flip_masks(w, r).astype(np.int32)
        bands.append(_Band(shift, w, r, masks, counts, offsets, order, keys[order], hashes[order]))
    return bands


def _search_chunk(
    band: _Band,
    q_order: np.ndarray,
    q_keys: np.ndarray,
    q_hashes: np.ndarray,
    start: int,
    chunk: int,
    k: int,
    self_join: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    empty = np.int32(1 << band.width)  # index of the always-empty extra bucket
    key = q_keys[start : start + chunk]
    c = len(key)
    keys = band.masks[:, None] ^ key[None, :]  # (V, c), mask-major
    if self_join:
        # Each pair in different buckets is found from both sides: keep the smaller key's.
        keys[1:] = np.where(keys[1:] > key[None, :], keys[1:], empty)
    keys = keys.ravel()
    cnt = band.counts[keys]
    nz = np.flatnonzero(cnt)
    if len(nz) == 0:
        return None
    cnt = cnt[nz]
    lo = band.offsets[keys[nz]]
    qi = (nz % c).astype(np.int32)
    total = int(cnt.sum(dtype=np.int64))
    starts = np.cumsum(cnt, dtype=np.int64) - cnt
    pos = np.arange(total, dtype=np.int64) + np.repeat(lo - starts, cnt)
    qrep = np.repeat(qi, cnt)
    d = hamming(q_hashes[start + qrep], band.sorted_hashes[pos])
    hit: np.ndarray = d <= k
    if self_join:
        # Same bucket (mask 0, the first c entries): keep the pair once, query before target.
        same = np.repeat(nz < c, cnt)
        hit &= ~same | (pos > start + qrep)
    hit = np.flatnonzero(hit)
    if len(hit) == 0:
        return None
    return (
        q_order[start + qrep[hit]].astype(np.int64),
        band.order[pos[hit]].astype(np.int64),
        d[hit].astype(np.int64),
    )


def _search(
    bands: list[_Band],
    queries: np.ndarray | None,
    k: int,
    chunk: int = 8192,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (query position, indexed position, distance) with distance <= k, each pair once.

    ``queries=None`` is the self-join of the indexed hashes: each unordered pair once, as (i < j).
    Queries are visited in band-key order, mask by mask, so the bucket tables are read almost
    sequentially (random reads into a 16 MiB table were 2-3x slower). Chunks run in threads:
    numpy releases the GIL in the gathers and popcounts that are the whole cost.
    """
    self_join = queries is None
    tasks = []
    for band in bands:
        if queries is None:  # self_join
            q_order, q_keys, q_hashes = band.order, band.sorted_keys, band.sorted_hashes
        else:
            keys = band.keys_of(queries)
            q_order = np.argsort(keys, kind="stable").astype(np.int32)
            q_keys, q_hashes = keys[q_order], queries[q_order]
        for start in range(0, len(q_keys), chunk):
            tasks.append((band, q_order, q_keys, q_hashes, start, chunk, k, self_join))
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if workers > 1 and len(tasks) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            found = list(pool.map(lambda t: _search_chunk(*t), tasks))
    else:
        found = [_search_chunk(*t) for t in tasks]
    found = [f for f in found if f is not None]
    if not found:
        e = np.zeros(0, np.int64)
        return e, e.copy(), e.copy()
    fq, ft, fd = (np.concatenate(x) for x in zip(*found, strict=True))
    if self_join:
        fq, ft = np.minimum(fq, ft), np.maximum(fq, ft)
    # One pair can be found through several bands.
    _, first = np.unique(fq * np.int64(1 << 31) + ft, return_index=True)
    return fq[first], ft[first], fd[first]


def find_pairs(hashes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j of ``hashes`` with Hamming distance <= k: (i, j, distance), sorted by (i, j)."""
    hashes = np.ascontiguousarray(hashes, dtype=_U64)
    if len(hashes) < 2:
        e = np.zeros(0, np.int64)
        return e, e.copy(), e.copy()
    qi, ti, d = _search(_build_bands(hashes, k), None, k)
    order = np.lexsort((ti, qi))
    return qi[order], ti[order], d[order]


def brute_force_pairs(
    hashes: np.ndarray, k: int, block: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference all-pairs search (O(n²)); used by tests and benchmarks to check ``find_pairs``."""
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


# ---------------------------------------------------------------------------------------------
# Persisted index


@dataclass
class HashIndex:
    """All hashes ever accepted, in catalog row order; band tables are built lazily per threshold."""

    phash: np.ndarray = field(default_factory=lambda: np.zeros(0, _U64))
    dhash: np.ndarray = field(default_factory=lambda: np.zeros(0, _U64))
    has_dhash: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    tag: np.ndarray = field(default_factory=lambda: np.zeros(0, _U64))  # sha256[:16] per row
    segments: list[str] = field(default_factory=list)
    _bands: dict[int, list[_Band]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.phash)

    def query(self, phash: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query position, index row, distance) for every indexed hash within ``k`` of a query."""
        if len(self) == 0 or len(phash) == 0:
            e = np.zeros(0, np.int64)
            return e, e.copy(), e.copy()
        if k not in self._bands:
            self._bands[k] = _build_bands(self.phash, k)
        return _search(self._bands[k], np.asarray(phash, dtype=_U64), k)

    def appended(
        self, phash: np.ndarray, dhash: np.ndarray, has_dhash: np.ndarray, tag: np.ndarray
    ) -> HashIndex:
        return HashIndex(
            np.concatenate([self.phash, np.asarray(phash, _U64)]),
            np.concatenate([self.dhash, np.asarray(dhash, _U64)]),
            np.concatenate([self.has_dhash, np.asarray(has_dhash, bool)]),
            np.concatenate([self.tag, np.asarray(tag, _U64)]),
            list(self.segments),
        )


def tags_of(shas: Sequence[str]) -> np.ndarray:
    return hex_to_u64([s[:16] for s in shas])


def encode_segment(
    phash: np.ndarray, dhash: np.ndarray, has_dhash: np.ndarray, tag: np.ndarray
) -> bytes:
    buf = io.BytesIO()
    np.savez(
        buf,
        phash=np.asarray(phash, _U64),
        dhash=np.asarray(dhash, _U64),
        has_dhash=np.asarray(has_dhash, bool),
        tag=np.asarray(tag, _U64),
    )
    return buf.getvalue()


def write_segment(
    store: Storage,
    key: str,
    phash: np.ndarray,
    dhash: np.ndarray,
    has_dhash: np.ndarray,
    tag: np.ndarray,
) -> str:
    """Persist one append-only index segment (the rows a night added); returns its key."""
    store.put(key, encode_segment(phash, dhash, has_dhash, tag))
    return key


def load_index(store: Storage, segment_keys: Sequence[str]) -> HashIndex:
    """Concatenate the persisted segments, in order; raises IndexError_ naming a bad segment."""
    parts: dict[str, list[np.ndarray]] = {"phash": [], "dhash": [], "has_dhash": [], "tag": []}
    for key in segment_keys:
        try:
            raw = store.get(key)
        except NotFound:
            raise IndexError_(f"near-duplicate index segment {store.url(key)} is missing") from None
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                arrays = {name: z[name] for name in parts}
        except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt segment
            raise IndexError_(
                f"near-duplicate index segment {store.url(key)} is corrupt: {exc}"
            ) from None
        n = len(arrays["phash"])
        if any(len(a) != n for a in arrays.values()):
            raise IndexError_(
                f"near-duplicate index segment {store.url(key)}: arrays differ in length"
            )
        for name, a in arrays.items():
            parts[name].append(a)
    if not segment_keys:
        return HashIndex()
    return HashIndex(
        np.concatenate(parts["phash"]).astype(_U64),
        np.concatenate(parts["dhash"]).astype(_U64),
        np.concatenate(parts["has_dhash"]).astype(bool),
        np.concatenate(parts["tag"]).astype(_U64),
        list(segment_keys),
    )


# ---------------------------------------------------------------------------------------------
# Groups


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int = 0):
        self.parent = list(range(n))
        self.size = [1] * n

    def add(self) -> int:
        self.parent.append(len(self.parent))
        self.size.append(1)
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return ra

    def groups(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            out.setdefault(self.find(i), []).append(i)
        return out


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component label per node for an edge list (vectorized; for large batches)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    labels: np.ndarray = connected_components(g, directed=False)[1]
    return labels


def confirm(
    index: HashIndex,
    rows: np.ndarray,
    dhash: np.ndarray,
    has_dhash: np.ndarray,
    phash_dist: np.ndarray,
    confirm_threshold: int,
    unconfirmed_threshold: int,
) -> np.ndarray:
    """Which pHash candidates the second signal confirms (dHash within ``confirm_threshold``).

    Where either side has no dHash (its stored image was unreadable), only a pHash distance within
    ``unconfirmed_threshold`` counts, a level at which chance matches are negligible.
    """
    both = index.has_dhash[rows] & has_dhash
    ok_d = hamming(index.dhash[rows], dhash) <= confirm_threshold
    return np.where(both, ok_d, phash_dist <= unconfirmed_threshold)


def phash_image(im: Image.Image) -> int:
    """64-bit pHash of a decoded image (same bits as imagehash.phash, up to float rounding)."""
    g = im.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    return int(phash_from_gray32(np.asarray(g)[None])[0])
