"""Predictions cached per (model version, image sha256), so a model scores each image once.

Layout: ``predictions/<version>/<digest>.npz``, one shard per call that predicted something,
named by the sha256 of its bytes (two writers never collide, and a reader detects any damage).
A shard holds ``sha`` (uint8 [n, 32], the raw image digests), ``probs`` (float32 [n, k], the
model's per-class probabilities) and ``vocab`` (the model's k classes). Reading a version's cache
lists and reads only that version's folder: its size is the rows this model ever scored (about
the holdout it was evaluated on), never the catalog. When a version has more than
``MAX_SHARDS`` shards they are merged into one, so a long-lived champion's reads stay a handful
of objects.

The cache is an optimisation only: an unreadable, damaged or inconsistent shard is ignored (and
removed when its content is provably bad), and its rows are predicted again.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from freshnet.storage import NotFound, Storage

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

PREFIX = "predictions"
MAX_SHARDS = 16  # merged into one above this; a night adds at most one shard per model

# predict(shas) -> (probabilities [len(shas), k], vocab): the model's scores for those images.
Predictor = Callable[[list[str]], "tuple[np.ndarray, list[str]]"]


class CorruptShard(ValueError):
    pass


@dataclass
class Scored:
    probs: np.ndarray  # [n, k], row i belongs to the i-th asked sha
    vocab: list[str]  # the model's classes, the columns of probs
    cached: int  # distinct shas served from the cache
    predicted: int  # distinct shas the model scored in this call


def version_prefix(version: str) -> str:
    if not version or "/" in version or version in (".", ".."):
        raise ValueError(f"model version {version!r} cannot name a prediction cache folder")
    return f"{PREFIX}/{version}/"


def encode(shas: list[str], probs: np.ndarray, vocab: list[str]) -> bytes:
    import numpy as np

    bad = next((s for s in shas if len(s) != 64), None)
    if bad is not None:
        raise ValueError(f"{bad!r} is not a sha256 hex digest")
    digests = np.frombuffer(b"".join(bytes.fromhex(s) for s in shas), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(
        buf,
        sha=digests.reshape(len(shas), 32),
        probs=np.asarray(probs, dtype=np.float32).reshape(len(shas), len(vocab)),
        vocab=np.array(vocab, dtype=str),
    )
    return buf.getvalue()


def decode(data: bytes) -> tuple[list[str], np.ndarray, list[str]]:
    """(shas, probs, vocab) of one shard; CorruptShard when it is not a well-formed shard."""
    import numpy as np

    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            sha, probs, vocab = z["sha"], z["probs"], z["vocab"]
    except Exception as exc:  # noqa: BLE001 - any parse failure means the same: not a shard
        raise CorruptShard(f"not a readable npz shard: {type(exc).__name__}: {exc}") from None
    if sha.dtype != np.uint8 or sha.ndim != 2 or sha.shape[1] != 32:
        raise CorruptShard(f"sha array has dtype {sha.dtype} and shape {sha.shape}")
    if vocab.ndim != 1 or vocab.dtype.kind != "U" or len(vocab) == 0:
        raise CorruptShard(f"vocab array has dtype {vocab.dtype} and shape {vocab.shape}")
    if probs.dtype != np.float32 or probs.shape != (len(sha), len(vocab)):
        raise CorruptShard(
            f"probs has dtype {probs.dtype} and shape {probs.shape}, "
            f"expected float32 {(len(sha), len(vocab))}"
        )
    if not np.isfinite(probs).all() or (probs < 0).any() or (probs > 1).any():
        raise CorruptShard("probs hold values outside [0, 1]")
    raw = sha.tobytes()
    shas = [raw[i * 32 : (i + 1) * 32].hex() for i in range(len(sha))]
    return shas, probs, [str(v) for v in vocab]


@dataclass
class Cache:
    """One version's cached rows: sha -> row of ``probs``; ``vocab`` None when empty."""

    index: dict[str, int]
    probs: np.ndarray
    vocab: list[str] | None
    shards: list[str]  # keys read (the well-formed ones)


def _empty() -> Cache:
    import numpy as np

    return Cache({}, np.zeros((0, 0), dtype=np.float32), None, [])


