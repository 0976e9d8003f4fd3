"""The train flow: runs as a subflow in embedded mode, or as the `train` deployment on the gpu pool."""

from __future__ import annotations

import copy
import os

from prefect import flow
from prefect.runtime import flow_run

from flows.logs import run_logs
from freshnet.config import parse_config
from freshnet.config_load import apply_env
from freshnet.contest import TrainResult
from tasks.train import train_model


def train_run_name() -> str:
    """The model version (a retry that run_deployment already named `<version>-<n>` keeps it)."""
    version = str(flow_run.parameters.get("version"))
    name = flow_run.name or ""
    return name if name.startswith(version) else version


@flow(name="train", flow_run_name=train_run_name, log_prints=False)
def train(
    config: dict, snapshot_id: str, version: str, init_model_key: str | None = None
) -> TrainResult:
    """Train on a snapshot; the model and its result dict land in storage under models/<version>/.

    ``config`` is the nightly run's config; this machine's FRESHNET_* overrides apply on top, so
    a GPU machine can set its own (train.device, train.batch_size, train.num_workers, ...).
    """
    with run_logs():
        data = apply_env(copy.deepcopy(config), os.environ)
        cfg = parse_config(
            data, "train flow parameter 'config' with this machine's FRESHNET_* overrides"
        )
        return train_model(cfg, snapshot_id, version, init_model_key)
