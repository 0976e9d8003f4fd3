"""The train flow: runs as a subflow in embedded mode, or as the `train` deployment on the gpu pool."""

from __future__ import annotations

from prefect import flow

from freshnet.config import parse_config
from tasks.train import train_model


@flow(name="train", log_prints=False)
def train(config: dict, snapshot_id: str, version: str, init_model_key: str | None = None) -> dict:
    """Train on a snapshot; the model and its result dict land in storage under models/<version>/."""
    cfg = parse_config(config, "train flow parameter 'config'")
    return train_model(cfg, snapshot_id, version, init_model_key)
