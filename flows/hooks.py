"""Flow plumbing shared by the flows: where training runs, and failure notification."""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from datetime import UTC, datetime

from prefect.deployments import run_deployment

from flows.train import train
from freshnet import contest
from freshnet.config import Config
from freshnet.contest import TrainResult
from freshnet.redact import redact, redact_value

log = logging.getLogger(__name__)
# Train runs one night may start (each after the previous one ended without a result).
MAX_TRAIN_RUNS = 3


def run_training(cfg: Config, snapshot_id: str, version: str, init_key: str | None) -> TrainResult:
    """Embedded: a subflow here. Served: the `train` deployment on the gpu pool, sharing only URIs.

    ``version`` is the night's (contest.night_version): the same for every attempt at the night, so
    a retry reuses a finished training, joins a train run that is still going, and starts a new
    one only when the earlier one ended without a result.
    """
    done = contest.find_train_result(cfg, version)
    if done is not None:
        log.info("training of %s finished in an earlier attempt: reusing it", version)
        return done
    params = {
        "config": train_config(cfg),
        "snapshot_id": snapshot_id,
        "version": version,
        "init_model_key": init_key,
    }
    if not cfg.prefect.train_deployment:
        return train(**params)
    started = datetime.now(UTC)
    for attempt in range(MAX_TRAIN_RUNS):
        # The key makes Prefect return the existing run for this version instead of a second
        # one (a retried nightly, a slow API call retried by the client).
        key = f"train-{version}" + (f"-{attempt}" if attempt else "")
        run = run_deployment(
            cfg.prefect.train_deployment,
            parameters=params,
            idempotency_key=key,
            flow_run_name=version if not attempt else f"{version}-{attempt}",
            timeout=cfg.prefect.train_timeout_s,
            poll_interval=2,
        )
        state = run.state
        if state is not None and state.is_completed():
            return contest.load_train_result(cfg, version)
        earlier = run.created is not None and run.created < started
        if not (earlier and state is not None and state.is_final()):
            name = state.name if state else "unknown"
            raise RuntimeError(
                f"training run {run.name} ({run.id}) ended {name}: "
                f"{state.message if state else 'no state'}; champion unchanged"
            )
        # An earlier attempt's train run ended without a result: this attempt trains anew.
        log.warning(
            "train run %s of an earlier attempt ended %s: training again", run.name, state.name
        )
    raise RuntimeError(f"training of {version} failed in {MAX_TRAIN_RUNS} runs; champion unchanged")


def train_config(cfg: Config) -> dict:
    """The config as the train flow's parameter: Prefect stores and shows parameters, so the
    Space section (a git target may carry a token) is redacted; training never publishes."""
    config = cfg.dump()
    config["space"] = redact_value(config["space"])
    return config


def notify_failure(flow, flow_run, state) -> None:
    """Log loudly and, when FRESHNET_WEBHOOK_URL is set, POST a JSON notice (Slack-compatible)."""
    # The failure message often quotes the Space target, which may carry a token.
    text = redact(f"freshnet: flow run {flow_run.name} ({flow.name}) {state.name}: {state.message}")
    log.error(text)
    url = os.environ.get("FRESHNET_WEBHOOK_URL")
    if not url:
        return
    req = urllib.request.Request(
        url, data=json.dumps({"text": text}).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        urllib.request.urlopen(req, timeout=10).close()
    except Exception as exc:  # noqa: BLE001 - a notifier must never mask the original failure
        log.warning("failure webhook %s did not answer: %s", redact(url), redact(str(exc)))
