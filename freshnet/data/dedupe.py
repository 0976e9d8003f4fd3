"""Near-duplicates: the persisted index of every accepted hash, two-signal confirmation, groups.

Near-duplicates are found with the pHash (imagehash-compatible, computed once at ingest) and a
Hamming threshold, then confirmed with a second, independent signal: a 64-bit dHash of the stored
normalized image. At a million images a loose pHash threshold alone yields thousands of chance
matches between unrelated photos; requiring both signals makes those vanishingly rare.

The index is searched with multi-index hashing (hamming_search.py) and persisted as append-only
segments (``.npy`` arrays inside one ``.npz`` per night), so a night writes O(new) bytes and
searches O(new × bucket) candidates.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from freshnet.data.hamming_search import Band, build_bands, search_bands
from freshnet.data.hashing import hamming, hex_to_u64
from freshnet.storage import NotFound, Storage

_U64 = np.uint64


class IndexError_(RuntimeError):
    """The persisted near-duplicate index is missing, corrupt or out of step with the catalog."""


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
    _bands: dict[int, list[Band]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.phash)

    def query(self, phash: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query position, index row, distance) for every indexed hash within ``k`` of a query."""
        if len(self) == 0 or len(phash) == 0:
            e = np.zeros(0, np.int64)
            return e, e.copy(), e.copy()
        if k not in self._bands:
            self._bands[k] = build_bands(self.phash, k)
        return search_bands(self._bands[k], np.asarray(phash, dtype=_U64), k)

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
