"""A finished night as people read it: the Prefect UI (a real server with its web UI) in Chromium.

One night of the offline demo runs through `freshnet run` against a Prefect server that serves
its UI, with storage on the moto S3 server (so the confusion matrix gets a presigned URL the
browser loads). The API test checks the artifacts' content; the browser test opens the flow run,
its Artifacts tab and the decision report, and sees the decision and the confusion matrix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.fixtures_servers import S3_TEST_ENV, PrefectServer
from tests.test_browser import ARGS, chromium_path  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NIGHT = "2026-12-01"


def _post(url: str, body: dict) -> list | dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def ui_night(tmp_path_factory, moto_server):
    from freshnet.storage_s3 import S3Storage

    root = tmp_path_factory.mktemp("prefect-ui")
    s3 = {**S3_TEST_ENV, "FRESHNET_S3_ENDPOINT_URL": moto_server.endpoint_url}
    bucket = f"ui-{uuid.uuid4().hex[:10]}"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in s3.items():
            mp.setenv(name, value)
        S3Storage(bucket).ensure_bucket()
    server = PrefectServer(root / "prefect", ui=True).start()
    try:
        work = root / "work"
        work.mkdir()
        env = {
            **server.env(),
            **s3,
            "FRESHNET_STORAGE": f"s3://{bucket}/freshnet",
            "FRESHNET_SPACE__TARGET": ".freshnet/space",
            "FRESHNET_CACHE": str(root / "cache"),
            # The UI is under test, not the model: a small, quick night.
            "FRESHNET_SOURCE__DEMO_PER_QUERY": "16",
            "FRESHNET_DATASET__MIN_TRAIN_PER_CLASS": "10",
            "FRESHNET_DATASET__MIN_HOLDOUT_PER_CLASS": "3",
            "FRESHNET_TRAIN__IMAGE_SIZE": "64",
            "FRESHNET_TRAIN__EPOCHS": "1",
            "FRESHNET_LABEL_CHECK__ENABLED": "false",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        r = subprocess.run(
            [sys.executable, "-m", "freshnet.cli", "run", "--config",
             str(REPO / "configs" / "demo.toml"), "--night", NIGHT, "--json", "night.json"],
            cwd=work, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
        api = server.api_url
        runs = _post(f"{api}/flow_runs/filter", {"flows": {"name": {"any_": ["nightly"]}}})
        assert len(runs) == 1, [x["name"] for x in runs]
        yield {
            "ui": api.removesuffix("/api"),
            "api": api,
            "run": runs[0],
            "summary": json.loads((work / "night.json").read_text()),
            "store": S3Storage(bucket, "freshnet", endpoint_url=moto_server.endpoint_url),
            "work": work,
            "env": env,
        }
    finally:
        server.stop()


def _artifacts(night: dict) -> dict[str, dict]:
    """The run's newest artifact per key."""
    arts = _post(
        f"{night['api']}/artifacts/filter",
        {"artifacts": {"flow_run_id": {"any_": [night["run"]["id"]]}}, "sort": "CREATED_DESC"},
    )
    out: dict[str, dict] = {}
    for a in arts:
        out.setdefault(a["key"], a)
    return out


@pytest.mark.slow
def test_night_publishes_the_decision_and_its_confusion_matrix(ui_night, monkeypatch):
    for name, value in S3_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    arts = _artifacts(ui_night)
    version = ui_night["summary"]["challenger"]["version"]
    stored = json.loads(ui_night["store"].get(f"decisions/{version}.json"))
    report = arts["decision-report"]["data"]
    verdict = "PROMOTE" if stored["decision"]["promote"] else "KEEP CHAMPION"
    assert report.startswith(f"# Decision for {version}: {verdict}")
    for rule in stored["decision"]["rules"]:
        assert f"| {rule['name']} |" in report
    # The confusion matrix as a table, and as an image whose URL a browser can load.
    assert stored["confusion_table"] in report
    url = arts["confusion-matrix"]["data"]
    assert arts["confusion-matrix"]["type"] == "image" and f"]({url})" in report
    with urllib.request.urlopen(url, timeout=10) as r:  # no credentials, like a browser
        assert r.read() == ui_night["store"].get(f"decisions/{version}.png")
    # The Space link names where the Space really is, not a path relative to the worker.
    space = arts["space-commit"]["data"]
    assert (ui_night["work"] / ".freshnet" / "space").resolve().as_uri() in space
    assert "file://.freshnet" not in space


