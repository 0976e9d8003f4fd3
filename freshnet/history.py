"""The nights' history: one small record per night in storage, read back as a trend table.

Records live at ``history/nights/<night>.json``, one per night (a rerun of a night replaces its
row), so they survive runs and machines and two nights never write the same object. The Prefect
UI shows them as one table artifact; ``freshnet status`` shows the newest one.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

from freshnet.storage import NotFound, Storage

log = logging.getLogger(__name__)

PREFIX = "history/nights/"
# Nights shown side by side in the table artifact: a month of nightly runs.
TABLE_NIGHTS = 30


def _night_key(night: str) -> str:
    return f"{PREFIX}{night}.json"


def _natural(night: str) -> tuple[tuple[int, int, str], ...]:
    """Sort nights by their numbers: "2026-12-03" by date, test nights "2" before "10"."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", night)
        if part
    )


def night_record(summary: dict[str, Any], run: str | None = None) -> dict[str, Any]:
    """What one night leaves in the history, from the night's summary (freshnet.summary)."""
    per_class = summary.get("per_class") or {}
    challenger = summary.get("challenger") or {}
    champion = summary.get("champion") or {}
    reasons = summary.get("reasons") or []
    outcome = summary.get("outcome", "unknown")
    # A stopped night's reason is its only explanation; a decided night has a decision summary.
    why = summary.get("decision") or (reasons[0] if reasons else "")
    return {
        "night": str(summary["night"]),
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": summary.get("config"),
        "run": run,
        "outcome": outcome,
        "why": why,
        "new_images": sum(int(c.get("new", 0)) for c in per_class.values()),
        "snapshot": summary.get("snapshot"),
        "challenger_version": challenger.get("version"),
        "challenger_accuracy": challenger.get("accuracy"),
        "champion_version": champion.get("version"),
        "champion_accuracy": champion.get("accuracy"),
        "commit": summary.get("commit"),
        "report_key": summary.get("report_key"),
    }


def record(store: Storage, summary: dict[str, Any], run: str | None = None) -> dict[str, Any]:
    """Write tonight's record (replacing an earlier attempt's) and return it."""
    rec = night_record(summary, run)
    store.put(_night_key(rec["night"]), json.dumps(rec, indent=1, default=str).encode())
    log.info("night %s recorded in the history: %s", rec["night"], rec["outcome"])
    return rec


def recent(store: Storage, limit: int = TABLE_NIGHTS) -> list[dict[str, Any]]:
    """The newest ``limit`` night records, newest first (unreadable records are skipped, logged)."""
    names = [k[len(PREFIX) : -len(".json")] for k in store.list(PREFIX) if k.endswith(".json")]
    out = []
    for night in sorted(names, key=_natural, reverse=True)[:limit]:
        try:
            out.append(json.loads(store.get(_night_key(night))))
        except (NotFound, ValueError) as exc:
            log.warning("history record of night %s unreadable: %s", night, exc)
    return out


def _acc(value: Any) -> float | None:
    return round(float(value), 4) if isinstance(value, int | float) else None


def decision_text(rec: dict[str, Any], width: int = 120) -> str:
    text = str(rec.get("outcome", "unknown"))
    if rec.get("why"):
        text += f" — {rec['why']}"
    return text if len(text) <= width else text[: width - 1] + "…"


def table_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per night, newest first, with the columns the trend view compares."""
    return [
        {
            "night": r["night"],
            "new images": r.get("new_images", 0),
            "champion accuracy": _acc(r.get("champion_accuracy")),
            "challenger accuracy": _acc(r.get("challenger_accuracy")),
            "decision": decision_text(r),
            "space commit": (r.get("commit") or "")[:12] or None,
            "model version": r.get("challenger_version"),
        }
        for r in records
    ]


def last_decision(store: Storage, rec: dict[str, Any] | None) -> tuple[str, dict[str, Any]] | None:
    """(version, stored decision) of ``rec``'s night, else the newest one (a stopped night
    decides nothing: the last decision is then an earlier night's). Versions sort by time."""
    key = (rec or {}).get("report_key") or ""
    if key.endswith(".md"):
        keys = [key[: -len(".md")] + ".json"]
    else:
        keys = sorted(k for k in store.list("decisions/") if k.endswith(".json"))[-1:]
    for k in keys:
        try:
            return k[len("decisions/") : -len(".json")], json.loads(store.get(k))
        except (NotFound, ValueError) as exc:
            log.warning("decision %s unreadable: %s", k, exc)
    return None


def format_last_night(store: Storage) -> list[str]:
    """Lines for `freshnet status`: the last night's outcome and its decision, rule by rule."""
    recs = recent(store, limit=1)
    rec = recs[0] if recs else None
    lines: list[str] = []
    if rec is not None:
        lines.append(f"last night: {rec['night']} — {decision_text(rec, width=200)}")
        detail = [f"{rec.get('new_images', 0)} new images"]
        if rec.get("challenger_version"):
            acc = _acc(rec.get("challenger_accuracy"))
            detail.append(f"challenger {rec['challenger_version']} {acc}")
        if rec.get("champion_version"):
            acc = _acc(rec.get("champion_accuracy"))
            detail.append(f"champion {rec['champion_version']} {acc}")
        if rec.get("commit"):
            detail.append(f"space commit {rec['commit'][:12]}")
        lines.append("  " + "; ".join(detail) + f" (recorded {rec.get('recorded_at')})")
    found = last_decision(store, rec)
    if found is not None:
        version, decided = found
        d = decided.get("decision") or {}
        verdict = "PROMOTE" if d.get("promote") else "KEEP CHAMPION"
        lines.append(f"last decision: {version}: {verdict} — {d.get('summary', '')}")
        for r in d.get("rules", []):
            status = r.get("status") or ("pass" if r.get("passed") else "fail")
            mark = "FAIL" if status == "fail" else status
            lines.append(f"  • {r.get('name')}: {mark} — {r.get('detail', '')}")
        if decided.get("report_key"):
            lines.append(f"  report: {store.url(decided['report_key'])}")
    elif rec is None:
        lines.append("last night: none recorded yet")
    return lines
