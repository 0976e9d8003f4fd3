"""Multi-index Hamming search: every pair of 64-bit hashes within ``k`` bits, without O(n²).

The 64 bits are split into ``m`` bands; by the pigeonhole principle two hashes within distance
``k`` agree within ``k // m`` bits on at least one band, so candidates come from a dense bucket
table per band (numpy, no Python loop per image) and are verified with a popcount.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from freshnet.data.hashing import HASH_BITS, hamming

_U64 = np.uint64


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
class Band:
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


def build_bands(hashes: np.ndarray, k: int) -> list[Band]:
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
        bands.append(Band(shift, w, r, masks, counts, offsets, order, keys[order], hashes[order]))
    return bands


def _search_chunk(
    band: Band,
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


def search_bands(
    bands: list[Band],
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
    qi, ti, d = search_bands(build_bands(hashes, k), None, k)
    order = np.lexsort((ti, qi))
    return qi[order], ti[order], d[order]
