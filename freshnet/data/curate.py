"""Curation: dedupe tonight's accepted images against all history, group, split, and persist the
catalog (stage 1, exact copies; stages 5 and 6, rows and the write; ``curate`` runs them all)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from freshnet.config import Config
from freshnet.data import dedupe, hashing
from freshnet.data.batch import Batch, CurationReport, History, Tally
from freshnet.data.catalog import CatalogState, commit, load_state
from freshnet.data.links import Hashes, hash_signals, link_disguised_copies, near_links
from freshnet.data.place import Placement, place
from freshnet.data.quarantine import decided_shas
from freshnet.storage import Storage

MAX_SEGMENTS = 64  # index segments before a compaction


_OUTCOME_FIELDS = (
    "label",
    "url",
    "query",
    "source",
    "status",
    "sha256",
    "orig_sha256",
    "phash",
    "width",
    "height",
)


def _outcome(o: Any) -> dict[str, Any]:
    if isinstance(o, Mapping):
        return {f: o.get(f) for f in _OUTCOME_FIELDS}
    return {f: getattr(o, f, None) for f in _OUTCOME_FIELDS}


def _copy_of_history(o: dict[str, Any], hist: History, tally: Tally) -> bool:
    """Count ``o`` if it is an exact copy of a catalog row; False when it is not one."""
    hit = hist.row_of.get(o["sha256"], hist.row_of.get(o["orig_sha256"] or "", None))
    if hit is None:
        return False
    label = o["label"]
    if hist.labels[hit] != label and hist.status[hit] != "dropped":
        # The same photo under two labels: the labels are unreliable, not guessed.
        g = hist.groups[hit]
        labs = {hist.labels[r] for r in hist.members[g]} | {label}
        if o["source"] != "feedback":  # unreviewed feedback only reports the dispute
            hist.mark_conflict(hist.members[g], labs)
        note = f"exact copy of {hist.labels[hit]} image {hist.sha[hit]}"
        tally.quarantine(o["sha256"], label, "label_conflict", note)
    else:
        tally.count(label, "duplicate")
    return True


def _copy_within_batch(o: dict[str, Any], batch: Batch, tally: Tally) -> bool:
    """Count ``o`` if it is an exact copy of an image that arrived earlier tonight."""
    j = batch.position.get(o["sha256"], batch.position.get(o["orig_sha256"] or "", None))
    if j is None:
        return False
    label, first = o["label"], batch.pending[j]
    if first["label"] != label:
        if o["source"] != "feedback":  # unreviewed feedback only reports the dispute
            batch.disputed[j].add(label)
        note = f"exact copy of {first['label']} image {first['sha256']}"
        tally.quarantine(o["sha256"], label, "label_conflict", note)
    else:
        tally.count(label, "duplicate")
    return True


def _take_outcomes(outcomes: Sequence[Any], hist: History, tally: Tally) -> Batch:
    """Stage 1: keep the accepted outcomes that are new bytes; count the exact copies."""
    batch = Batch()
    for raw in outcomes:
        o = _outcome(raw)
        if o["status"] != "accepted":
            continue
        if not o["label"] or not o["sha256"]:
            raise ValueError(f"accepted outcome for {o['url']!r} lacks a label or sha256: {o}")
        tally.ensure(o["label"])
        if not (_copy_of_history(o, hist, tally) or _copy_within_batch(o, batch, tally)):
            batch.add(o)
    return batch


def _new_rows(
    pending: Sequence[dict[str, Any]], h: Hashes, placed: Placement, night: str
) -> pd.DataFrame:
    """Stage 5: tonight's catalog rows."""
    return pd.DataFrame(
        {
            "sha256": [o["sha256"] for o in pending],
            "orig_sha256": [o["orig_sha256"] or "" for o in pending],
            "label": [o["label"] for o in pending],
            "url": [o["url"] or "" for o in pending],
            "query": [o["query"] or "" for o in pending],
            "source": [o["source"] or "" for o in pending],
            "phash": hashing.u64_to_hex(h.phash),
            "group": placed.group,
            "split": placed.split,
            "first_seen": [night] * len(pending),
            "status": placed.status,
            "note": placed.note,
            "dhash": [
                f"{int(d):016x}" if ok else "" for d, ok in zip(h.dhash, h.has_dhash, strict=True)
            ],
            "width": [int(o["width"] or 0) for o in pending],
            "height": [int(o["height"] or 0) for o in pending],
        }
    )


def _write_index_segment(
    store: Storage, state: CatalogState, pending: Sequence[dict[str, Any]], h: Hashes
) -> list[str]:
    """Tonight's rows of the near-duplicate index as a new segment; returns the new segment list."""
    seg = f"index/segments/{state.version + 1:06d}-{secrets.token_hex(4)}.npz"
    tags = dedupe.tags_of([o["sha256"] for o in pending])
    if len(state.index.segments) >= MAX_SEGMENTS:
        # Compaction, once every MAX_SEGMENTS nights: one O(all) write keeps loads cheap.
        full = state.index.appended(h.phash, h.dhash, h.has_dhash, tags)
        dedupe.write_segment(store, seg, full.phash, full.dhash, full.has_dhash, full.tag)
        return [seg]
    dedupe.write_segment(store, seg, h.phash, h.dhash, h.has_dhash, tags)
    return [*state.index.segments, seg]


def _store_curation(
    store: Storage,
    state: CatalogState,
    df: pd.DataFrame,
    new_rows: pd.DataFrame,
    pending: Sequence[dict[str, Any]],
    h: Hashes,
    night: str,
) -> pd.DataFrame:
    """Stage 6: write the index segment and the catalog, then compare-and-swap the pointer."""
    out = pd.concat([df, new_rows], ignore_index=True) if len(df) else new_rows
    segments = list(state.index.segments)
    if pending:
        segments = _write_index_segment(store, state, pending, h)
    commit(
        store,
        state,
        out,
        segments,
        f"curate night {night}",
        new_segments=segments[-1:] if pending else (),
    )
    return out


def curate(store: Storage, outcomes: Sequence[Any], night: str, cfg: Config) -> CurationReport:
    """Dedupe tonight's accepted images against all history, group, split, and persist the catalog.

    ``outcomes`` are ingest Outcomes (objects or dicts); only status "accepted" ones are curated.
    Per class: new (a new group), near_duplicate (joined an existing or new group), duplicate
    (exact copy of an image already held), quarantined (label or split conflict).
    """
    night = str(night)
    state = load_state(store)
    df = state.df.copy()
    hist = History.of(df, decided_shas(store))
    tally = Tally()
    for c in cfg.classes:
        tally.ensure(c)

    batch = _take_outcomes(outcomes, hist, tally)
    hashes = hash_signals(store, batch.pending)
    uf, touched = near_links(state.index, hashes, hist.groups, cfg.dedupe)
    if cfg.dedupe.copies and batch.pending:
        link_disguised_copies(store, hist, batch.pending, cfg.dedupe, uf, touched)
    placed = place(batch, uf, touched, hist, tally, cfg.dataset)

    df["status"], df["note"], df["group"] = hist.status, hist.notes, hist.groups
    new_rows = _new_rows(batch.pending, hashes, placed, night)
    out = _store_curation(store, state, df, new_rows, batch.pending, hashes, night)
    return tally.report(night, len(out))
