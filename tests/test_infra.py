"""infra/: the scripts fail clearly without a server, and prefect.yaml is fit for remote workers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
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


# `name.ext` in the docs are file names (prefect.yaml, train.json), not config keys.
FILE_EXTENSIONS = {"yaml", "toml", "json", "md", "py", "sh", "png", "pkl", "txt"}
DOCS = {"infra/README.md": INFRA / "README.md", "README.md": REPO / "README.md"}


def _flow_params(entrypoint: str) -> tuple[str, set[str]]:
    """The flow name and parameter names of a prefect.yaml entrypoint, read without importing."""
    import ast

    path, func = entrypoint.split(":")
    tree = ast.parse((REPO / path).read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func)
    deco = next(d for d in fn.decorator_list if isinstance(d, ast.Call))
    name = next(k.value.value for k in deco.keywords if k.arg == "name")
    return name, {a.arg for a in fn.args.args}


def test_docs_commands_name_real_deployments_parameters_scripts_and_options() -> None:
    """What the READMEs tell people to type refers to things that exist, spelled as they are."""
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {}
    for d in spec["deployments"]:
        flow_name, params = _flow_params(d["entrypoint"])
        deployments[f"{flow_name}/{d['name']}"] = params
    boot_help = subprocess.run(
        [sys.executable, str(INFRA / "bootstrap.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    runs = 0
    for doc, path in DOCS.items():
        text = path.read_text()
        for m in re.finditer(r"prefect deployment run (\S+)((?: -p [\w]+=\S+)*)", text):
            runs += 1
            assert m[1] in deployments, (doc, m[0], sorted(deployments))
            for key in re.findall(r"-p (\w+)=", m[2]):
                assert key in deployments[m[1]], (doc, m[0], deployments[m[1]])
        for script in set(re.findall(r"\binfra/[\w.-]+", text)):
            assert (REPO / script).exists(), (doc, script)
            if script.endswith(".sh"):
                assert os.access(REPO / script, os.X_OK), f"{script} is not executable"
        for line in re.findall(r"infra/bootstrap\.py[^\n`]*", text):
            for flag in re.findall(r"(--[\w-]+)", line):
                assert flag in boot_help, (doc, line, flag)
    assert runs >= 3  # rerun a night, roll back, try a cycle


def test_docs_name_only_known_settings_and_config_keys() -> None:
    """Every FRESHNET_* variable and `section.key` the READMEs mention is one freshnet reads."""
    from freshnet.config import Config
    from freshnet.config_load import NON_CONFIG_ENV, config_env_names

    known_env = set(config_env_names()) | NON_CONFIG_ENV
    sections = {
        name: set(field.annotation.model_fields)
        for name, field in Config.model_fields.items()
        if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields")
    }
    for doc, path in DOCS.items():
        text = path.read_text()
        for name in set(re.findall(r"\bFRESHNET_[A-Z0-9_]*[A-Z0-9]\b", text)):
            assert name in known_env, (doc, name)
        for section, key in set(re.findall(r"`(\w+)\.(\w+)`", text)):
            if section in sections and key not in FILE_EXTENSIONS:
                assert key in sections[section], (doc, f"{section}.{key}")


def test_every_config_key_and_app_variable_is_documented() -> None:
    """The README names every config key and every variable the Space app reads (drift guard)."""
    from freshnet.config import Config

    readme = (REPO / "README.md").read_text()
    undocumented = []
    for section, field in Config.model_fields.items():
        keys = getattr(field.annotation, "model_fields", None)
        for key in keys or ():
            # Rows group keys of one section: `train.epochs`, `freeze_epochs`, ...
            if f"`{section}.{key}`" not in readme and f"`{key}`" not in readme:
                undocumented.append(f"{section}.{key}")
    app = (REPO / "app" / "app.py").read_text()
    for name in sorted(set(re.findall(r'"(FRESHNET_[A-Z0-9_]+)"', app))):
        if f"`{name}`" not in readme:
            undocumented.append(name)
    assert not undocumented, f"not in README.md: {undocumented}"


def test_pull_step_enters_this_machines_project_dir(tmp_path: Path, monkeypatch) -> None:
    """The pull step reads FRESHNET_PROJECT_DIR when the run starts: nothing is templated at
    deploy time (a `{{ $VAR }}` would be filled in from the deploying shell)."""
    from flows.steps import set_project_directory

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert spec["pull"] == [{"flows.steps.set_project_directory": {}}]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FRESHNET_PROJECT_DIR", str(REPO))
    assert set_project_directory() == {"directory": str(REPO)}
    assert Path.cwd() == REPO
    monkeypatch.delenv("FRESHNET_PROJECT_DIR")
    with pytest.raises(RuntimeError, match="FRESHNET_PROJECT_DIR is not set on this worker"):
        set_project_directory()
    monkeypatch.setenv("FRESHNET_PROJECT_DIR", str(tmp_path / "absent"))
    with pytest.raises(RuntimeError, match="is not a directory on this machine"):
        set_project_directory()


def test_pre_commit_config_is_valid_and_runs_the_lint_tools_from_the_venv() -> None:
    """`pre-commit install` gives ruff, ruff-format and mypy, the versions `make lint` runs."""
    config = REPO / ".pre-commit-config.yaml"
    pre_commit = Path(sys.executable).parent / "pre-commit"
    r = subprocess.run(
        [str(pre_commit), "validate-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    hooks = {
        h["id"]: h for repo in yaml.safe_load(config.read_text())["repos"] for h in repo["hooks"]
    }
    assert set(hooks) >= {"ruff", "ruff-format", "mypy"}
    assert hooks["ruff"]["entry"].split()[:2] == [".venv/bin/ruff", "check"]
    assert hooks["ruff-format"]["entry"].split()[:2] == [".venv/bin/ruff", "format"]
    assert hooks["mypy"]["entry"] == ".venv/bin/mypy" and hooks["mypy"]["pass_filenames"] is False
    assert all(h["language"] == "system" for h in hooks.values())  # no download of other versions
