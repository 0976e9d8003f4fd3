"""Fixtures that provide trained models. Registered for every test by ``pytest_plugins`` in
tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.model_helpers import model_for_tests


@pytest.fixture(scope="session")
def space_model(flower_photos, tmp_path_factory) -> Path:
    """The test flower classifier's model.pkl: trained once per session, or the prebuilt one
    named by FRESHNET_SPACE_TEST_MODEL."""
    return model_for_tests(flower_photos, tmp_path_factory)
