"""Serving and driving the Space app in tests: bundle metadata and `python app.py` as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.fixtures_servers import free_port


def bundle_meta(version: str, **extra: object) -> dict:
    """The metadata a nightly writes into a bundle, for a test version."""
    return {
        "version": version,
        "date": "2026-11-27",
        "holdout_accuracy": 0.8,
        "classes": ["daisy", "dandelion", "roses", "sunflowers", "tulips"],
        "dataset": "snap-test",
        **extra,
    }


def wait_http(url: str, timeout_s: float = 60.0) -> None:
    """Wait until an HTTP server answers at ``url``."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s ({last})")


class ServedApp:
    """`python app.py` in a bundle folder, exactly as the Space runs it (context manager)."""

    def __init__(self, bundle: Path, log_dir: Path, **env: str):
        self.bundle = bundle
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_dir / f"app-{self.port}.log"
        self.env = {
            **os.environ,
            "GRADIO_SERVER_PORT": str(self.port),
            "GRADIO_SERVER_NAME": "127.0.0.1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServedApp:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "app.py"], cwd=self.bundle, env=self.env, stdout=log, stderr=log
            )
        try:
            wait_http(self.url, timeout_s=240)
        except TimeoutError:
            self.__exit__()
            raise TimeoutError(f"app did not start: {self.log_path.read_text()[-2000:]}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
