"""The night's ending: its summary in the run's logs and an artifact saying how it ended and why."""

from __future__ import annotations

import logging

from prefect import task
from prefect.artifacts import create_markdown_artifact

from freshnet import summary

log = logging.getLogger(__name__)

OUTCOME_KEY = "night-outcome"


@task
def close_night(report: dict) -> str:
    """Log the summary table, publish the outcome artifact; returns the one-line ending."""
    ending = summary.ending(report)
    log.info("night %s: %s\n%s", report["night"], ending, summary.format_summary(report))
    for problem in report.get("yield_problems") or []:
        log.warning("night %s: yield collapsed: %s", report["night"], problem)
    create_markdown_artifact(
        key=OUTCOME_KEY, markdown=summary.outcome_markdown(report), description=ending
    )
    return ending