# The night's ending as the nightly flow hands it over: record it, then publish the history.
RECORD = """
import json, sys
from prefect import flow
from freshnet.config_load import load_config
from tasks.report import record_night

@flow(name="record-night")
def record(config: str, summary: dict) -> dict:
    return record_night(load_config(config), summary)

record(sys.argv[1], json.load(open("night.json")))
"""


@pytest.mark.slow
def test_night_history_table_artifact_survives_in_storage(ui_night, monkeypatch):
    for name, value in S3_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    from freshnet import history

    s = ui_night["summary"]
    r = subprocess.run(
        [sys.executable, "-c", RECORD, str(REPO / "configs" / "demo.toml")],
        cwd=ui_night["work"], env=ui_night["env"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-5000:]
    arts = _post(
        f"{ui_night['api']}/artifacts/filter",
        {"artifacts": {"key": {"any_": ["night-history"]}}, "sort": "CREATED_DESC"},
    )
    assert arts and arts[0]["type"] == "table"
    rows = json.loads(arts[0]["data"])
    # The row a person reads is the night's summary, and it is the record kept in storage.
    assert rows[0] == {
        "night": NIGHT,
        "new images": sum(c["new"] for c in s["per_class"].values()),
        "champion accuracy": None,
        "challenger accuracy": round(s["challenger"]["accuracy"], 4),
        "decision": f"{s['outcome']} — {s['decision']}",
        "space commit": (s.get("commit") or "")[:12] or None,
        "model version": s["challenger"]["version"],
    }
    assert rows == history.table_rows(history.recent(ui_night["store"]))


@pytest.mark.slow
def test_prefect_ui_shows_the_decision_and_the_confusion_matrix(
    ui_night,
    chromium_path,  # noqa: F811
    tmp_path,
):
    from playwright.sync_api import expect, sync_playwright

    version = ui_night["summary"]["challenger"]["version"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(
                f"{ui_night['ui']}/runs/flow-run/{ui_night['run']['id']}",
                wait_until="domcontentloaded",
                timeout=120_000,
            )
            expect(page.get_by_text(ui_night["run"]["name"]).first).to_be_visible(timeout=60_000)
            page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click()
            cards = page.locator("a[href^='/artifacts/artifact/']")
            decision_card = cards.filter(has_text="decision-report")
            expect(decision_card).to_be_visible(timeout=60_000)
            expect(cards.filter(has_text="confusion-matrix")).to_be_visible()
            page.screenshot(path=str(tmp_path / "flow-run-artifacts.png"), full_page=True)

            decision_card.click()
            expect(page.get_by_role("heading", name=f"Decision for {version}")).to_be_visible(
                timeout=60_000
            )
            page.screenshot(path=str(tmp_path / "decision-top.png"))
            expect(page.get_by_role("heading", name="Rules")).to_be_visible()
            expect(page.get_by_role("cell", name="accuracy_floor", exact=True)).to_be_visible()
            matrix = page.locator("table").filter(has_text="actual ↓ / predicted →")
            expect(matrix).to_be_visible()
            for label in ui_night["summary"]["per_class"]:
                expect(matrix.get_by_role("cell", name=label, exact=True)).to_be_visible()
            image = page.locator(f"img[alt='confusion matrix of {version}']")
            image.scroll_into_view_if_needed()
            expect(image).to_be_visible()
            # Loaded from storage through the presigned URL, not a broken image.
            page.wait_for_function(
                "img => img.complete && img.naturalWidth > 0", arg=image.element_handle()
            )
            page.screenshot(path=str(tmp_path / "decision-report.png"), full_page=True)
        finally:
            browser.close()
    for shot in ("flow-run-artifacts.png", "decision-top.png", "decision-report.png"):
        assert (tmp_path / shot).stat().st_size > 10_000
