"""Shared fixtures: where the real photos live, and a scratch working directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.ci import in_ci

# Fixture modules, registered as plugins: moto's S3 server, the Prefect server/worker and proxy
# (fixtures_servers); the trained test model (fixtures_models).
pytest_plugins = ["tests.fixtures_servers", "tests.fixtures_models"]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FRESHNET_SHARED_DATA", REPO.parent / "shared" / "data"))

# Every Space app the tests start (in-process or as `python app.py`) runs the eager model: the
# background torch.compile costs ~50 s of CPU per process. test_app.py tests the compiled path.
os.environ.setdefault("FRESHNET_COMPILE", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real photos at ../shared/data (never copied into the repo)."""
    if not (SHARED_DATA / "photos" / "flowers").is_dir():
        # In CI a missing photo set is a broken checkout, not a reason to pass quietly.
        if in_ci():
            pytest.fail(f"real photos not found at {SHARED_DATA} (CI is set: they are required)")
        pytest.skip(f"real photos not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def flower_photos(shared_data: Path) -> dict[str, list[Path]]:
    root = shared_data / "photos" / "flowers"
    return {d.name: sorted(d.glob("*.jpg")) for d in sorted(root.iterdir()) if d.is_dir()}


@pytest.fixture(scope="session")
def example_photos(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "examples").glob("*.jpg"))
