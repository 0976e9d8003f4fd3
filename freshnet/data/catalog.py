"""The catalog of every image ever accepted: load, compare-and-swap write, retry on a lost race.

Storage layout (all through the Storage contract, so file:// and s3:// behave alike):

- pointer ``catalog`` -> JSON ``{"version", "catalog_key", "index", "rows", "updated"}``
- ``catalog/v<version>-<token>.parquet``: all rows, in the order they were added
- ``index/segments/<version>-<token>.npz``: the near-duplicate index, one append-only segment per
  curation (row i of the concatenated segments is row i of the catalog)

Snapshots (freshnet/data/snapshot.py) and the reviewer's decisions (freshnet/data/quarantine.py)
live beside it. Every write goes to a new key; only the compare-and-swap of the pointer makes it
visible, so a crash or a concurrent writer never loses what is stored.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from freshnet.data import dedupe
from freshnet.storage import NotFound, Storage

log = logging.getLogger(__name__)

T = TypeVar("T")

CATALOG_COLUMNS = [
    "sha256",
    "orig_sha256",
    "label",
    "url",
    "query",
    "source",
    "phash",
    "group",
    "split",
    "first_seen",
    "status",
    "note",
]
# Added beyond the contract: the second near-duplicate signal and the image size.
EXTRA_COLUMNS = ["dhash", "width", "height"]
ALL_COLUMNS = CATALOG_COLUMNS + EXTRA_COLUMNS
# "feedback": a correction from the app, out of every snapshot until reviewed (freshnet/data/feedback.py).
STATUSES = ("ok", "label_conflict", "split_conflict", "noisy_label", "dropped", "feedback")
POINTER = "catalog"
KEEP_VERSIONS = 5  # catalog versions kept for readers that loaded an older pointer


class CatalogError(RuntimeError):
    """The stored catalog or its index is unreadable or inconsistent; nothing was changed."""


class CatalogConflict(RuntimeError):
    """Another writer changed the catalog while this one worked; rerun to apply on top of it."""


@dataclass
class CatalogState:
    df: pd.DataFrame
    index: dedupe.HashIndex
    version: int
    token: str | None  # the pointer's version token for the compare-and-swap
    pointer: dict[str, Any]


def empty_catalog() -> pd.DataFrame:
    df = pd.DataFrame({c: pd.Series(dtype="object") for c in ALL_COLUMNS})
    df["width"] = df["width"].astype("int64")
    df["height"] = df["height"].astype("int64")
    return df


def load_state(store: Storage) -> CatalogState:
    """The current catalog and near-duplicate index; raises CatalogError naming what is wrong."""
    raw, token = store.read_pointer(POINTER)
    if raw is None:
        return CatalogState(empty_catalog(), dedupe.HashIndex(), 0, None, {})
    try:
        ptr = json.loads(raw)
        version = int(ptr["version"])
        key = str(ptr["catalog_key"])
        segments = [str(s) for s in ptr["index"]]
    except Exception as exc:  # noqa: BLE001 - any malformed pointer is the same error
        raise CatalogError(
            f"pointer {POINTER!r} in {store.uri} is not a valid catalog pointer ({exc}); "
            "nothing was changed"
        ) from None
    try:
        data = store.get(key)
    except NotFound:
        raise CatalogError(
            f"catalog {store.url(key)} named by pointer {POINTER!r} is missing"
        ) from None
    try:
        df = pd.read_parquet(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001
        raise CatalogError(
            f"catalog {store.url(key)} is not readable Parquet: {exc}; nothing was changed"
        ) from None
    missing = [c for c in ALL_COLUMNS if c not in df.columns]
    if missing:
        raise CatalogError(f"catalog {store.url(key)} lacks columns {missing}")
    try:
        index = dedupe.load_index(store, segments)
    except dedupe.IndexError_ as exc:
        raise CatalogError(f"{exc}; nothing was changed") from None
    if len(index) != len(df) or (
        len(df) and not np.array_equal(index.tag, dedupe.tags_of(df["sha256"].tolist()))
    ):
        raise CatalogError(
            f"near-duplicate index ({len(index)} rows) is out of step with catalog {store.url(key)} "
            f"({len(df)} rows); nothing was changed"
        )
    return CatalogState(df.reset_index(drop=True), index, version, token, ptr)


def load_catalog(store: Storage) -> pd.DataFrame:
    """Every image ever accepted (CATALOG_COLUMNS plus dhash/width/height)."""
    return load_state(store).df


def commit(
    store: Storage,
    state: CatalogState,
    df: pd.DataFrame,
    segments: list[str],
    what: str,
    new_segments: Sequence[str] = (),
) -> None:
    """Write the catalog as a new version and swap the pointer; old versions are pruned later.

    The pointer remembers the last KEEP_VERSIONS catalog keys and the segments a compaction
    retired, so pruning never needs to list storage and never deletes what a reader that loaded
    a recent pointer may still fetch.
    """
    version = state.version + 1
    key = f"catalog/v{version:06d}-{secrets.token_hex(4)}.parquet"
    buf = io.BytesIO()
    df[ALL_COLUMNS].to_parquet(buf, index=False)
    store.put(key, buf.getvalue())
    old = state.pointer
    history = [*old.get("history", []), key]
    retired = [dict(r) for r in old.get("retired", [])]
    gone = [s for s in state.index.segments if s not in set(segments)]
    if gone:
        retired.append({"version": version, "keys": gone})
    ptr = {
        "version": version,
        "catalog_key": key,
        "index": segments,
        "rows": len(df),
        "updated": what,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "history": history[-KEEP_VERSIONS:],
        "retired": [r for r in retired if r["version"] > version - KEEP_VERSIONS],
    }
    if not store.swap_pointer(POINTER, json.dumps(ptr, sort_keys=True).encode(), state.token):
        for k in [key, *new_segments]:  # ours alone, never visible: safe to remove
            store.delete(k)
        raise CatalogConflict(
            f"catalog pointer changed while {what} ran (another writer); rerun it"
        )
    log.info("catalog v%d: %d rows (%s)", version, len(df), what)
    for k in history[:-KEEP_VERSIONS]:
        store.delete(k)
    for r in retired:
        if r["version"] <= version - KEEP_VERSIONS:
            for k in r["keys"]:
                store.delete(k)


def retry_on_conflict(attempt: Callable[[], T], give_up: str, retries: int = 5) -> T:
    """Run ``attempt`` (load, change, commit) until its compare-and-swap of the pointer lands.

    Each attempt reloads the catalog, so a lost race is redone on top of the other writer's
    version instead of overwriting it; after ``retries`` lost races the caller is told to rerun.
    """
    for _ in range(retries):
        try:
            return attempt()
        except CatalogConflict:
            continue
    raise CatalogConflict(give_up)
