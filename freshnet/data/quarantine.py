"""Quarantine review: list held-back images, release / relabel / drop them, flag images for review.

The reviewer's decisions are an audit log at ``quarantine/decisions.json``; curation never
overrides an image a reviewer decided on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from freshnet.data.catalog import (
    CatalogError,
    commit,
    load_catalog,
    load_state,
    retry_on_conflict,
)
from freshnet.storage import NotFound, Storage

QUARANTINE_STATUSES = ("label_conflict", "split_conflict", "noisy_label")
DECISIONS_KEY = "quarantine/decisions.json"


class QuarantineError(ValueError):
    """A quarantine command names an unknown image or asks for something unsafe."""


def load_decisions(store: Storage) -> list[dict[str, Any]]:
    try:
        raw = store.get(DECISIONS_KEY)
    except NotFound:
        return []
    try:
        data = json.loads(raw)
        return list(data["decisions"])
    except Exception as exc:  # noqa: BLE001
        raise CatalogError(
            f"{store.url(DECISIONS_KEY)} is not valid decisions JSON: {exc}"
        ) from None


def decided_shas(store: Storage) -> set[str]:
    """Images a reviewer decided on: curation and later flags never override them."""
    return {d["sha256"] for d in load_decisions(store)}


def _record_decision(store: Storage, entry: dict[str, Any]) -> None:
    decisions = load_decisions(store)
    decisions.append(entry)
    store.put(DECISIONS_KEY, json.dumps({"decisions": decisions}, indent=1).encode())


def list_quarantine(store: Storage) -> pd.DataFrame:
    """Images held back for review (label/split conflicts, noisy labels), oldest first."""
    df = load_catalog(store)
    q = df[df["status"].isin(QUARANTINE_STATUSES)]
    return q[
        ["sha256", "label", "status", "note", "group", "split", "first_seen", "url"]
    ].reset_index(drop=True)


def format_quarantine(q: pd.DataFrame) -> str:
    """A readable table of ``list_quarantine`` (short shas; the prefix works in the commands)."""
    if q.empty:
        return "quarantine is empty"
    view = q.assign(sha256=q["sha256"].str[:12])[
        ["sha256", "label", "status", "first_seen", "note", "url"]
    ]
    return f"{len(q)} image(s) in quarantine\n" + view.to_string(index=False, max_colwidth=60)


def resolve(df: pd.DataFrame, sha: str) -> int:
    sha = (sha or "").strip().lower()
    if len(sha) < 6:
        raise QuarantineError(
            f"image id {sha!r}: give the sha256 or a prefix of at least 6 characters"
        )
    hits = np.flatnonzero(df["sha256"].str.startswith(sha).to_numpy())
    if len(hits) == 0:
        raise QuarantineError(f"no image with sha256 starting {sha!r} in the catalog")
    if len(hits) > 1:
        raise QuarantineError(
            f"sha256 prefix {sha!r} is ambiguous ({len(hits)} images); give more characters"
        )
    return int(hits[0])


def _cell(df: pd.DataFrame, r: int, column: str) -> str:
    """One catalog cell as text (every catalog column the messages quote holds strings)."""
    return str(df.at[r, column])


def _update(
    store: Storage,
    sha: str,
    action: str,
    change: Callable[[pd.DataFrame, int], None],
    retries: int = 5,
) -> dict[str, Any]:
    def attempt() -> tuple[pd.DataFrame, int, dict[str, Any]]:
        state = load_state(store)
        df = state.df.copy()
        r = resolve(df, sha)
        before = {"label": df.at[r, "label"], "status": df.at[r, "status"]}
        change(df, r)
        commit(
            store, state, df, list(state.index.segments), f"{action} {_cell(df, r, 'sha256')[:12]}"
        )
        return df, r, before

    give_up = f"{action} {sha}: the catalog kept changing under it; rerun"
    df, r, before = retry_on_conflict(attempt, give_up, retries)
    # Recorded once, after the commit that landed: the audit log never lists a lost attempt.
    entry = {
        "sha256": df.at[r, "sha256"],
        "action": action,
        "before": before,
        "after": {"label": df.at[r, "label"], "status": df.at[r, "status"]},
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _record_decision(store, entry)
    return entry


def release(store: Storage, sha: str) -> dict[str, Any]:
    """Return a quarantined image to the dataset (status ok, its group's split)."""

    def change(df: pd.DataFrame, r: int) -> None:
        if df.at[r, "status"] == "split_conflict":
            raise QuarantineError(
                f"{_cell(df, r, 'sha256')[:12]} is near images in both train and holdout; releasing it "
                "would leak between them. Drop it instead"
            )
        df.at[r, "status"], df.at[r, "note"] = "ok", f"released (was {_cell(df, r, 'status')})"

    return _update(store, sha, "release", change)


def relabel(store: Storage, sha: str, label: str) -> dict[str, Any]:
    """Give an image the right label and return it to the dataset."""
    label = (label or "").strip()
    if not label:
        raise QuarantineError("relabel: the new label must not be empty")

    def change(df: pd.DataFrame, r: int) -> None:
        if df.at[r, "status"] == "split_conflict":
            raise QuarantineError(
                f"{_cell(df, r, 'sha256')[:12]} is near images in both splits; drop it instead"
            )
        old = _cell(df, r, "label")
        df.at[r, "label"], df.at[r, "status"] = label, "ok"
        df.at[r, "note"] = f"relabelled from {old}"

    return _update(store, sha, "relabel", change)


def drop(store: Storage, sha: str) -> dict[str, Any]:
    """Remove an image from every later snapshot (kept in the catalog so its copies stay out too)."""

    def change(df: pd.DataFrame, r: int) -> None:
        df.at[r, "note"] = f"dropped (was {_cell(df, r, 'status')}, {_cell(df, r, 'label')})"
        df.at[r, "status"] = "dropped"

    return _update(store, sha, "drop", change)


def quarantine_images(
    store: Storage, shas: Sequence[str], reason: str, note: str | Mapping[str, str]
) -> int:
    """Hold status-ok images back for review (e.g. reason "noisy_label"); returns how many changed.

    ``note`` is one note for all, or one per sha256. Images a reviewer already decided on keep
    that decision.
    """
    if reason not in QUARANTINE_STATUSES:
        raise QuarantineError(f"quarantine reason {reason!r} is not one of {QUARANTINE_STATUSES}")
    wanted = set(shas)
    if not wanted:
        return 0

    def attempt() -> int:
        state = load_state(store)
        df = state.df.copy()
        decided = decided_shas(store)
        sel = df["sha256"].isin(wanted) & (df["status"] == "ok") & ~df["sha256"].isin(decided)
        n = int(sel.sum())
        if n == 0:
            return 0
        df.loc[sel, "status"] = reason
        if isinstance(note, Mapping):
            df.loc[sel, "note"] = [note.get(x, "") for x in df.loc[sel, "sha256"]]
        else:
            df.loc[sel, "note"] = note
        commit(store, state, df, list(state.index.segments), f"quarantine {n} {reason}")
        return n

    give_up = "quarantine_images: the catalog kept changing under it; rerun"
    return retry_on_conflict(attempt, give_up)
