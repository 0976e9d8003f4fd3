"""infra/: the scripts fail clearly without a server, and prefect.yaml is fit for remote workers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.fixtures_servers import free_port

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "HF_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), **extra)
    return env


def test_worker_script_needs_api_url(tmp_path: Path) -> None:
    r = subprocess.run(
        [str(INFRA / "worker-cpu.sh")], env=clean_env(tmp_path), capture_output=True, text=True
    )
    assert r.returncode != 0 and "PREFECT_API_URL" in r.stderr


def test_worker_script_names_unreachable_server(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    r = subprocess.run(
        [str(INFRA / "worker-gpu.sh")],
        env=clean_env(tmp_path, PREFECT_API_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 3 and f"{url}/health is not reachable" in r.stderr


def test_bootstrap_needs_api_url(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(INFRA / "bootstrap.py"), "--skip-bucket"],
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "PREFECT_API_URL is not set" in r.stderr


def test_prefect_yaml_is_fit_for_remote_workers() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    text = yaml.safe_dump(spec.get("pull"))
    # No path of the deploying machine: the pull step is resolved on the worker.
    assert str(REPO) not in text and "/work/" not in text, text
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert deployments["nightly"]["work_pool"]["name"] == "cpu"
    assert deployments["train"]["work_pool"]["name"] == "gpu"
    assert deployments["nightly"]["schedules"][0]["cron"] == "0 2 * * *"
    # Secrets never travel as parameters or job variables.
    secretish = re.compile(r"token|secret|password|aws_access|aws_secret", re.I)
    for d in deployments.values():
        for section in ("parameters", "job_variables"):
            blob = yaml.safe_dump(d.get(section) or d.get("work_pool", {}).get(section) or {})
            assert not secretish.search(blob), (d["name"], section, blob)


def test_dockerfile_copies_only_existing_paths() -> None:
    text = (INFRA / "Dockerfile.gpu-worker").read_text()
    for src in re.findall(r"^COPY\s+(\S+)\s", text, re.M):
        assert (REPO / src).exists(), f"Dockerfile copies missing {src}"
    assert "worker.sh" in text and "gpu" in text