def load(store: Storage, version: str) -> Cache:
    """Everything cached for ``version``; bad shards are skipped (and removed when damaged)."""
    import numpy as np

    parts: list[tuple[str, list[str], np.ndarray, list[str]]] = []
    for key in store.list(version_prefix(version)):
        if not key.endswith(".npz"):
            continue
        try:
            data = store.get(key)
        except NotFound:
            continue  # merged away by a concurrent compaction: its rows are in the new shard
        except Exception as exc:  # noqa: BLE001 - a cache read never fails the evaluation
            log.warning(
                "prediction cache: cannot read %s (%s): its rows are predicted again", key, exc
            )
            continue
        name = key.rsplit("/", 1)[-1].removesuffix(".npz")
        try:
            if hashlib.sha256(data).hexdigest()[: len(name)] != name:
                raise CorruptShard("content does not match its name (damaged)")
            shas, probs, vocab = decode(data)
        except CorruptShard as exc:
            log.warning(
                "prediction cache: %s is corrupt (%s): removed, rows predicted again", key, exc
            )
            _delete_quietly(store, key)
            continue
        parts.append((key, shas, probs, vocab))
    if not parts:
        return _empty()
    vocabs = {tuple(p[3]) for p in parts}
    if len(vocabs) > 1:
        # One version has one set of classes; shards that disagree cannot all be right.
        log.warning(
            "prediction cache for %s: shards disagree on the classes %s: none is used",
            version,
            sorted(vocabs),
        )
        return _empty()
    index: dict[str, int] = {}
    rows: list[np.ndarray] = []
    offset = 0
    for _, shas, probs, _ in parts:
        for i, s in enumerate(shas):
            index.setdefault(s, offset + i)  # the same image twice: both are this model's score
        rows.append(probs)
        offset += len(shas)
    return Cache(index, np.concatenate(rows), list(parts[0][3]), [p[0] for p in parts])


def _delete_quietly(store: Storage, key: str) -> None:
    try:
        store.delete(key)
    except Exception as exc:  # noqa: BLE001 - left behind, it is skipped again next time
        log.warning("prediction cache: cannot remove %s: %s", key, exc)


def save(
    store: Storage, version: str, shas: list[str], probs: np.ndarray, vocab: list[str]
) -> str | None:
    """Write one shard; None (logged) when storage refuses: the numbers stay right without it."""
    if not shas:
        return None
    try:
        data = encode(shas, probs, vocab)
    except ValueError as exc:  # a sha that is not 64 hex digits cannot key the cache
        log.warning("prediction cache: not cached for %s: %s", version, exc)
        return None
    key = f"{version_prefix(version)}{hashlib.sha256(data).hexdigest()[:32]}.npz"
    try:
        store.put(key, data)
    except Exception as exc:  # noqa: BLE001 - the cache is an optimisation
        log.warning("prediction cache: cannot write %s: %s", key, exc)
        return None
    return key


def compact(store: Storage, version: str, cache: Cache) -> None:
    """Merge the shards read into ``cache`` (plus nothing else) into one, then drop them."""
    if len(cache.shards) <= 1 or cache.vocab is None:
        return
    order = sorted(cache.index)
    rows = [cache.index[s] for s in order]
    key = save(store, version, order, cache.probs[rows], cache.vocab)
    if key is None:
        return
    for old in cache.shards:
        if old != key:
            _delete_quietly(store, old)
    log.info("prediction cache for %s: merged %d shards into %s", version, len(cache.shards), key)


def score(store: Storage, version: str, shas: list[str], predict: Predictor) -> Scored:
    """The model's probabilities for ``shas`` (in that order): cached ones read, others predicted.

    ``predict`` is called at most twice (once for the new shas; once more for the rest only if
    the cache's classes turn out to differ from the model's) and never with a sha served from
    the cache, so a caller that needs neither images nor the model for cached rows fetches them
    lazily inside it.
    """
    import numpy as np

    cache = load(store, version)
    unique = list(dict.fromkeys(shas))
    todo = [s for s in unique if s not in cache.index]
    fresh_probs: np.ndarray | None = None
    vocab = cache.vocab
    if todo or vocab is None:
        fresh_probs, model_vocab = predict(todo)
        fresh_probs = np.asarray(fresh_probs, dtype=np.float32)
        if vocab is not None and list(model_vocab) != vocab:
            log.warning(
                "prediction cache for %s: cached classes %s differ from the model's %s: "
                "all rows predicted again",
                version,
                vocab,
                list(model_vocab),
            )
            rest = [s for s in unique if s in cache.index]
            more, _ = predict(rest)
            todo = todo + rest
            fresh_probs = np.concatenate([fresh_probs, np.asarray(more, dtype=np.float32)])
            cache = _empty()
        vocab = [str(v) for v in model_vocab]
        save(store, version, todo, fresh_probs, vocab)
    fresh = {s: i for i, s in enumerate(todo)}
    out = np.empty((len(shas), len(vocab)), dtype=np.float32)
    for i, s in enumerate(shas):
        if s in fresh:
            out[i] = fresh_probs[fresh[s]]  # type: ignore[index]
        else:
            out[i] = cache.probs[cache.index[s]]
    cached = len(unique) - len(todo)
    log.info(
        "predictions of %s: %d image(s) served from the cache, %d predicted",
        version,
        cached,
        len(todo),
    )
    if len(cache.shards) + (1 if todo else 0) > MAX_SHARDS:
        compact(store, version, load(store, version))
    return Scored(out, vocab, cached, len(todo))
