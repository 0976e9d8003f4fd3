"""Manual promotion: publish a trained version by hand, with the reason recorded in the ledger."""

from __future__ import annotations

from prefect import flow

from flows.hooks import notify_failure
from flows.logs import run_logs
from freshnet.config_load import load_config
from freshnet.release import LedgerEntry
from tasks.publish import promote_space


@flow(name="promote", on_failure=[notify_failure])
def promote(config: str = "configs/demo.toml", version: str = "", reason: str = "") -> LedgerEntry:
    """Publish ``version`` (models/<version>/model.pkl) now, whatever the policy says."""
    with run_logs():
        return promote_space(load_config(config), version, reason)
