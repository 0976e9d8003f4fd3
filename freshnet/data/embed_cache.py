"""The embedding cache: every image's embedding and thumbnail, computed once ever, by sha256.

Storage: append-only segments ``embeddings/<MODEL>/<n>-<token>.npz`` (sha256, float16 unit
embedding, 64-px gray thumbnail for copy verification), listed by the pointer
``embeddings-<MODEL>``. A segment that is corrupt or missing is skipped with a warning; its
images are embedded again and the pointer forgets it, so bad cache files never stop a night.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
from collections.abc import Callable, Sequence

import numpy as np

from freshnet.data.embed import DIM, MODEL, THUMB, Embedder, Embeddings, embed_bytes
from freshnet.storage import NotFound, Storage

log = logging.getLogger(__name__)

POINTER = f"embeddings-{MODEL}"
PREFIX = f"embeddings/{MODEL}/"
MAX_SEGMENTS = 64  # segments before a compaction

# One cached image: (embedding, thumbnail, thumbnail height/width).
Row = tuple[np.ndarray, np.ndarray, np.ndarray]


def _read_pointer(store: Storage) -> tuple[list[str], str | None]:
    raw, token = store.read_pointer(POINTER)
    if raw is None:
        return [], None
    try:
        return [str(k) for k in json.loads(raw)["segments"]], token
    except Exception as exc:  # noqa: BLE001 - a bad pointer only costs a recomputation
        log.warning("embedding cache pointer %s is unreadable (%s): starting over", POINTER, exc)
        return [], token


def _segment_arrays(
    store: Storage, key: str, thumbs: Callable[[np.ndarray], bool] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """A segment's (sha, float16 emb, thumb, hw, norm) with only its sound rows, or None when
    the segment is missing or corrupt.

    ``thumbs(shas)``: whether the thumbnails are needed at all; when it says no, ``thumb`` is an
    empty (n, 0, 0) array. They are the larger half of a segment, and a pass that only asks which
    images are cached never looks at them.
    """
    try:
        with np.load(io.BytesIO(store.get(key)), allow_pickle=False) as z:
            shas = z["sha"].astype(str)
            emb = z["emb"]
            n = len(shas)
            read_thumbs = thumbs is None or thumbs(shas)
            if read_thumbs:
                # copy=False: a segment's thumbnails are 4 KB a row, most never looked at.
                thumb = z["thumb"].astype(np.uint8, copy=False)
            else:
                thumb = np.zeros((n, 0, 0), np.uint8)
            hw = z["hw"].astype(np.int32, copy=False)
    except NotFound:
        log.warning("embedding segment %s is missing: its images are embedded again", key)
        return None
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt segment
        log.warning("embedding segment %s is corrupt (%s): its images are embedded again", key, exc)
        return None
    thumb_ok = thumb.shape == ((n, THUMB, THUMB) if read_thumbs else (n, 0, 0))
    if emb.shape != (n, DIM) or not thumb_ok or hw.shape != (n, 2):
        log.warning("embedding segment %s has bad shapes: its images are embedded again", key)
        return None
    # Norms chunk by chunk: a compacted segment of 100k rows in float32 at once is 0.5 GB.
    ne = np.concatenate(
        [
            np.sqrt(np.einsum("ij,ij->i", emb[i : i + 8192], emb[i : i + 8192], dtype=np.float32))
            for i in range(0, n, 8192)
        ]
        or [np.zeros(0, np.float32)]
    )
    # Rows that are not finite unit vectors (bit rot, a bad writer) are recomputed.
    good = np.isfinite(ne) & (np.abs(ne - 1) < 0.01)
    good &= (hw >= 1).all(axis=1) & (hw <= THUMB).all(axis=1)
    if not good.all():
        log.warning(
            "embedding segment %s: %d bad row(s) are embedded again", key, int((~good).sum())
        )
        shas, emb, thumb, hw, ne = shas[good], emb[good], thumb[good], hw[good], ne[good]
    return shas, emb, thumb, hw, ne


def _rows(
    shas: np.ndarray,
    emb: np.ndarray,
    thumb: np.ndarray,
    hw: np.ndarray,
    ne: np.ndarray,
    pick: np.ndarray,
) -> dict[str, Row]:
    """Rows ``pick`` of a segment's arrays, in float32 of unit length, copied out of the segment
    (so the segment's arrays are freed)."""
    # float16 storage: restore unit length exactly, so cosine similarity is a plain dot product.
    e = emb[pick].astype(np.float32) / ne[pick, None]
    t, h = thumb[pick], hw[pick]
    return {str(s): (e[i], t[i], h[i]) for i, s in enumerate(shas[pick])}


def _read_segment(
    store: Storage, key: str, wanted: set[str] | None = None
) -> tuple[dict[str, Row], set[str]] | None:
    """A segment's sound rows by sha256 (only ``wanted`` ones when given) and every sound sha in
    it, or None when the segment is missing or corrupt."""

    def any_wanted(shas: np.ndarray) -> bool:
        return wanted is None or any(s in wanted for s in shas.tolist())

    arrays = _segment_arrays(store, key, any_wanted)
    if arrays is None:
        return None
    shas = arrays[0]
    present = set(shas.tolist())
    if wanted is None:
        pick = np.arange(len(shas))
    else:
        pick = np.flatnonzero([s in wanted for s in shas.tolist()])
    return _rows(*arrays, pick), present


def _encode(shas: Sequence[str], rows: Sequence[Row]) -> bytes:
    buf = io.BytesIO()
    np.savez(
        buf,
        sha=np.array(list(shas), dtype="U64"),
        emb=np.stack([r[0] for r in rows]).astype(np.float16),
        thumb=np.stack([r[1] for r in rows]).astype(np.uint8),
        hw=np.stack([r[2] for r in rows]).astype(np.int32),
    )
    return buf.getvalue()


def _add_segment(
    store: Storage, new: dict[str, Row], loaded: list[str], cached: dict[str, Row]
) -> None:
    """Append one segment and swap the pointer (compacting when there are too many segments)."""
    for _ in range(5):
        segments, token = _read_pointer(store)
        sound = set(loaded)
        live = [k for k in segments if k in sound]  # corrupt/missing ones are forgotten
        if len(live) >= MAX_SEGMENTS:
            # Compaction, once every MAX_SEGMENTS writes: one O(all) write keeps loads cheap.
            # Only then is every cached row read into memory (callers hold only those they use).
            rows = {**load_cache(store)[0], **cached, **new}
            key = f"{PREFIX}{len(rows):09d}-{secrets.token_hex(4)}.npz"
            store.put(key, _encode(list(rows), list(rows.values())))
            segments_after, retired = [key], live
        else:
            key = f"{PREFIX}{len(live):04d}-{secrets.token_hex(4)}.npz"
            store.put(key, _encode(list(new), list(new.values())))
            segments_after, retired = [*live, key], []
        if store.swap_pointer(POINTER, json.dumps({"segments": segments_after}).encode(), token):
            for k in retired:
                store.delete(k)
            return
        store.delete(key)  # another writer won; ours was never visible
        loaded = segments  # theirs are live too now
    log.warning("embedding cache pointer kept changing: %d embeddings not cached", len(new))


def load_cache(store: Storage, wanted: set[str] | None = None) -> tuple[dict[str, Row], list[str]]:
    """Every sound cached row by sha256 (only ``wanted`` ones when given), and the segment keys
    that loaded."""
    rows, loaded, _ = _load(store, wanted)
    return rows, loaded


def _load(store: Storage, wanted: set[str] | None) -> tuple[dict[str, Row], list[str], set[str]]:
    """load_cache, plus the set of every sha256 the cache holds (to know what is missing)."""
    segments, _ = _read_pointer(store)
    cached: dict[str, Row] = {}
    present: set[str] = set()
    loaded = []
    for key in segments:
        seg = _read_segment(store, key, wanted)
        if seg is None:
            continue
        loaded.append(key)
        cached.update(seg[0])
        present |= seg[1]
    return cached, loaded, present


def _fetch(store: Storage, shas: Sequence[str]) -> list[bytes | None]:
    from freshnet.data.images import image_key

    blobs: list[bytes | None] = []
    for s in shas:
        try:
            blobs.append(store.get(image_key(s)))
        except NotFound:
            log.warning("image %s is not in storage: no embedding", s)
            blobs.append(None)
    return blobs


def ensure_embeddings(
    store: Storage,
    shas: Sequence[str],
    embedder: Embedder | None = None,
    progress: bool = False,
    keep: Sequence[str] | None = None,
) -> Embeddings:
    """Embeddings of ``shas`` (stored images), computing and caching only those not cached yet.

    ``keep``: return only these (a subset of ``shas``), so a caller that needs a large set cached
    but uses a few of them does not hold the rest in memory.
    """
    shas = list(shas)
    out = shas if keep is None else list(keep)
    cached, loaded, present = _load(store, set(out))
    todo = list(dict.fromkeys(s for s in shas if s not in present))
    if todo:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="embed", unit="img", leave=False)
        try:
            emb, ok, thumb, hw = embed_bytes(
                embedder or Embedder(), _fetch(store, todo), bar.update if bar else None
            )
        finally:
            if bar is not None:
                bar.close()
        new = {s: (emb[i], thumb[i], hw[i]) for i, s in enumerate(todo) if ok[i]}
        if new:
            _add_segment(store, new, loaded, cached)
            cached.update(new)
        log.info("embedded %d image(s) (%d were cached)", len(new), len(shas) - len(todo))
    return assemble(out, cached)


