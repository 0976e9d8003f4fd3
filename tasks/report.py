"""Prefect artifacts: what a person sees in the UI for each night (keys are stable across runs)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from freshnet import cycle
from freshnet.config import Config
from freshnet.contest import DecideResult
from freshnet.cycle import LabelCheckResult, SearchResult, SnapshotResult
from freshnet.redact import redact
from freshnet.release import LedgerEntry

HISTORY_KEY = "night-history"


def publish_search_failures(result: SearchResult) -> None:
    if result["failures"]:
        create_table_artifact(
            key="search-failures",
            table=result["failures"],
            description=f"Failed queries; failed classes: "
            f"{', '.join(result['failed_classes']) or 'none'}",
        )


def publish_rejections(counts: dict[str, dict[str, int]]) -> None:
    rows = [
        {"class": label, "reason": reason, "count": n}
        for label, by_reason in sorted(counts.items())
        for reason, n in sorted(by_reason.items())
        if reason != "accepted"
    ]
    create_table_artifact(
        key="rejections-by-reason",
        table=rows or [{"class": "-", "reason": "none", "count": 0}],
        description="Downloaded URLs that were not kept, by class and reason",
    )


def publish_dataset(snap: SnapshotResult) -> None:
    rows = [
        {"class": label, "train": c.get("train", 0), "holdout": c.get("holdout", 0)}
        for label, c in sorted(snap["counts"].items())
    ]
    create_table_artifact(
        key="dataset-per-class",
        table=rows,
        description=f"Snapshot {snap['id']}; gate problems: "
        f"{'; '.join(snap['problems']) or 'none'}",
    )


def publish_label_issues(check: LabelCheckResult) -> None:
    rows = [
        {
            "image": i["sha256"][:12],
            "label": i["label"],
            "suggested": i["suggested"],
            "p(label)": i["label_p"],
            "p(suggested)": i["suggested_p"],
        }
        for i in check["issues"]
    ]
    create_table_artifact(
        key="label-issues",
        table=rows or [{"image": "-", "label": "none flagged"}],
        description=f"{len(rows)} of {check['checked']} labels look wrong (out-of-sample "
        "probabilities, cleanlab); held back as noisy_label: review with `freshnet quarantine`. "
        + " ".join(check["notes"]),
    )


def publish_decision(result: DecideResult) -> None:
    """The report (rules, paired numbers, confusion table) and, where storage gives a browser URL,
    the confusion matrix image."""
    d = result["decision"]
    verdict = "PROMOTE" if d["promote"] else "KEEP CHAMPION"
    create_markdown_artifact(
        key="decision-report",
        markdown=result["report"],
        description=f"{verdict}: {d['summary']}",
    )
    url = result.get("confusion_url")
    if url:
        create_image_artifact(
            image_url=url,
            key="confusion-matrix",
            description=f"Challenger confusion matrix (holdout); stored at "
            f"{result.get('confusion_key')}; the link expires after 7 days",
        )


def space_page(target: str) -> str:
    """Where a person sees the Space: its web page (HF), the remote (git) or an absolute path."""
    if target.startswith("hf://spaces/"):
        return f"https://huggingface.co/spaces/{target.removeprefix('hf://spaces/')}"
    scp = re.fullmatch(r"[\w.-]+@([\w.-]+):(?!//)(.+?)(\.git)?/?", target)
    if scp:  # git@host:owner/repo.git
        return f"https://{scp[1]}/{scp[2]}"
    if target.startswith(("http://", "https://")):
        return redact(target.removesuffix("/").removesuffix(".git"))
    if "://" in target and not target.startswith("file://"):
        return redact(target)
    # A local git repo: relative to the worker's directory, so say where it really is.
    return Path(target.removeprefix("file://")).resolve().as_uri()


def publish_commit(cfg: Config, entry: LedgerEntry) -> None:
    target = cfg.space.target
    desc = f"The Space serving `{entry['version']}` (commit `{entry['commit']}`)"
    if target.startswith("hf://spaces/"):
        desc += f"; [the commit]({space_page(target)}/commit/{entry['commit']})"
    create_link_artifact(
        key="space-commit",
        link=space_page(target),
        link_text=f"{redact(target)}: {entry['version']} @ {entry['commit'][:10]}",
        description=desc,
    )


def publish_history(rows: list[dict]) -> None:
    create_table_artifact(
        key=HISTORY_KEY,
        table=rows,
        description=f"The last {len(rows)} night(s), newest first: new images, champion and "
        "challenger holdout accuracy (same holdout), decision, Space commit",
    )


@task
def record_night(cfg: Config, summary: dict[str, Any]) -> dict[str, Any]:
    """Add the night to the history in storage and publish the history table."""
    from prefect.runtime import flow_run

    out = cycle.record_night_step(cfg, summary, run=flow_run.name)
    publish_history(out["rows"])
    return out["record"]
