"""The review queue of feedback images: list them, accept or reject them (one catalog commit)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

# pandas and the catalog stay here, apart from the readers: ingest's worker processes import
# freshnet/data/feedback.py and need neither.
import pandas as pd

from freshnet.data.catalog import CatalogConflict, commit, load_catalog, load_state
from freshnet.data.quarantine import DECISIONS_KEY, QuarantineError, load_decisions, resolve
from freshnet.storage import Storage

log = logging.getLogger(__name__)

STATUS = "feedback"  # catalog status of an image waiting for review


class FeedbackError(ValueError):
    """A feedback review command names an unknown image or one not waiting for review."""


def pending(store: Storage) -> pd.DataFrame:
    """Feedback images waiting for review, oldest first."""
    df = load_catalog(store)
    q = df[df["status"] == STATUS]
    q = q.sort_values(["first_seen", "sha256"], kind="stable")
    return q[["sha256", "label", "first_seen", "query", "url", "group", "split"]].reset_index(
        drop=True
    )


def format_pending(q: pd.DataFrame) -> str:
    if q.empty:
        return "no feedback waiting for review"
    view = q.assign(sha256=q["sha256"].str[:12], record=q["query"].str.removeprefix("feedback:"))
    return f"{len(q)} feedback image(s) waiting for review\n" + view[
        ["sha256", "label", "first_seen", "record", "url"]
    ].to_string(index=False, max_colwidth=70)


def review(store: Storage, shas: Sequence[str] | None, accept: bool) -> list[dict[str, Any]]:
    """Accept (status ok: joins train/holdout from the next snapshot) or reject (dropped).

    ``shas`` are sha256 prefixes of pending feedback images; None means every pending one. One
    catalog commit for all; each decision is recorded in the quarantine audit log.
    """
    action = "feedback-accept" if accept else "feedback-reject"
    for _ in range(5):
        state = load_state(store)
        df = state.df.copy()
        if shas is None:
            rows = [int(r) for r in df.index[df["status"] == STATUS]]
        else:
            try:
                rows = sorted({resolve(df, s) for s in shas})
            except QuarantineError as exc:
                raise FeedbackError(str(exc)) from None
        for r in rows:
            if df.at[r, "status"] != STATUS:
                raise FeedbackError(
                    f"{str(df.at[r, 'sha256'])[:12]} is not waiting for feedback review "
                    f"(status {str(df.at[r, 'status'])}); see 'freshnet feedback list'"
                )
        if not rows:
            return []
        when = datetime.now(UTC).isoformat(timespec="seconds")
        entries = []
        for r in rows:
            df.at[r, "status"] = "ok" if accept else "dropped"
            df.at[r, "note"] = "feedback accepted" if accept else "feedback rejected"
            entries.append(
                {
                    "sha256": df.at[r, "sha256"],
                    "action": action,
                    "before": {"label": df.at[r, "label"], "status": STATUS},
                    "after": {"label": df.at[r, "label"], "status": df.at[r, "status"]},
                    "time": when,
                }
            )
        try:
            commit(store, state, df, list(state.index.segments), f"{action} {len(rows)}")
        except CatalogConflict:
            continue
        decisions = load_decisions(store) + entries
        store.put(DECISIONS_KEY, json.dumps({"decisions": decisions}, indent=1).encode())
        log.info("%s: %d image(s)", action, len(rows))
        return entries
    raise CatalogConflict(f"{action}: the catalog kept changing under it; rerun")


def format_entries(entries: Iterable[dict[str, Any]]) -> str:
    return "\n".join(
        f"{e['action'].removeprefix('feedback-')}: {e['sha256'][:12]} {e['after']['label']} "
        f"-> {e['after']['status']}"
        for e in entries
    )
