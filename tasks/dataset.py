"""Curation tasks: de-duplicate into the catalog, then snapshot and gate."""

from __future__ import annotations

from prefect import task

from freshnet import cycle
from freshnet.config import Config
from freshnet.cycle import CurateResult, LabelCheckResult, SnapshotResult
from freshnet.release import LedgerEntry
from tasks.report import publish_dataset, publish_label_issues


@task
def curate_images(cfg: Config, night: str, ingest_key: str) -> CurateResult:
    return cycle.curate_step(cfg, night, ingest_key)


@task
def snapshot_dataset(cfg: Config, since: str | None = None) -> SnapshotResult:
    snap = cycle.snapshot_step(cfg, since)
    publish_dataset(snap)
    return snap


@task
def check_labels(cfg: Config, night: str, champion: LedgerEntry | None) -> LabelCheckResult:
    result = cycle.label_check_step(cfg, night, champion)
    publish_label_issues(result)
    return result
