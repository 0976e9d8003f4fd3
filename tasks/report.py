"""Prefect artifacts: what a person sees in the UI for each night (keys are stable across runs)."""

from __future__ import annotations

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from freshnet.config import Config


def publish_search_failures(result: dict) -> None:
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


def publish_dataset(snap: dict) -> None:
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


def publish_label_issues(check: dict) -> None:
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


def publish_decision(result: dict) -> None:
    create_markdown_artifact(
        key="decision-report",
        markdown=result["report"],
        description="Champion vs challenger and the promotion decision",
    )


def publish_commit(cfg: Config, entry: dict) -> None:
    target = cfg.space.target
    if target.startswith("hf://spaces/"):
        link = f"https://huggingface.co/spaces/{target.removeprefix('hf://spaces/')}/commit/{entry['commit']}"
    else:
        link = f"file://{target}" if "://" not in target else target
    create_link_artifact(
        key="space-commit",
        link=link,
        link_text=f"{entry['version']} @ {entry['commit'][:10]}",
        description="The Space commit serving the new champion",
    )
