"""Curation stages 2 and 3: which of tonight's images are near each other or near a catalog group
(pHash confirmed by dHash, then disguised copies by embedding)."""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from freshnet.data import copies, dedupe, embed_cache, hamming_search, hashing
from freshnet.data.batch import History
from freshnet.data.images import image_key
from freshnet.storage import NotFound, Storage

log = logging.getLogger(__name__)


@dataclass
class Hashes:
    """The near-duplicate signals of the pending images, by pending index."""

    phash: np.ndarray
    dhash: np.ndarray
    has_dhash: np.ndarray  # False: stored bytes missing or unreadable, pHash alone


def _signals(store: Storage, sha: str, phash: str | None) -> tuple[int, int, bool]:
    try:
        data = store.get(image_key(sha))
    except NotFound:
        data = None
    p = int(phash, 16) if phash else None
    if data is None:
        if p is None:
            raise ValueError(
                f"image {sha} has no phash and is not in storage ({store.url(image_key(sha))})"
            )
        log.warning("image %s not in storage: near-duplicate check on pHash alone", sha)
        return p, 0, False
    try:
        fp, dh = hashing.signals_from_bytes(data)
        if p is None:
            with Image.open(io.BytesIO(data)) as im:
                p = hashing.phash_image(im)
        return p, dh, True
    except Exception as exc:  # noqa: BLE001 - a bad stored file must not stop the night
        if p is None:
            raise ValueError(f"image {sha}: no phash and stored bytes unreadable: {exc}") from None
        log.warning("image %s unreadable (%s): near-duplicate check on pHash alone", sha, exc)
        return p, 0, False


def _copy_pairs(
    store: Storage, existing: Sequence[str], pending: Sequence[dict[str, Any]], ddc: Any
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Disguised-copy pairs: (pending position, catalog row) and (pending a, pending b)."""
    # Every image ever accepted is cached since its own night (computed once if the cache is new).
    tonight = [o["sha256"] for o in pending]
    new = embed_cache.ensure_embeddings(store, [*existing, *tonight], progress=True, keep=tonight)
    # Only each new image's nearest cached rows are held, never the whole history: its memory
    # and the search stream segment by segment (a year of nights is 100k+ embeddings).
    old = embed_cache.nearest_cached(store, new, existing, ddc.copy_candidates)
    args = (ddc.copy_candidates, ddc.copy_floor, ddc.copy_threshold)
    found = copies.find_copies(new, old, *args)
    within = copies.find_copies(new, None, *args)
    row_of = {s: i for i, s in reversed(list(enumerate(existing)))}
    pairs = [
        (q, row_of[old.shas[t]])
        for q, t in zip(found.query.tolist(), found.target.tolist(), strict=True)
    ]
    batch = list(zip(within.query.tolist(), within.target.tolist(), strict=True))
    log.info("disguised copies: %d of history, %d within tonight", len(pairs), len(batch))
    return pairs, batch


def hash_signals(store: Storage, pending: Sequence[dict[str, Any]]) -> Hashes:
    n = len(pending)
    hashes = Hashes(np.zeros(n, np.uint64), np.zeros(n, np.uint64), np.zeros(n, bool))
    for i, o in enumerate(pending):
        p, d, ok = _signals(store, o["sha256"], o["phash"])
        hashes.phash[i], hashes.dhash[i], hashes.has_dhash[i] = p, d, ok
    return hashes


def near_links(
    index: dedupe.HashIndex, h: Hashes, groups: Sequence[str], ddc: Any
) -> tuple[dedupe.UnionFind, dict[int, set[str]]]:
    """Stage 2: near duplicates by pHash (confirmed by dHash).

    Returns the union of tonight's images that are near each other, and for each pending index
    the existing groups it is near.
    """
    n = len(h.phash)
    uf = dedupe.UnionFind(n)
    touched: dict[int, set[str]] = defaultdict(set)
    if not (ddc.near and n):
        return uf, touched
    P, D, HD = h.phash, h.dhash, h.has_dhash
    qi, ti, dist = index.query(P, ddc.near_threshold)
    if len(qi):
        keep = dedupe.confirm(
            index, ti, D[qi], HD[qi], dist, ddc.confirm_threshold, ddc.unconfirmed_threshold
        )
        for q, t in zip(qi[keep].tolist(), ti[keep].tolist(), strict=True):
            touched[q].add(groups[t])
    if n > 1:
        ii, jj, dist = hamming_search.find_pairs(P, ddc.near_threshold)
        if len(ii):
            tmp = dedupe.HashIndex(P, D, HD, np.zeros(n, np.uint64))
            keep = dedupe.confirm(
                tmp, jj, D[ii], HD[ii], dist, ddc.confirm_threshold, ddc.unconfirmed_threshold
            )
            for a, b in zip(ii[keep].tolist(), jj[keep].tolist(), strict=True):
                uf.union(a, b)
    return uf, touched


def link_disguised_copies(
    store: Storage,
    hist: History,
    pending: Sequence[dict[str, Any]],
    ddc: Any,
    uf: dedupe.UnionFind,
    touched: dict[int, set[str]],
) -> None:
    """Stage 3, the second signal: disguised copies (crops, watermarks, flips) pHash cannot see."""
    found, within = _copy_pairs(store, hist.sha, pending, ddc)
    for q, t in found:
        touched[q].add(hist.groups[t])
    for a, b in within:
        uf.union(a, b)
