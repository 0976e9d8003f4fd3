"""A night that cannot do its job says so: in its state, its logs, an artifact and a notification.

`freshnet run` against a real Prefect server (as in served mode, the API keeps the run), on a
folder source where most files are not images: the yield collapses, the quality gate stops the
night, and the run ends Failed named "Degraded" with the reason, its summary in the run's logs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures_servers import PrefectServer
from tests.served_stack import Inbox

REPO = Path(__file__).resolve().parents[1]
NIGHT = "2026-12-05"

pytestmark = pytest.mark.slow


def _post(url: str, body: dict) -> list:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_collapsed_yield_ends_degraded_with_reason_logs_artifact_and_notice(
    tmp_path: Path, flower_photos: dict[str, list[Path]]
) -> None:
    source = tmp_path / "source"
    for label, photos in (("daisy", flower_photos["daisy"]), ("roses", flower_photos["roses"])):
        (source / label).mkdir(parents=True)
        for p in photos[:2]:
            shutil.copy(p, source / label / p.name)
        for i in range(6):  # what a broken scrape leaves: pages saved as .jpg
            (source / label / f"page{i}.jpg").write_text("<html>blocked</html>")
    config = tmp_path / "night.toml"
    config.write_text(
        f'classes = ["daisy", "roses"]\nstorage = "file://.freshnet"\n'
        f'[source]\nkind = "folder"\npath = "{source}"\n'
        "[label_check]\nenabled = false\n"
    )
    server = PrefectServer(tmp_path / "prefect").start()
    inbox = Inbox()
    try:
        work = tmp_path / "work"
        work.mkdir()
        r = subprocess.run(
            [sys.executable, "-m", "freshnet.cli", "run", "--config", str(config),
             "--night", NIGHT, "--json", "night.json"],
            cwd=work,
            env={**server.env(), "FRESHNET_WEBHOOK_URL": inbox.url, "FRESHNET_CACHE": str(tmp_path / "c")},
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert r.returncode == 5, (r.stdout[-3000:], r.stderr[-5000:])  # EXIT_DEGRADED
        assert "yield collapsed (12 of 16 downloads were rejected" in r.stderr
        s = json.loads((work / "night.json").read_text())
        assert s["outcome"] == "stopped" and s["yield_problems"], s

        api = server.api_url
        (run,) = _post(f"{api}/flow_runs/filter", {"flows": {"name": {"any_": ["nightly"]}}})
        assert run["name"] == f"night-{NIGHT}"
        state = run["state"]
        assert (state["type"], state["name"]) == ("FAILED", "Degraded"), state
        assert state["message"].startswith("degraded night, yield collapsed (12 of 16 downloads")
        assert "stopped by the quality gate" in state["message"]

        arts = _post(
            f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
        )
        outcome = next(a for a in arts if a["key"] == "night-outcome")
        assert outcome["data"].startswith(f"# Night {NIGHT}: DEGRADED — STOPPED")
        assert "12 of 16 downloads were rejected" in outcome["data"]

        logs = _post(
            f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200}
        )
        by_level = [(entry["level"], entry["message"]) for entry in logs]
        names = {entry["name"] for entry in logs}
        # freshnet's own loggers reached the run's logs: the core's lines and the summary table.
        assert {"freshnet.data.ingest", "tasks.night"} <= names, names
        assert any(f"night {NIGHT}: degraded night" in m and "found" in m for _, m in by_level)
        assert any(lvl >= 30 and "yield collapsed" in m for lvl, m in by_level), by_level
        assert any(lvl >= 30 and "quality gate stopped the cycle" in m for lvl, m in by_level)
        # And the failure notification says why.
        assert any("Degraded" in m and "yield collapsed" in m for m in inbox.messages), (
            inbox.messages
        )
    finally:
        inbox.stop()
        server.stop()
