"""Deployment steps that prefect.yaml runs on the worker before a flow starts."""

from __future__ import annotations

import os


def set_project_directory() -> dict[str, str]:
    """Enter this machine's checkout, FRESHNET_PROJECT_DIR, read when the flow run starts.

    Prefect's own `set_working_directory` step takes the directory as a `{{ $VAR }}` template,
    which `prefect deploy` fills in from the *deploying* shell whenever the variable is set there:
    the path of that machine would then be baked into every deployment, GPU machine included.
    """
    directory = os.environ.get("FRESHNET_PROJECT_DIR")
    if not directory:
        raise RuntimeError(
            "FRESHNET_PROJECT_DIR is not set on this worker: start it with infra/worker.sh, "
            "or set it to this machine's checkout of freshnet"
        )
    if not os.path.isdir(directory):
        raise RuntimeError(f"FRESHNET_PROJECT_DIR={directory} is not a directory on this machine")
    os.chdir(directory)
    return {"directory": directory}
