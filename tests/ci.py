"""Whether the tests run in CI, where a missing prerequisite fails a test instead of skipping it."""

from __future__ import annotations

import os


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
