"""Progress of a long step in the Prefect UI: a progress artifact, updated while the step runs."""

from __future__ import annotations

import logging
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact

log = logging.getLogger(__name__)


class UiProgress:
    """A ``(done, total)`` callback for the core, shown as one progress artifact of the run.

    Updates are sent at most once per ``min_interval_s`` (a download step reports every URL)
    and never stop the step: the UI's progress bar is not worth a failed night.
    """

    def __init__(self, key: str, what: str, unit: str, min_interval_s: float = 1.0) -> None:
        self.what, self.unit, self.min_interval_s = what, unit, min_interval_s
        self.last = 0.0
        self.broken = False
        self.id = create_progress_artifact(
            0.0, key=key, description=f"{what}: starting", _sync=True
        )

    def __call__(self, done: float, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < self.min_interval_s:
            return
        self.last = now
        shown = f"{done:.1f}" if isinstance(done, float) and not done.is_integer() else f"{done:g}"
        self._send(100.0 * done / total if total else 100.0, f"{shown} of {total} {self.unit}")

    def close(self, outcome: str) -> None:
        self._send(100.0, outcome)

    def _send(self, percent: float, text: str) -> None:
        if self.broken:
            return
        try:
            update_progress_artifact(
                self.id, min(100.0, percent), description=f"{self.what}: {text}", _sync=True
            )
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            self.broken = True
            log.warning(
                "progress of %s not shown in the UI: %s: %s", self.what, type(exc).__name__, exc
            )
