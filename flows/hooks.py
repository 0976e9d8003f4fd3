"""Flow plumbing shared by the flows: where training runs, and failure notification."""

from __future__ import annotations

import json
import logging
import os
import urllib.request

from prefect.deployments import run_deployment

from flows.train import train
from freshnet import cycle
from freshnet.config import Config

log = logging.getLogger(__name__)


def run_training(
    cfg: Config, snapshot_id: str, version: str, init_key: str | None, parent_run_id: str | None
) -> dict:
    """Embedded: a subflow here. Served: the `train` deployment on the gpu pool, sharing only URIs."""
    params = {
        "config": cfg.dump(),
        "snapshot_id": snapshot_id,
        "version": version,
        "init_model_key": init_key,
    }
    if not cfg.prefect.train_deployment:
        return train(**params)
    run = run_deployment(
        cfg.prefect.train_deployment,
        parameters=params,
        # A retried nightly run must not start a second training for the same night.
        idempotency_key=f"{parent_run_id}-{snapshot_id}-train",
        timeout=cfg.prefect.train_timeout_s,
        poll_interval=2,
    )
    state = run.state
    if state is None or not state.is_completed():
        name = state.name if state else "unknown"
        raise RuntimeError(
            f"training run {run.name} ({run.id}) ended {name}: "
            f"{state.message if state else 'no state'}; champion unchanged"
        )
    return cycle.load_train_result(cfg, version)


def notify_failure(flow, flow_run, state) -> None:
    """Log loudly and, when FRESHNET_WEBHOOK_URL is set, POST a JSON notice (Slack-compatible)."""
    text = f"freshnet: flow run {flow_run.name} ({flow.name}) {state.name}: {state.message}"
    log.error(text)
    url = os.environ.get("FRESHNET_WEBHOOK_URL")
    if not url:
        return
    req = urllib.request.Request(
        url, data=json.dumps({"text": text}).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        urllib.request.urlopen(req, timeout=10).close()
    except OSError as exc:  # a notifier must never mask the original failure
        log.warning("failure webhook %s did not answer: %s", url, exc)