def nearest_cached(store: Storage, query: Embeddings, among: Sequence[str], k: int) -> Embeddings:
    """The cached rows of ``among`` that are among the ``k`` nearest (cosine) of some query row.

    Streams the cache segment by segment, so memory stays that of one segment, not of every
    image ever embedded. Each query's k nearest in ``among`` are all in the result, so a k-NN
    search over the result finds exactly what a search over all of ``among`` finds.
    """
    import faiss

    q = np.ascontiguousarray(query.emb[query.ok], np.float32)
    wanted = set(among)
    if len(q) == 0 or not wanted or k < 1:
        return assemble([], {})
    best_sim = np.full((len(q), k), -np.inf, np.float32)
    best_sha = np.full((len(q), k), "", dtype=object)
    rows: dict[str, Row] = {}  # the rows of the current best, with their thumbnails
    seen: set[str] = set()  # an image in two segments (two writers) is one candidate
    segments, _ = _read_pointer(store)
    for key in segments:
        arrays = _segment_arrays(store, key)
        if arrays is None:
            continue
        shas = arrays[0]
        pick = np.flatnonzero([s in wanted and s not in seen for s in shas.tolist()])
        seen.update(shas[pick].tolist())
        for start in range(0, len(pick), 8192):
            part = pick[start : start + 8192]
            e = np.ascontiguousarray(arrays[1][part].astype(np.float32) / arrays[4][part, None])
            names = shas[part].astype(object)
            # faiss: one BLAS product and a top-k heap per query, on every core; a NumPy
            # matmul + argpartition took twice as long at 100k rows.
            sims, top = faiss.knn(q, e, min(k, len(part)), metric=faiss.METRIC_INNER_PRODUCT)
            all_sim = np.concatenate([best_sim, sims], axis=1)
            all_sha = np.concatenate([best_sha, names[top]], axis=1)
            order = np.argsort(-all_sim, axis=1, kind="stable")[:, :k]
            best_sim = np.take_along_axis(all_sim, order, axis=1)
            best_sha = np.take_along_axis(all_sha, order, axis=1)
            keep = {s for s in best_sha.ravel().tolist() if s}
            rows = {s: r for s, r in rows.items() if s in keep}
            for j in np.flatnonzero([s in keep and s not in rows for s in names.tolist()]):
                i = part[j]
                rows[names[j]] = (e[j].copy(), arrays[2][i].copy(), arrays[3][i].copy())
    found = sorted(s for s in set(best_sha.ravel().tolist()) if s)
    return assemble(found, rows)


def assemble(shas: Sequence[str], rows: dict[str, Row]) -> Embeddings:
    """An Embeddings for ``shas`` from cached rows; a sha without a row gets ok=False."""
    n = len(shas)
    out = Embeddings(
        list(shas),
        np.zeros((n, DIM), np.float32),
        np.zeros(n, bool),
        np.zeros((n, THUMB, THUMB), np.uint8),
        np.zeros((n, 2), np.int32),
    )
    for i, s in enumerate(shas):
        r = rows.get(s)
        if r is not None:
            out.emb[i], out.thumb[i], out.thumb_hw[i] = r
            out.ok[i] = True
    return out
