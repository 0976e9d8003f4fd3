"""The nightly cycle: search → download → curate → snapshot → train → evaluate → decide → publish."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.hooks import notify_failure, run_training
from freshnet import cycle, summary
from freshnet.config import load_config
from tasks.dataset import check_labels, curate_images, snapshot_dataset
from tasks.evaluate import decide_promotion, evaluate_model, read_champion
from tasks.ingest import download_images, search_images
from tasks.publish import build_bundle, publish_space


@flow(name="nightly", on_failure=[notify_failure], on_crashed=[notify_failure])
def nightly(config: str = "configs/demo.toml", night: str | None = None) -> dict:
    """One cycle. ``config`` is a path relative to the working directory; ``night`` defaults to today."""
    cfg = load_config(config)
    night = night or summary.today(cfg.prefect.timezone)
    log = get_run_logger()

    searched = search_images(cfg, night)
    ingested = download_images(cfg, night, searched["key"])
    curated = curate_images(cfg, night, ingested["key"])
    champion = read_champion(cfg)
    checked = check_labels(cfg, night, champion)
    snap = snapshot_dataset(cfg, since=champion["dataset"] if champion else None)
    report = summary.start(cfg, night, searched, ingested, curated, snap, checked)

    if snap["problems"]:
        log.error("quality gate stopped the cycle: %s", "; ".join(snap["problems"]))
        return summary.stop(report, "stopped by the quality gate: " + "; ".join(snap["problems"]))

    if champion and snap["new_since"] < cfg.dataset.min_new_images:
        return summary.stop(
            report,
            f"nothing new ({snap['new_since']} images not in the champion's dataset < "
            f"min_new_images {cfg.dataset.min_new_images}): training skipped",
        )

    init_key = champion["model_key"] if champion and cfg.train.init == "champion" else None
    version = cycle.night_version(cfg, night, snap["id"], init_key)
    trained = run_training(cfg, snap["id"], version, init_key)
    challenger = evaluate_model(cfg, trained["model_key"], version, snap["id"])
    defending = (
        evaluate_model(cfg, champion["model_key"], champion["version"], snap["id"])
        if champion
        else None
    )
    decided = decide_promotion(cfg, challenger, defending)

    entry = None
    if decided["decision"]["promote"]:
        bundle = build_bundle(cfg, version, trained, challenger, snap["id"])
        if not bundle["ok"]:
            decided = decide_promotion(cfg, challenger, defending, bundle_error=bundle["reason"])
        else:
            entry = publish_space(
                cfg, version, bundle["path"], trained, challenger, decided["decision"], snap["id"]
            )
    return summary.finish(report, version, trained, challenger, defending, champion, decided, entry)
