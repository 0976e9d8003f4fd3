"""The night's summary: one dict built up as the cycle goes, and its plain-text table."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from freshnet.config import Config

if TYPE_CHECKING:  # the step results the summary is built from
    from freshnet.contest import DecideResult, EvaluateResult, TrainResult
    from freshnet.cycle import (
        CurateResult,
        IngestResult,
        LabelCheckResult,
        SearchResult,
        SnapshotResult,
    )
    from freshnet.release import LedgerEntry


def today(timezone: str, at: datetime | None = None) -> str:
    """The date in ``timezone`` now, or at ``at`` (an aware time, e.g. a run's scheduled start)."""
    when = datetime.now(ZoneInfo(timezone)) if at is None else at.astimezone(ZoneInfo(timezone))
    return when.strftime("%Y-%m-%d")


def start(
    cfg: Config,
    night: str,
    searched: SearchResult,
    ingested: IngestResult,
    curated: CurateResult,
    snap: SnapshotResult,
    checked: LabelCheckResult | None = None,
) -> dict[str, Any]:
    per_class = {}
    for label in cfg.classes:
        counts = ingested["counts"].get(label, {})
        cur = curated.get("per_class", {}).get(label, {})
        per_class[label] = {
            "found": sum(counts.values()),
            "new": cur.get("new", 0),
            "duplicate": cur.get("duplicate", 0) + counts.get("duplicate_url", 0),
            "near_duplicate": cur.get("near_duplicate", 0),
            "quarantined": cur.get("quarantined", 0),
            "rejected": {
                r: n for r, n in sorted(counts.items()) if r not in ("accepted", "duplicate_url")
            },
            "train": snap["counts"].get(label, {}).get("train", 0),
            "holdout": snap["counts"].get(label, {}).get("holdout", 0),
        }
    failed = len(searched.get("failures", []))
    problems = yield_problems(cfg, ingested["counts"], failed)
    if searched.get("search_gave_up"):
        # A night whose search gave up (a block outlasting its budget) is never a quiet success,
        # however many of its queries had answered before.
        problems.append(f"search gave up: {searched['search_gave_up']}")
    return {
        "config": cfg.name,
        "night": night,
        "per_class": per_class,
        "failed_queries": failed,
        "failed_classes": searched.get("failed_classes", []),
        "yield_problems": problems,
        "search_events": searched.get("search_events", []),
        "snapshot": snap["id"],
        "outcome": "running",
        "reasons": [],
        # Labels that models which never trained on them dispute: held back for review.
        "label_issues": checked.get("issues", []) if checked else [],
        "label_checked": checked.get("checked", 0) if checked else 0,
        "label_notes": checked.get("notes", []) if checked else [],
    }


def yield_problems(
    cfg: Config, counts: dict[str, dict[str, int]], failed_queries: int
) -> list[str]:
    """Why tonight's yield collapsed (empty when it did not): most searches failed, or most
    downloads were rejected (dataset.max_failed_searches, dataset.max_rejected_downloads).

    ``counts`` are the download outcomes per class and status (freshnet.data.ingest.count_outcomes).
    """
    problems = []
    searches = len(cfg.classes) * len(cfg.queries)
    if searches and failed_queries / searches > cfg.dataset.max_failed_searches:
        problems.append(
            f"{failed_queries} of {searches} searches failed "
            f"(more than dataset.max_failed_searches = {cfg.dataset.max_failed_searches:g})"
        )
    # A URL seen on an earlier night was not downloaded again: it is left out of the share.
    tried = sum(n for c in counts.values() for r, n in c.items() if r != "duplicate_url")
    rejected = tried - sum(c.get("accepted", 0) for c in counts.values())
    if tried > 0 and rejected / tried > cfg.dataset.max_rejected_downloads:
        problems.append(
            f"{rejected} of {tried} downloads were rejected "
            f"(more than dataset.max_rejected_downloads = {cfg.dataset.max_rejected_downloads:g})"
        )
    return problems


def search_event_lines(events: list[dict[str, Any]]) -> list[str]:
    """The search breaker's pauses, resumes and give-up, one line each (none on a quiet night)."""
    lines = []
    pauses = [e for e in events if e.get("event") == "pause"]
    if pauses:
        paused = sum(e.get("paused_s", 0) for e in events if e.get("event") == "resume")
        lines.append(
            f"search     paused {len(pauses)}x for suspected blocks ({paused:.0f} s in all)"
        )
    for e in events:
        where = f"{e.get('query')!r} page {e.get('page')} at {e.get('at_s', 0):.0f} s"
        if e.get("event") == "pause":
            lines.append(f"  • pause {e.get('seconds', 0):g} s at {where}: {e.get('reason')}")
        elif e.get("event") == "resume":
            lines.append(f"  • resume at {where} after {e.get('paused_s', 0):.0f} s")
        elif e.get("event") == "give_up":
            lines.append(f"search     GAVE UP at {where}: {e.get('reason')}")
    return lines


def stop(report: dict[str, Any], reason: str) -> dict[str, Any]:
    return {**report, "outcome": "stopped", "reasons": [reason]}


def finish(
    report: dict[str, Any],
    version: str,
    trained: TrainResult,
    challenger: EvaluateResult,
    defending: EvaluateResult | None,
    champion: LedgerEntry | None,
    decided: DecideResult,
    entry: LedgerEntry | None,
) -> dict[str, Any]:
    decision = decided["decision"]
    return {
        **report,
        "outcome": "promoted" if entry else "kept champion",
        "challenger": {
            "version": version,
            "accuracy": challenger["accuracy"],
            "train_seconds": trained.get("metrics", {}).get("seconds"),
        },
        "champion": (
            {
                "version": champion["version"],
                "accuracy": defending["accuracy"],
                # The champion's holdout rows scored on an earlier night (freshnet.model.predictions).
                "cached_predictions": defending.get("cached_predictions", 0),
                "new_predictions": defending.get(
                    "new_predictions", len(defending.get("shas") or [])
                ),
            }
            if champion and defending
            else None
        ),
        "comparison": decided.get("comparison"),
        "reasons": [f"{r['name']}: {_status(r)} — {r['detail']}" for r in decision["rules"]],
        "decision": decision.get("summary", ""),
        "commit": entry["commit"] if entry else None,
        "report_key": decided.get("report_key"),
        # Training images whose label the model confidently disputes: held back for review.
        "flagged": [
            {k: n.get(k) for k in ("sha256", "label", "predicted")}
            for n in trained.get("noisy") or []
        ],
    }


def format_summary(s: dict[str, Any]) -> str:
    """A fixed-width table a person can read in a terminal."""
    lines = [f"freshnet — {s['config']} — night {s['night']} — snapshot {s['snapshot']}", ""]
    head = f"{'class':<18}{'found':>7}{'new':>6}{'dup':>6}{'near':>6}{'quar':>6}{'train':>7}{'hold':>6}  rejected"
    lines += [head, "-" * len(head)]
    tot = {
        k: 0
        for k in ("found", "new", "duplicate", "near_duplicate", "quarantined", "train", "holdout")
    }
    for label, c in s["per_class"].items():
        rej = ", ".join(f"{r}={n}" for r, n in c["rejected"].items()) or "-"
        lines.append(
            f"{label[:17]:<18}{c['found']:>7}{c['new']:>6}{c['duplicate']:>6}"
            f"{c['near_duplicate']:>6}{c['quarantined']:>6}{c['train']:>7}{c['holdout']:>6}  {rej}"
        )
        for k in tot:
            tot[k] += c[k]
    lines.append(
        f"{'total':<18}{tot['found']:>7}{tot['new']:>6}{tot['duplicate']:>6}"
        f"{tot['near_duplicate']:>6}{tot['quarantined']:>6}{tot['train']:>7}{tot['holdout']:>6}"
    )
    if s.get("failed_queries"):
        lines.append(
            f"failed queries: {s['failed_queries']}; failed classes: "
            f"{', '.join(s['failed_classes']) or 'none'}"
        )
    for problem in s.get("yield_problems") or []:
        lines.append(f"YIELD COLLAPSED: {problem}")
    lines += search_event_lines(s.get("search_events") or [])
    lines.append("")
    if s.get("champion"):
        lines.append(
            f"champion   {s['champion']['version']}: holdout accuracy {s['champion']['accuracy']:.3f}"
            + (
                f" ({s['champion']['cached_predictions']} predictions from the cache, "
                f"{s['champion'].get('new_predictions', 0)} new)"
                if s["champion"].get("cached_predictions")
                else ""
            )
        )
    else:
        lines.append("champion   none yet (first run)")
    if s.get("challenger"):
        lines.append(
            f"challenger {s['challenger']['version']}: holdout accuracy {s['challenger']['accuracy']:.3f}"
        )
    cmp_ = s.get("comparison")
    if cmp_:
        lines.append(
            f"difference {cmp_['delta']:+.3f} (95% CI {cmp_['ci_low']:+.3f} … {cmp_['ci_high']:+.3f}), "
            f"McNemar p = {cmp_['mcnemar_p']:.3g} on {cmp_['n']} holdout images"
        )
    lines.append(
        f"decision   {s['outcome'].upper()}" + (f" — {s['decision']}" if s.get("decision") else "")
    )
    for r in s.get("reasons", []):
        lines.append(f"  • {r}")
    if s.get("commit"):
        lines.append(f"space      commit {s['commit']}")
    issues = s.get("label_issues") or []
    if issues:
        lines.append(
            f"labels     {len(issues)} of {s.get('label_checked', 0)} look wrong, held for review "
            "(`freshnet quarantine list`):"
        )
        for i in issues[:20]:
            lines.append(
                f"  • {i['sha256'][:12]} labelled {i['label']}, looks like {i['suggested']} "
                f"(p={i['suggested_p']:.2f})"
            )
        if len(issues) > 20:
            lines.append(f"  • … and {len(issues) - 20} more")
    for note in s.get("label_notes") or []:
        lines.append(f"labels     note: {note}")
    if s.get("flagged"):
        lines.append(
            f"review     {len(s['flagged'])} training image(s) look mislabeled and were "
            "quarantined: `freshnet quarantine list`"
        )
    return "\n".join(lines)


def ending(s: dict[str, Any]) -> str:
    """One line: how the night ended and why (the flow run's state message in the Prefect UI)."""
    if s["outcome"] == "stopped":
        text = "; ".join(s.get("reasons") or ["stopped"])
    elif s["outcome"] == "promoted":
        ch = s["challenger"]
        text = (
            f"promoted {ch['version']} (holdout accuracy {ch['accuracy']:.3f}); "
            f"Space commit {(s.get('commit') or '?')[:10]}"
        )
    else:
        champ = s.get("champion")
        kept = f"kept champion {champ['version']}" if champ else "no champion yet, none promoted"
        ch = s.get("challenger") or {}
        text = f"{kept}: challenger {ch.get('version')} refused — {s.get('decision') or 'see the decision report'}"
    problems = s.get("yield_problems") or []
    if problems:
        text = f"degraded night, yield collapsed ({'; '.join(problems)}); {text}"
    return text


def outcome_markdown(s: dict[str, Any]) -> str:
    """The night's outcome for the Prefect UI: how it ended, why, and the summary table."""
    title = "DEGRADED — " if s.get("yield_problems") else ""
    lines = [
        f"# Night {s['night']}: {title}{s['outcome'].upper()}",
        "",
        f"**Why:** {ending(s)}",
        "",
    ]
    if s.get("yield_problems"):
        lines += [
            "**Yield collapsed** — the night's results are kept, but look at the sources:",
            "",
            *[f"- {p}" for p in s["yield_problems"]],
            "",
            "The `search-failures` and `rejections-by-reason` artifacts say which queries and why.",
            "",
        ]
    if s["outcome"] == "stopped" and s.get("reasons", [""])[0].startswith("nothing new"):
        lines += [
            "Nothing was trained: the snapshot holds no image the champion's dataset lacks. "
            "Search and download are cached per night, so another run of the same night finds "
            "the same images; to search again, run the `nightly` deployment with another "
            "`night` parameter (`prefect deployment run nightly/nightly -p night=YYYY-MM-DD`).",
            "",
        ]
    lines += ["```", format_summary(s), "```"]
    return "\n".join(lines)


def _status(rule: dict[str, Any]) -> str:
    """A rule's word in the summary: pass, FAIL (loud), or not run (never read as a pass)."""
    from freshnet.model.policy import rule_status

    status = rule_status(rule)
    return "FAIL" if status == "fail" else status
