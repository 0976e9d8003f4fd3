"""The training task (runs wherever the train flow runs: in-process or on the gpu pool)."""

from __future__ import annotations

from prefect import task

from freshnet import cycle
from freshnet.config import Config


@task
def train_model(cfg: Config, snapshot_id: str, version: str, init_model_key: str | None) -> dict:
    return cycle.train_step(cfg, snapshot_id, version, init_model_key)
