"""The nightly cycle: search → download → curate → snapshot → train → evaluate → decide → publish."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from flows.hooks import notify_failure, run_training
from flows.logs import run_logs
from freshnet import contest, summary
from freshnet.config import Config, ConfigError
from freshnet.config_load import load_config
from tasks.dataset import check_labels, curate_images, snapshot_dataset
from tasks.evaluate import decide_promotion, evaluate_model, read_champion
from tasks.ingest import download_images, search_images
from tasks.night import close_night
from tasks.publish import build_bundle, publish_space
from tasks.report import record_night

DEFAULT_CONFIG = "configs/demo.toml"


def resolve_night(cfg: Config, night: str | None) -> str:
    """The night parameter, or the date of the run's scheduled start in the config's
    prefect.timezone (which only names nights): a scheduled run retried the next day, or started
    late, is still the night it was scheduled for."""
    return night or summary.today(cfg.prefect.timezone, flow_run.scheduled_start_time)


def night_run_name() -> str:
    """`night-YYYY-MM-DD`: the flow run's name in the UI, the night it runs."""
    params = flow_run.parameters
    night = params.get("night")
    if not night:
        try:
            night = resolve_night(load_config(params.get("config") or DEFAULT_CONFIG), None)
        except ConfigError:  # the flow itself reports it; the name falls back to UTC
            night = summary.today("UTC", flow_run.scheduled_start_time)
    return f"night-{night}"


def ending_state(report: dict[str, Any], ending: str) -> State:
    """Every night ends with a message saying why; a collapsed yield ends Failed, named Degraded
    (red in the UI, and the failure hook notifies), with the night's results kept."""
    if report.get("yield_problems"):
        return Failed(name="Degraded", message=ending, data=report)
    return Completed(message=ending, data=report)


@flow(
    name="nightly",
    flow_run_name=night_run_name,
    on_failure=[notify_failure],
    on_crashed=[notify_failure],
)
def nightly(config: str = DEFAULT_CONFIG, night: str | None = None) -> State:
    """One cycle. ``config`` is a path relative to the working directory; ``night`` defaults to today.

    The run's result is the night's summary (freshnet.summary); its state message says how the
    night ended and why.
    """
    with run_logs():
        cfg = load_config(config)
        night = resolve_night(cfg, night)
        report = _cycle(cfg, night)
        ending = close_night(report)
        record_night(cfg, report)
        return ending_state(report, ending)


def _cycle(cfg: Config, night: str) -> dict[str, Any]:
    log = get_run_logger()
    searched = search_images(cfg, night)
    ingested = download_images(cfg, night, searched["key"])
    curated = curate_images(cfg, night, ingested["key"])
    champion = read_champion(cfg)
    checked = check_labels(cfg, night, champion)
    snap = snapshot_dataset(cfg, since=champion["dataset"] if champion else None)
    report = summary.start(cfg, night, searched, ingested, curated, snap, checked)

    if snap["problems"]:
        log.warning("quality gate stopped the cycle: %s", "; ".join(snap["problems"]))
        return summary.stop(report, "stopped by the quality gate: " + "; ".join(snap["problems"]))

    if champion and snap["new_since"] < cfg.dataset.min_new_images:
        return summary.stop(
            report,
            f"nothing new ({snap['new_since']} images not in the champion's dataset < "
            f"min_new_images {cfg.dataset.min_new_images}): training skipped",
        )

    init_key = champion["model_key"] if champion and cfg.train.init == "champion" else None
    version = contest.night_version(cfg, night, snap["id"], init_key)
    trained = run_training(cfg, snap["id"], version, init_key)
    challenger = evaluate_model(cfg, trained["model_key"], version, snap["id"])
    defending = (
        evaluate_model(cfg, champion["model_key"], champion["version"], snap["id"])
        if champion
        else None
    )
    decided = decide_promotion(cfg, challenger, defending, before_bundle=True)

    entry = None
    if decided["decision"]["promote"]:
        bundle = build_bundle(cfg, version, trained, challenger, snap["id"])
        if not bundle["ok"]:
            decided = decide_promotion(cfg, challenger, defending, bundle_error=bundle["reason"])
        else:
            # The report now says the bundle passed its check instead of "not run".
            decided = decide_promotion(cfg, challenger, defending, bundle_checked=True)
            entry = publish_space(
                cfg, version, bundle["path"], trained, challenger, decided["decision"], snap["id"]
            )
    return summary.finish(report, version, trained, challenger, defending, champion, decided, entry)
