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
