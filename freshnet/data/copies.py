"""Disguised copies: the second near-duplicate signal, for crops, rescales, watermarks and flips.

A 64-bit pHash moves 8-12 bits under a 10% crop, so re-hosted copies of a photo slip past it.
Here, candidates come from the frozen-backbone embeddings (cosine similarity, nearest
neighbours with faiss), and each candidate pair is verified by aligning two 64-px
gray thumbnails: one is scaled over a range of crop factors and its centre is searched inside the
other with normalized cross-correlation (OpenCV ``matchTemplate``) on high-passed pixels, so
brightness shifts, JPEG blocking and smooth backgrounds do not count.

Measured on the 978 real photos (``benchmarks/web_noise.py`` repeats it): disguised copies
(crop 3-10%, rescale 0.5-1.5x, JPEG 40-95, text watermark, brightness ±20%, mirror) score
0.81-1.0 with their original, which is always among its two nearest embeddings; the best-aligned
pair of distinct photos among each photo's 5 nearest neighbours scores 0.735 at most. The
default threshold 0.77 sits between the two. Embedding similarity alone could not separate them
(copies down to 0.55, distinct photos up to 0.92).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from freshnet.data.embed import Embeddings
from freshnet.data.process_pool import start_process_pool

SCALES = np.linspace(0.86, 1.14, 15)  # relative size of the two views: crops up to ~14%
MARGIN = 0.12  # the template is the centre of one view: what a crop of <= 12% per side keeps
HIGH_PASS_SIGMA = 3.0  # px at 64 px: removes illumination and smooth backgrounds
# Pairs a worker process must have to pay for its start at ~4 ms a pair: ~0.3 s for Python,
# numpy and OpenCV (the parent's main module is not imported: process_pool).
PAIRS_PER_WORKER = 500


@dataclass
class CopyPairs:
    query: np.ndarray  # positions in the query set
    target: np.ndarray  # positions in the indexed set
    score: np.ndarray  # aligned correlation of the pair

    def __len__(self) -> int:
        return len(self.query)


def _high_pass(thumb: np.ndarray, hw: np.ndarray) -> np.ndarray:
    import cv2

    a = thumb[: int(hw[0]), : int(hw[1])].astype(np.float32)
    return a - cv2.GaussianBlur(a, (0, 0), HIGH_PASS_SIGMA)


def _best_match(a: np.ndarray, b: np.ndarray) -> float:
    """Best correlation of the centre of ``a`` (over SCALES, relative to b's size) inside ``b``."""
    import cv2

    best = -1.0
    height, width = b.shape
    for s in SCALES:
        h, w = int(round(height * s)), int(round(width * s))
        if h < 8 or w < 8:
            continue
        r = cv2.resize(a, (w, h), interpolation=cv2.INTER_AREA)
        mh, mw = int(h * MARGIN) + 1, int(w * MARGIN) + 1
        tpl = r[mh : h - mh, mw : w - mw]
        if tpl.shape[0] > height or tpl.shape[1] > width or tpl.size == 0:
            continue
        best = max(best, float(cv2.matchTemplate(b, tpl, cv2.TM_CCOEFF_NORMED).max()))
    return best


def copy_score(
    a: np.ndarray, a_hw: np.ndarray, b: np.ndarray, b_hw: np.ndarray, enough: float = 2.0
) -> float:
    """Aligned high-pass correlation of two thumbnails, either being a crop of the other.

    Both orientations are tried: pooled CNN embeddings are nearly mirror-invariant, so they
    cannot tell which one a candidate needs. Stops early once a score reaches ``enough``.
    """
    pa, pb = _high_pass(a, a_hw), _high_pass(b, b_hw)
    best = -1.0
    for view in (pa, np.ascontiguousarray(pa[:, ::-1])):
        best = max(best, _best_match(view, pb))
        if best >= enough:
            return best
        best = max(best, _best_match(pb, view))
        if best >= enough:
            return best
    return best


def find_copies(
    query: Embeddings,
    index: Embeddings | None,
    k: int,
    floor: float,
    threshold: float,
) -> CopyPairs:
    """Pairs (query i, index j) that are copies; ``index=None`` searches the query set itself (i < j).

    Candidates: the ``k`` nearest embeddings of each query with cosine
    similarity >= ``floor``; each is kept when its aligned thumbnail score is >= ``threshold``.
    """
    import faiss

    self_join = index is None
    target = query if index is None else index
    e = np.zeros(0, np.int64)
    qpos, tpos = np.flatnonzero(query.ok), np.flatnonzero(target.ok)
    if len(qpos) == 0 or len(tpos) == 0:
        return CopyPairs(e, e.copy(), np.zeros(0))
    ix = faiss.IndexFlatIP(target.emb.shape[1])
    ix.add(np.ascontiguousarray(target.emb[tpos]))
    kk = min(len(tpos), k + (1 if self_join else 0))
    # The embeddings are nearly mirror-invariant (a mirrored copy scores within ~0.03 of the
    # plain one), so one query finds both; the thumbnail check tries both orientations.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # tiny searches: threads cost more than they save
    try:
        sims, ids = ix.search(np.ascontiguousarray(query.emb[qpos]), kk)
    finally:
        faiss.omp_set_num_threads(threads)  # the large cache search after it uses every core
    candidates: set[tuple[int, int]] = set()
    for row, q in enumerate(qpos.tolist()):
        for sim, j in zip(sims[row], ids[row], strict=True):
            t = int(tpos[j]) if j >= 0 else -1
            if t < 0 or sim < floor or (self_join and t == q):
                continue
            candidates.add((min(q, t), max(q, t)) if self_join else (q, t))
    pairs = sorted(candidates)
    thumbs = [
        (query.thumb[q], query.thumb_hw[q], target.thumb[t], target.thumb_hw[t]) for q, t in pairs
    ]
    scores = score_pairs(thumbs, threshold)
    kept = [(q, t, s) for (q, t), s in zip(pairs, scores, strict=True) if s >= threshold]
    return CopyPairs(
        np.array([k[0] for k in kept], np.int64),
        np.array([k[1] for k in kept], np.int64),
        np.array([k[2] for k in kept]),
    )


Thumbs = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # a, a_hw, b, b_hw


def _score_chunk(chunk: list[Thumbs], enough: float) -> list[float]:
    return [copy_score(a, a_hw, b, b_hw, enough) for a, a_hw, b, b_hw in chunk]


def score_pairs(
    pairs: list[Thumbs],
    enough: float,
    workers: int | None = None,
    per_worker: int = PAIRS_PER_WORKER,
) -> list[float]:
    """copy_score of each pair, in worker processes when there are enough pairs to pay for them.

    Each score is ~60 small OpenCV calls whose Python overhead holds the GIL, so threads do not
    help; processes do (a night's 1,000 new photos of one kind give a few thousand candidate
    pairs). The scores are the same as in one process: each pair is scored on its own.
    """
    cpus = os.cpu_count() or 1
    workers = min(workers or cpus, len(pairs) // per_worker)
    if workers <= 1:
        return _score_chunk(pairs, enough)
    # Each worker imports only this module (numpy, OpenCV) and gets a few contiguous chunks.
    size = -(-len(pairs) // (workers * 4))
    chunks = [pairs[i : i + size] for i in range(0, len(pairs), size)]
    with start_process_pool(workers, __name__) as pool:
        parts = list(pool.map(_score_chunk, chunks, [enough] * len(chunks)))
    return [s for part in parts for s in part]
