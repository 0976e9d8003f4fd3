"""Manual rollback: publish an earlier ledger version again as a new Space commit."""

from __future__ import annotations

from prefect import flow

from flows.hooks import notify_failure
from flows.logs import run_logs
from freshnet.config_load import load_config
from freshnet.release import LedgerEntry
from tasks.publish import rollback_space


@flow(name="rollback", on_failure=[notify_failure])
def rollback(config: str = "configs/demo.toml", version: str | None = None) -> LedgerEntry:
    """Restore ``version`` (default: the previous champion)."""
    with run_logs():
        return rollback_space(load_config(config), version)
