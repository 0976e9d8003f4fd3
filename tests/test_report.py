"""What a person reads about a night: the decision report and its image, the nights' history,
`freshnet status`, and where the Space link points."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from freshnet import contest, cycle, history, summary
from freshnet.cli import main
from freshnet.config import Config
from freshnet.space.ledger import format_status
from freshnet.storage_file import FileStorage
from freshnet.storage_open import open_storage
from tests.test_policy import BASE, N, flip, make_eval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cfg(storage: str) -> Config:
    return Config(name="report-test", classes=["a", "b", "c"], storage=storage)


def _night(cfg: Config, night: str, new: int, snapshot: str = "snap") -> dict:
    """The summary the nightly flow builds before deciding (freshnet.summary.start)."""
    return summary.start(
        cfg,
        night,
        {"failures": [], "failed_classes": []},
        {"counts": {"a": {"accepted": new}}},
        {"per_class": {"a": {"new": new}}},
        {"id": snapshot, "counts": {}},
    )


def _decided_night(cfg: Config, night: str, chall_ok: list[bool], commit: str | None) -> dict:
    champ = make_eval("v1", BASE).to_dict()
    chall = make_eval(f"v{night[-2:]}", chall_ok).to_dict()
    decided = contest.decide_step(cfg, chall, champ)
    entry = {"commit": commit} if commit else None
    return summary.finish(
        _night(cfg, night, 7),
        chall["version"],
        {"metrics": {}},
        chall,
        champ,
        {"version": "v1"},
        decided,
        entry,
    )


def test_decide_step_on_s3_gives_the_ui_a_working_image_url(s3_uri):
    cfg = _cfg(s3_uri)
    champ, chall = make_eval("v1", BASE), make_eval("v2", [True] * N)
    out = contest.decide_step(cfg, chall.to_dict(), champ.to_dict())
    url = out["confusion_url"]
    store = open_storage(s3_uri)
    assert url.startswith(store.endpoint_url + "/") and "X-Amz-Signature=" in url
    # A browser (no AWS credentials) can load it: it is the stored PNG.
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read()
    assert body.startswith(PNG_MAGIC) and body == store.get("decisions/v2.png")
    assert f"![confusion matrix of v2]({url})" in out["report"]
    # The stored report links the PNG stored beside it; the stored decision keeps rule statuses.
    assert "![confusion matrix of v2](v2.png)" in store.get("decisions/v2.md").decode()
    stored = json.loads(store.get("decisions/v2.json"))
    assert {r["name"]: r["status"] for r in stored["decision"]["rules"]}["bundle"] == "not run"


def test_presigned_url_is_signed_for_the_public_endpoint(s3_uri, monkeypatch):
    store = open_storage(s3_uri)
    store.put("decisions/x.png", PNG_MAGIC + b"x")
    public = store.endpoint_url.replace("127.0.0.1", "localhost")
    monkeypatch.setenv("FRESHNET_S3_PUBLIC_ENDPOINT_URL", public)
    url = store.presigned_url("decisions/x.png", expires_s=60)
    assert url.startswith(public + "/") and "X-Amz-Expires=60" in url
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.read() == PNG_MAGIC + b"x"


def test_decide_step_on_file_storage_shows_the_table_without_a_broken_image(tmp_path):
    cfg = _cfg(f"file://{tmp_path / 'store'}")
    chall = make_eval("v2", flip([True] * N, [0, 1], False))
    out = contest.decide_step(cfg, chall.to_dict(), None)
    assert out["confusion_url"] is None and "![" not in out["report"]
    assert "## Confusion matrix" in out["report"] and out["confusion_table"] in out["report"]
    assert FileStorage(tmp_path / "store").get("decisions/v2.png").startswith(PNG_MAGIC)


def test_history_keeps_nights_side_by_side_and_a_rerun_replaces_its_row(tmp_path):
    cfg = _cfg(f"file://{tmp_path / 'store'}")
    promoted = _decided_night(cfg, "2026-12-01", [True] * N, "c0ffee" * 6)
    cycle.record_night_step(cfg, promoted, run="night-2026-12-01")
    kept = _decided_night(cfg, "2026-12-02", [False] * N, None)
    cycle.record_night_step(cfg, kept)
    stopped = summary.stop(_night(cfg, "2026-12-03", 0), "nothing new (0 images): training skipped")
    rows = cycle.record_night_step(cfg, stopped)["rows"]

    assert [r["night"] for r in rows] == ["2026-12-03", "2026-12-02", "2026-12-01"]
    new, keep, first = rows[2], rows[1], rows[0]
    assert new == {
        "night": "2026-12-01",
        "new images": 7,
        "champion accuracy": 0.9,
        "challenger accuracy": 1.0,
        "decision": f"promoted — {promoted['decision']}",
        "space commit": "c0ffeec0ffee",
        "model version": "v01",
    }
    assert keep["decision"].startswith("kept champion — failed: accuracy_floor")
    assert keep["challenger accuracy"] == 0.0 and keep["space commit"] is None
    assert first["decision"] == "stopped — nothing new (0 images): training skipped"
    assert first["new images"] == 0 and first["challenger accuracy"] is None

    # The history is in storage: a later process (another machine) reads the same rows.
    store = FileStorage(tmp_path / "store")
    assert history.table_rows(history.recent(store)) == rows
    assert history.recent(store)[-1]["run"] == "night-2026-12-01"
    # A rerun of a night replaces its row instead of adding a second one.
    rerun = summary.stop(_night(cfg, "2026-12-03", 3), "stopped by the quality gate: too few")
    rows = cycle.record_night_step(cfg, rerun)["rows"]
    assert len(rows) == 3 and rows[0]["new images"] == 3 and "quality gate" in rows[0]["decision"]


def test_history_orders_numbered_nights_by_number(tmp_path):
    store = FileStorage(tmp_path)
    cfg = _cfg("file://unused")
    for night in ("9", "10", "2"):
        history.record(store, summary.stop(_night(cfg, night, 1), "x"))
    assert [r["night"] for r in history.recent(store)] == ["10", "9", "2"]
    assert [r["night"] for r in history.recent(store, limit=2)] == ["10", "9"]


def test_status_shows_the_last_night_and_its_decision_rule_by_rule(tmp_path, monkeypatch, capsys):
    root = tmp_path / "store"
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(f'classes = ["a", "b", "c"]\nstorage = "file://{root}"\n')
    cfg = _cfg(f"file://{root}")
    monkeypatch.chdir(tmp_path)
    assert main(["status", "--config", str(cfg_file)]) == 0
    assert "last night: none recorded yet" in capsys.readouterr().out
    # A decision whose night was not recorded (a night that failed later) still shows.
    contest.decide_step(cfg, make_eval("v01", BASE).to_dict(), None)
    assert "last decision: v01: PROMOTE" in format_status(FileStorage(root))

    kept = _decided_night(cfg, "2026-12-02", [False] * N, None)
    cycle.record_night_step(cfg, kept)
    assert main(["status", "--config", str(cfg_file)]) == 0
    out = capsys.readouterr().out
    assert "last night: 2026-12-02 — kept champion — failed: accuracy_floor" in out
    assert "last decision: v02: KEEP CHAMPION — failed: accuracy_floor" in out
    assert "  • accuracy_floor: FAIL — challenger holdout accuracy on 90 images" in out
    # No bundle was built on a KEEP night: status says so instead of "pass".
    assert "  • bundle: not run — no bundle built" in out and "bundle: pass" not in out

    # A stopped night decides nothing: status shows it, and the last decision is still there.
    cycle.record_night_step(cfg, summary.stop(_night(cfg, "2026-12-03", 0), "nothing new"))
    status = format_status(FileStorage(root))
    assert "last night: 2026-12-03 — stopped — nothing new" in status
    assert "last decision: v02: KEEP CHAMPION" in status


@pytest.mark.parametrize(
    ("target", "page"),
    [
        ("hf://spaces/alice/cute-dogs", "https://huggingface.co/spaces/alice/cute-dogs"),
        (
            "https://bob:hf_SECRET@git.example/alice/space.git",
            "https://***@git.example/alice/space",
        ),
        ("git@github.com:alice/space.git", "https://github.com/alice/space"),
    ],
)
def test_space_link_points_at_the_spaces_page(target, page):
    from tasks.report import space_page

    assert space_page(target) == page


def test_space_link_of_a_local_space_is_absolute(tmp_path, monkeypatch):
    from tasks.report import space_page

    monkeypatch.chdir(tmp_path)
    assert space_page(".freshnet/space") == (tmp_path / ".freshnet/space").resolve().as_uri()
    assert Path(space_page(".freshnet/space").removeprefix("file://")).is_absolute()
