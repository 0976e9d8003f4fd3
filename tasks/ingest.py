"""Search and download tasks: I/O, so they retry; cached per (source, night) so a rerun skips them."""

from __future__ import annotations

from datetime import timedelta

from prefect import task

from freshnet import cycle
from freshnet.config import Config
from freshnet.cycle import IngestResult, SearchResult
from tasks.progress import UiProgress
from tasks.report import publish_rejections, publish_search_failures
from tasks.secrets import load_secret


def _cached_io(stage: str) -> dict:
    """Task options for a network stage: retries with jitter, result cached per (source, night)."""

    def key(_ctx, params: dict) -> str:
        cfg: Config = params["cfg"]
        return f"{stage}-{cfg.storage}-{cycle.config_fingerprint(cfg)}-{params['night']}"

    return {
        "retries": 2,
        "retry_delay_seconds": [10, 60],
        "retry_jitter_factor": 0.5,
        "cache_key_fn": key,
        "cache_expiration": timedelta(days=2),
        "persist_result": True,
    }


def feedback_token(cfg: Config) -> str | None:
    """space.feedback_repo's token at run time: the Secret block when it exists, else None (the
    core then reads FRESHNET_FEEDBACK_TOKEN). Never a parameter: it would be stored with the run."""
    if not cfg.space.feedback_repo or not cfg.space.feedback_token_secret:
        return None
    return load_secret(cfg.space.feedback_token_secret)


@task(**_cached_io("search"))
def search_images(cfg: Config, night: str) -> SearchResult:
    result = cycle.search_step(cfg, night, feedback_token=feedback_token(cfg))
    publish_search_failures(result)
    return result


@task(**_cached_io("ingest"))
def download_images(cfg: Config, night: str, search_key: str) -> IngestResult:
    progress = UiProgress("download-progress", f"night {night}: downloads", "URLs")
    result = cycle.ingest_step(cfg, night, search_key, on_progress=progress)
    progress.close(f"done: {result['accepted']} accepted, {result['rejected']} not kept")
    publish_rejections(result["counts"])
    return result
