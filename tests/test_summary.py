"""The night's summary: counts per class, the decision with its rules, images held for review."""

from __future__ import annotations

from freshnet import summary
from freshnet.config import parse_config


def _report():
    cfg = parse_config({"classes": ["cat", "dog"]})
    ingested = {"counts": {"cat": {"accepted": 9, "http_4xx": 2}, "dog": {"accepted": 5}}}
    curated = {"per_class": {"cat": {"new": 7, "near_duplicate": 2}, "dog": {"new": 5}}}
    snap = {"id": "abc123", "counts": {"cat": {"train": 6, "holdout": 1}, "dog": {"train": 4}}}
    return summary.start(cfg, "7", {}, ingested, curated, snap)


def test_summary_counts_decision_and_flagged_images():
    trained = {
        "metrics": {"seconds": 12.0},
        "noisy": [
            {"sha256": "a" * 64, "label": "cat", "predicted": "dog", "p": 0.99, "reason": "x"}
        ],
    }
    decided = {
        "decision": {
            "summary": "promote",
            "rules": [{"name": "improvement", "passed": True, "detail": "+0.05"}],
        }
    }
    s = summary.finish(
        _report(),
        "v2",
        trained,
        {"accuracy": 0.9},
        {"accuracy": 0.85},
        {"version": "v1"},
        decided,
        {"commit": "c0ffee"},
    )
    assert s["outcome"] == "promoted"
    assert s["flagged"] == [{"sha256": "a" * 64, "label": "cat", "predicted": "dog"}]
    text = summary.format_summary(s)
    cat = next(line for line in text.splitlines() if line.startswith("cat"))
    assert cat.split()[:8] == ["cat", "11", "7", "0", "2", "0", "6", "1"]
    assert "http_4xx=2" in cat
    assert "improvement: pass — +0.05" in text
    assert "1 training image(s) look mislabeled" in text and "commit c0ffee" in text


def test_summary_without_flagged_images_says_nothing_about_review():
    s = summary.finish(
        _report(),
        "v2",
        {"metrics": {}},
        {"accuracy": 0.8},
        None,
        None,
        {"decision": {"rules": []}},
        None,
    )
    assert s["outcome"] == "kept champion" and s["flagged"] == []
    assert "review" not in summary.format_summary(s)


def _night(counts: dict, failures: int = 0, **dataset) -> dict:
    cfg = parse_config(
        {
            "classes": ["cat", "dog"],
            "queries": ["photo {label}", "{label} puppy"],
            "dataset": dataset,
        }
    )
    searched = {"failures": [{"label": "cat", "query": "q", "reason": "x"}] * failures}
    snap = {"id": "s1", "counts": {}}
    return summary.start(cfg, "2026-12-01", searched, {"counts": counts}, {}, snap)


def test_yield_collapses_when_most_searches_fail():
    ok = _night({"cat": {"accepted": 10}}, failures=2)  # 2 of 4 searches: not most
    assert ok["yield_problems"] == []
    bad = _night({"cat": {"accepted": 10}}, failures=3)
    assert bad["yield_problems"] == [
        "3 of 4 searches failed (more than dataset.max_failed_searches = 0.5)"
    ]
    # The threshold is the config's.
    assert (
        _night({"cat": {"accepted": 1}}, failures=3, max_failed_searches=0.8)["yield_problems"]
        == []
    )


def test_yield_collapses_when_most_downloads_are_rejected_not_when_urls_repeat():
    # URLs already seen on an earlier night are not downloads: 40 repeats, 6 tried, 2 rejected.
    repeats = _night({"cat": {"duplicate_url": 40, "accepted": 4, "http_4xx": 2}})
    assert repeats["yield_problems"] == []
    bad = _night({"cat": {"accepted": 2, "not_image": 3}, "dog": {"accepted": 1, "timeout": 4}})
    assert bad["yield_problems"] == [
        "7 of 10 downloads were rejected (more than dataset.max_rejected_downloads = 0.5)"
    ]
    text = summary.format_summary(summary.stop(bad, "stopped by the quality gate: too few"))
    assert "YIELD COLLAPSED: 7 of 10 downloads were rejected" in text
    # Nothing found at all (no search failed either) is not a collapse of the downloads.
    assert _night({})["yield_problems"] == []


def test_every_ending_says_why():
    nothing = summary.stop(_report(), "nothing new (0 images ...): training skipped")
    assert summary.ending(nothing) == "nothing new (0 images ...): training skipped"
    md = summary.outcome_markdown(nothing)
    assert md.startswith("# Night 7: STOPPED") and "another `night` parameter" in md
    assert "```" in md and "found" in md  # the summary table
    decided = {"decision": {"summary": "improvement -0.02 < 0.00", "rules": []}}
    kept = summary.finish(
        _report(), "v2", {}, {"accuracy": 0.8}, {"accuracy": 0.82}, {"version": "v1"}, decided, None
    )
    assert summary.ending(kept) == (
        "kept champion v1: challenger v2 refused — improvement -0.02 < 0.00"
    )
    promoted = summary.finish(
        _report(), "v2", {}, {"accuracy": 0.9}, None, None, decided, {"commit": "c0ffee" * 5}
    )
    assert summary.ending(promoted) == (
        "promoted v2 (holdout accuracy 0.900); Space commit c0ffeec0ff"
    )
    degraded = summary.stop(_night({}, failures=4), "stopped by the quality gate: class 'cat'")
    assert summary.ending(degraded) == (
        "degraded night, yield collapsed (4 of 4 searches failed (more than "
        "dataset.max_failed_searches = 0.5)); stopped by the quality gate: class 'cat'"
    )
    assert summary.outcome_markdown(degraded).startswith("# Night 2026-12-01: DEGRADED — STOPPED")


def test_a_collapsed_night_ends_failed_named_degraded_with_its_summary():
    from flows.nightly import ending_state

    degraded = summary.stop(_night({}, failures=4), "stopped by the quality gate: class 'cat'")
    state = ending_state(degraded, summary.ending(degraded))
    assert state.is_failed() and state.name == "Degraded"
    assert state.message.startswith("degraded night, yield collapsed")
    assert state.result(raise_on_failure=False) == degraded  # the night's results are kept
    fine = summary.stop(_report(), "nothing new: training skipped")
    state = ending_state(fine, summary.ending(fine))
    assert state.is_completed() and state.message == "nothing new: training skipped"


def test_a_night_is_the_date_of_the_runs_scheduled_start_in_prefect_timezone():
    from datetime import UTC, datetime

    from flows.nightly import resolve_night

    late = datetime(2026, 12, 1, 23, 30, tzinfo=UTC)
    assert summary.today("UTC", late) == "2026-12-01"
    assert summary.today("Asia/Tokyo", late) == "2026-12-02"
    cfg = parse_config({"classes": ["cat", "dog"], "prefect": {"timezone": "Asia/Tokyo"}})
    assert resolve_night(cfg, "2026-11-30") == "2026-11-30"
    # Outside a run (no scheduled start): now, in that zone.
    assert resolve_night(cfg, None) == summary.today("Asia/Tokyo")
