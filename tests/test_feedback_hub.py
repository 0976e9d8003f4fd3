"""Feedback kept the Hub way (issue 16, part 3): the app commits corrections to a dataset repo with
huggingface_hub's CommitScheduler (one uuid folder per replica); the nightly reads, through
huggingface_hub, only the files it has not seen, into the review queue. Against the HF stand-in,
driven by the real huggingface_hub client."""

from __future__ import annotations

import importlib.util
import io
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image

from freshnet.config import ConfigError, parse_config
from freshnet.config_sections import SpaceConfig
from freshnet.data import feedback, ingest
from freshnet.data.curate import curate
from freshnet.data.feedback_hub import HubFeedbackError
from freshnet.data.feedback_review import pending
from freshnet.data.search import search_all
from freshnet.space.bundle import build_bundle
from freshnet.storage_file import FileStorage
from tests.app_helpers import ServedApp, bundle_meta
from tests.hf_standin import HubStandIn

REPO = Path(__file__).resolve().parents[1]
DATASET = "alice/flower-feedback"
WRITE, READ, OTHER = "hf_write_feedback", "hf_read_feedback", "hf_other_repo"


def _app():
    """app/app.py as the Space runs it (it imports nothing from freshnet)."""
    spec = importlib.util.spec_from_file_location("freshnet_space_app_hub", REPO / "app" / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def hub(monkeypatch):
    with HubStandIn(page_size=3) as hub:  # small pages: the listing must follow the Link header
        hub.create_dataset(DATASET, private=True)
        hub.grant(WRITE, f"datasets/{DATASET}", write=True)
        hub.grant(READ, f"datasets/{DATASET}", write=False)
        hub.create_dataset("alice/other", private=True)
        hub.grant(OTHER, "datasets/alice/other", write=True)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("FRESHNET_FEEDBACK_TOKEN", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield hub


@pytest.fixture(scope="module")
def app():
    return _app()


@pytest.fixture
def photo_bytes(flower_photos) -> bytes:
    return Path(flower_photos["daisy"][7]).read_bytes()


def _cfg(tmp_path, **fb):
    return parse_config(
        {
            "classes": ["daisy", "roses"],
            "storage": f"file://{tmp_path / 'store'}",
            # The Hub is the only feedback: no folder exists.
            "source": {"kind": "feedback", "path": str(tmp_path / "no-folder")},
            "dedupe": {"copies": False},
            "space": {"feedback_repo": f"hf://datasets/{DATASET}"},
            "feedback": fb,
        }
    )


def _sink(app, token=WRITE):
    # every_min long: commits happen when the test flushes (the scheduler's trigger()).
    return app.HubFeedbackSink(DATASET, token, classes=["daisy", "roses"], every_min=60)


def _upload(tmp_path, photo: Path, name: str) -> str:
    """A full-size upload (the app normalises it to max side 400)."""
    with Image.open(photo) as im:
        im.convert("RGB").resize((1200, 900)).save(tmp_path / name, quality=95)
    return str(tmp_path / name)


def _hub_files(hub) -> dict[str, bytes]:
    return {k: v for k, v in hub.datasets[DATASET].files.items() if k.startswith("feedback/")}


def _night(cfg, night: str, token: str = READ) -> tuple[list, list]:
    """One night's feedback intake: search, ingest, curate (the review queue)."""
    report = search_all(cfg, night, feedback_token=token)
    store = FileStorage(cfg.storage.removeprefix("file://"))
    outcomes = ingest.ingest(report.candidates, cfg, store, progress=False)
    curate(store, outcomes, night, cfg)
    return report.candidates, outcomes


def _clock(app, monkeypatch, when: datetime) -> None:
    """The app's clock (its record ids carry the time)."""

    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            return when

    monkeypatch.setattr(app, "datetime", Clock)


def test_corrections_from_two_replicas_reach_the_review_queue_once(
    hub, app, tmp_path, flower_photos, monkeypatch
) -> None:
    a, b = _sink(app), _sink(app)
    assert a.replica != b.replica
    # b's correction is older than a's but committed after the first night read the repo: a
    # cursor on record ids or times would skip it; the commit cursor does not.
    _clock(app, monkeypatch, datetime(2026, 11, 27, 1, 0, 0, tzinfo=UTC))
    late = b.write(_upload(tmp_path, flower_photos["roses"][3], "r.jpg"), "roses", {}, "v1")
    _clock(app, monkeypatch, datetime(2026, 11, 28, 1, 0, 0, tzinfo=UTC))  # a day and more later
    first = a.write(
        _upload(tmp_path, flower_photos["daisy"][3], "d.jpg"), "daisy", {"roses": 0.8}, "v1"
    )
    assert late < first
    a.flush()
    files = _hub_files(hub)
    assert set(files) == {
        f"feedback/{a.replica}/daisy/{first}.json",
        f"feedback/{a.replica}/daisy/{first}.jpg",
    }
    record = json.loads(files[f"feedback/{a.replica}/daisy/{first}.json"])
    assert record["label"] == "daisy" and record["probabilities"] == {"roses": 0.8}
    with Image.open(io.BytesIO(files[f"feedback/{a.replica}/daisy/{first}.jpg"])) as im:
        assert im.format == "JPEG" and max(im.size) == 400  # normalised and capped by the app

    cfg = _cfg(tmp_path)
    store = FileStorage(tmp_path / "store")
    found, outcomes = _night(cfg, "1")
    assert [c.query for c in found] == [f"feedback:{first}"]
    assert [o.status for o in outcomes] == ["accepted"]
    # A retried night rereads its own records; the queue still holds each image once.
    again, _ = _night(cfg, "1")
    assert [c.query for c in again] == [f"feedback:{first}"]
    assert len(pending(store)) == 1

    b.flush()  # the late replica commits
    second = a.write(_upload(tmp_path, flower_photos["daisy"][4], "d2.jpg"), "daisy", {}, "v1")
    a.flush()
    found, _ = _night(cfg, "2")
    assert sorted(c.query for c in found) == sorted([f"feedback:{late}", f"feedback:{second}"])
    nothing, _ = _night(cfg, "3")
    assert nothing == []
    queue = pending(store)
    assert sorted(queue["query"]) == sorted(f"feedback:{i}" for i in (first, late, second))
    assert sorted(queue["label"]) == ["daisy", "daisy", "roses"]
    # Every commit was the app's own, into its own replica folder; nothing was ever overwritten.
    paths = [p for c in hub.datasets[DATASET].commits for p in c["files"]]
    assert {p.split("/")[1] for p in paths if p.startswith("feedback/")} == {a.replica, b.replica}
    a.stop()
    b.stop()


def test_a_night_takes_at_most_max_per_night_and_leaves_the_rest(
    hub, app, tmp_path, flower_photos
) -> None:
    sink = _sink(app)
    ids = [
        sink.write(_upload(tmp_path, p, f"{i}.jpg"), "daisy", {}, "v1")
        for i, p in enumerate(flower_photos["daisy"][:3])
    ]
    sink.flush()
    cfg = _cfg(tmp_path, max_per_night=2)
    first = search_all(cfg, "1", feedback_token=READ)
    assert [c.query for c in first.candidates] == [f"feedback:{i}" for i in sorted(ids)[:2]]
    assert any("wait for a later night" in f["reason"] for f in first.failures)
    retried = search_all(cfg, "1", feedback_token=READ)
    assert [c.query for c in retried.candidates] == [c.query for c in first.candidates]
    second = search_all(cfg, "2", feedback_token=READ)
    assert [c.query for c in second.candidates] == [f"feedback:{sorted(ids)[2]}"]
    assert search_all(cfg, "3", feedback_token=READ).candidates == []
    sink.stop()


def test_missing_or_wrong_token_names_the_repo_and_the_key(hub, app, tmp_path) -> None:
    with pytest.raises(app.FeedbackRepoError, match=f"datasets/{DATASET}.*FRESHNET_FEEDBACK_TOKEN"):
        _sink(app, token=None)
    for token in ("hf_wrong", OTHER):  # unknown; valid for another dataset only
        with pytest.raises(
            app.FeedbackRepoError, match=f"datasets/{DATASET}: HTTP 40.*FRESHNET_FEEDBACK_TOKEN"
        ):
            _sink(app, token=token)
    cfg = _cfg(tmp_path)
    for token in (None, "hf_wrong", OTHER):
        with pytest.raises(HubFeedbackError) as err:
            search_all(cfg, "1", feedback_token=token)
        msg = str(err.value)
        assert f"hf://datasets/{DATASET} (space.feedback_repo)" in msg
        assert "FRESHNET_FEEDBACK_TOKEN" in msg and "space.feedback_token_secret" in msg
        assert "hf_wrong" not in msg
    # Not the main source: the night goes on, with the reason as one failure line.
    cfg.source.kind = "demo"
    report = feedback.search(cfg, "1", token="hf_wrong")
    assert report.candidates == [] and "FRESHNET_FEEDBACK_TOKEN" in report.failures[0]["reason"]
    with pytest.raises(ConfigError, match="feedback_repo"):
        parse_config({"classes": ["a", "b"], "space": {"feedback_repo": "hf://spaces/a/b"}})


def test_a_read_only_token_cannot_write(hub, app, tmp_path, flower_photos) -> None:
    sink = _sink(app, token=READ)  # it can see the dataset, so the app starts
    fid = sink.write(_upload(tmp_path, flower_photos["daisy"][0], "d.jpg"), "daisy", {}, "v1")
    with pytest.raises(app.FeedbackRepoError, match=f"datasets/{DATASET}: the token in FRESHNET"):
        sink.flush()
    assert _hub_files(hub) == {}
    assert "403" in sink.scheduler.last_error
    # Nothing is lost: the pair waits in the replica's folder for a commit that works.
    assert (sink.folder / "daisy" / f"{fid}.json").is_file()
    sink.stop()


def test_bundle_tells_the_app_its_feedback_repo(tmp_path, flower_photos) -> None:
    model = tmp_path / "model.pkl"
    model.write_bytes(b"not read here")
    cfg = SpaceConfig(feedback_repo=DATASET, feedback_every_min=2.5)
    bundle = build_bundle(model, bundle_meta("v1"), [], tmp_path / "bundle", cfg)
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["feedback_repo"] == DATASET and meta["feedback_every_min"] == 2.5
    assert "token" not in json.dumps(meta).lower()
    plain = build_bundle(model, bundle_meta("v1"), [], tmp_path / "plain", SpaceConfig())
    assert "feedback_repo" not in json.loads((plain / "metadata.json").read_text())


@pytest.mark.slow
def test_served_app_correction_lands_in_the_dataset_and_the_queue_once(
    hub, tmp_path, example_photos, space_model
) -> None:
    from gradio_client import Client, handle_file

    model = space_model
    bundle = build_bundle(
        model,
        bundle_meta("v-hub"),
        example_photos,
        tmp_path / "bundle",
        SpaceConfig(title="Flowers", feedback_repo=f"hf://datasets/{DATASET}"),
    )
    with ServedApp(
        bundle,
        tmp_path,
        HF_ENDPOINT=hub.url,
        FRESHNET_FEEDBACK_TOKEN=WRITE,  # the Space secret
        FRESHNET_FEEDBACK_EVERY_MIN="10",  # no scheduled commit during the test: the stop sends it
        FRESHNET_COMPILE="0",
        GRADIO_TEMP_DIR=str(tmp_path / "gradio"),
    ) as served:
        client = Client(served.url, verbose=False)
        predicted = {"label": "daisy", "confidences": [{"label": "daisy", "confidence": 0.6}]}
        text = client.predict(
            handle_file(str(example_photos[0])), predicted, "tulips", api_name="/feedback"
        )
        assert "tulips" in text
        time.sleep(0.5)
        assert _hub_files(hub) == {}  # waiting in the replica's folder for the next commit
    # SIGTERM (a Space stop, `freshnet serve` stopping its app): the waiting correction is
    # committed on the way out, not lost with the ephemeral disk.
    assert served.proc.returncode == 0, served.log_path.read_text()[-2000:]
    files = _hub_files(hub)
    (rec,) = [p for p in files if p.endswith(".json")]
    _, replica, label, name = rec.split("/")
    assert label == "tulips" and len(replica) == 32 and rec[:-5] + ".jpg" in files
    assert json.loads(files[rec])["model_version"] == "v-hub"
    assert any(r.headers.get("authorization") == f"Bearer {WRITE}" for r in hub.requests)

    cfg = parse_config(
        {
            "classes": ["daisy", "dandelion", "roses", "sunflowers", "tulips"],
            "storage": f"file://{tmp_path / 'store'}",
            "source": {"kind": "feedback", "path": str(tmp_path / "no-folder")},
            "space": {"feedback_repo": DATASET},
        }
    )
    _night(cfg, "1")
    _night(cfg, "2")  # the next night finds nothing new
    queue = pending(FileStorage(tmp_path / "store"))
    assert list(queue["query"]) == [f"feedback:{name[:-5]}"]
    assert list(queue["label"]) == ["tulips"]


def test_bad_records_in_the_repo_are_skipped_with_reasons_once(hub, tmp_path, photo_bytes) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    replica = "0123456789abcdef0123456789abcdef"
    good, bad = "20261127T010000-0000000a", "20261127T010001-0000000b"
    files = {
        f"feedback/{replica}/daisy/{good}.json": json.dumps({"id": good, "label": "daisy"}),
        f"feedback/{replica}/daisy/{good}.jpg": photo_bytes,
        # the label field is not its folder's class
        f"feedback/{replica}/daisy/{bad}.json": json.dumps({"id": bad, "label": "roses"}),
        f"feedback/{replica}/daisy/{bad}.jpg": photo_bytes,
        # not the app's: a replica folder that is no uuid, a file outside any label folder
        f"feedback/not-a-replica/daisy/{good}.json": b"{}",
        f"feedback/{replica}/{good}.json": b"{}",
    }
    HfApi(endpoint=hub.url, token=WRITE).create_commit(
        DATASET,
        repo_type="dataset",
        operations=[
            CommitOperationAdd(k, v.encode() if isinstance(v, str) else v) for k, v in files.items()
        ],
        commit_message="someone with the token",
    )
    cfg = _cfg(tmp_path)
    report = search_all(cfg, "1", feedback_token=READ)
    assert [c.query for c in report.candidates] == [f"feedback:{good}"]
    (skip,) = [f["reason"] for f in report.failures if bad in f["reason"]]
    assert f"hf://datasets/{DATASET}/feedback/{replica}/daisy/{bad}.json" in skip
    assert "field 'label'" in skip
    again = search_all(cfg, "2", feedback_token=READ)
    assert again.candidates == [] and not any(bad in f["reason"] for f in again.failures)
