"""The training task (runs wherever the train flow runs: in-process or on the gpu pool)."""

from __future__ import annotations

import contextlib

from prefect import task
from prefect.concurrency.sync import concurrency

from freshnet import contest
from freshnet.config import Config
from freshnet.contest import TrainResult
from tasks.progress import UiProgress


@task
def train_model(
    cfg: Config, snapshot_id: str, version: str, init_model_key: str | None
) -> TrainResult:
    # Served mode: one training per GPU at a time (global limit `gpu`, created by
    # infra/bootstrap.py); a short lease frees the slot soon after a killed trainer. Embedded mode
    # trains in-process, one night at a time, and its temporary server has no such limit.
    slot = (
        concurrency("gpu", occupy=1, lease_duration=60, strict=False)
        if cfg.prefect.train_deployment
        else contextlib.nullcontext()
    )
    with slot:
        progress = UiProgress("training-progress", f"training {version}", "epochs")
        result = contest.train_step(cfg, snapshot_id, version, init_model_key, on_progress=progress)
        accuracy = result["metrics"]["valid_accuracy"]
        progress.close(f"done: valid accuracy {accuracy:.3f}")
        return result
