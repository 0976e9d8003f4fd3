"""Loading a config: the TOML file plus FRESHNET_* environment overrides."""

from __future__ import annotations

import difflib
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from freshnet.config import Config, ConfigError, parse_config

ENV_PREFIX = "FRESHNET_"

# FRESHNET_* variables that are not config keys: read with os.environ by storage, the app, the
# flows, the worker scripts, tests and benchmarks. Every other FRESHNET_* name must be a config
# key (a mistyped override is an error, not silently ignored), so a new variable read anywhere
# in the project must be added here (tests/test_config.py checks that).
NON_CONFIG_ENV = frozenset(
    {
        "FRESHNET_ALLOW_WEIGHT_DOWNLOAD",  # freshnet/model/train.py: may download pretrained weights
        "FRESHNET_APP_DIR",  # freshnet/space/publish.py: the app folder pushed to the Space
        "FRESHNET_BENCH_MODEL",  # benchmarks/app_latency.py
        "FRESHNET_CACHE",  # freshnet/cycle.py: local cache folder
        "FRESHNET_COMPILE",  # app/app.py
        "FRESHNET_CONCURRENCY",  # app/app.py
        "FRESHNET_FEEDBACK",  # app/app.py: feedback sink
        "FRESHNET_FEEDBACK_EVERY_MIN",  # app/app.py: how often the Hub sink commits
        "FRESHNET_FEEDBACK_REPO",  # app/app.py: the feedback dataset repo
        "FRESHNET_FEEDBACK_TOKEN",  # app/app.py, freshnet/data/feedback_hub.py: that dataset's token
        "FRESHNET_GIT_URL",  # prefect.yaml pull step (infra/README.md)
        "FRESHNET_MAX_DECODE_MB",  # app/app.py
        "FRESHNET_MAX_PIXELS",  # app/app.py
        "FRESHNET_MAX_UPLOAD_MB",  # app/app.py
        "FRESHNET_NOTIFY_WEBHOOK_URL",  # infra/bootstrap.py
        "FRESHNET_PROJECT_DIR",  # prefect.yaml, infra/worker.sh
        "FRESHNET_QUEUE_SIZE",  # app/app.py
        "FRESHNET_S3_ADDRESSING_STYLE",  # freshnet/storage_s3.py
        "FRESHNET_S3_ENDPOINT_URL",  # freshnet/storage_s3.py
        "FRESHNET_S3_MAX_ATTEMPTS",  # freshnet/storage_s3.py
        "FRESHNET_S3_PUBLIC_ENDPOINT_URL",  # freshnet/storage_s3.py: presigned URLs for browsers
        "FRESHNET_S3_REGION",  # freshnet/storage_s3.py
        "FRESHNET_S3_TIMEOUT_S",  # freshnet/storage_s3.py
        "FRESHNET_SHARED_DATA",  # tests and benchmarks: the shared photo folder
        "FRESHNET_SPACE_TEST_MODEL",  # tests/model_helpers.py
        "FRESHNET_TORCH_THREADS",  # app/app.py
        "FRESHNET_UPLOAD_TTL_S",  # app/app.py
        "FRESHNET_VENV",  # infra/worker.sh, infra/Dockerfile.gpu-worker
        "FRESHNET_WEBHOOK_URL",  # flows/hooks.py: failure notifications
        "FRESHNET_WORKER_NAME",  # infra/worker.sh
    }
)


def _set_path(data: dict[str, Any], path: list[str], raw: str) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{ENV_PREFIX}{'__'.join(path).upper()}: {part} is not a section")
    # Env values are TOML/JSON literals when they parse as such, plain strings otherwise.
    try:
        value: Any = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    node[path[-1]] = value


def _env_names(model: type[BaseModel], path: tuple[str, ...] = ()) -> list[str]:
    """Every override name the model accepts: one per section and per key."""
    names = []
    for key, field in model.model_fields.items():
        here = (*path, key)
        names.append(ENV_PREFIX + "__".join(here).upper())
        ann = field.annotation
        for t in (ann, *typing.get_args(ann)):
            if isinstance(t, type) and issubclass(t, BaseModel):
                names += _env_names(t, here)
    return names


def config_env_names() -> list[str]:
    """The FRESHNET_<SECTION>__<KEY> names that override config keys."""
    return _env_names(Config)


def apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Apply FRESHNET_SECTION__KEY=value overrides (double underscore separates levels).

    A FRESHNET_* name that is neither a config key nor in NON_CONFIG_ENV is an error naming the
    nearest known name: a mistyped override must not leave the default in place unnoticed.
    """
    known = set(config_env_names())
    unknown = []
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in NON_CONFIG_ENV:
            continue
        if name.upper() not in known:
            unknown.append(name)
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        _set_path(data, path, raw)
    if unknown:
        # Compared without the shared prefix, which would make every name look close.
        n = len(ENV_PREFIX)
        candidates = sorted(c[n:] for c in known | NON_CONFIG_ENV)
        lines = []
        for name in unknown:
            near = difflib.get_close_matches(name[n:].upper(), candidates, n=1, cutoff=0.6)
            hint = f"; did you mean {ENV_PREFIX}{near[0]}?" if near else ""
            lines.append(f"  - {name}: not a config key{hint}")
        raise ConfigError(
            "unknown FRESHNET_* environment variable(s):\n"
            + "\n".join(lines)
            + "\n  config overrides are FRESHNET_<SECTION>__<KEY> (e.g. FRESHNET_TRAIN__EPOCHS);"
            " other FRESHNET_* variables freshnet reads are listed in"
            " freshnet/config_load.py NON_CONFIG_ENV"
        )
    return data


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Load a TOML config file and apply FRESHNET_* overrides from ``env`` (default: os.environ)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    data = apply_env(data, os.environ if env is None else env)
    return parse_config(data, str(path))
