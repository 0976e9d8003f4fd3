"""Feedback intake and review: corrections from the app are read once, bounded, normalised, and
held out of train and holdout until a reviewer accepts them (issue 13, defect 4)."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import uuid
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from freshnet import cli
from freshnet.config import ConfigError, parse_config
from freshnet.data import feedback, ingest, sources
from freshnet.data.catalog import load_catalog
from freshnet.data.curate import curate
from freshnet.data.feedback_review import pending
from freshnet.data.images import image_key
from freshnet.data.quarantine import load_decisions
from freshnet.data.search import search_all
from freshnet.data.snapshot import cap_feedback_share, load_manifest, make_snapshot
from freshnet.storage_file import FileStorage
from freshnet.storage_s3 import S3Storage

REPO = Path(__file__).resolve().parents[1]


def _app_sink():
    """The app's own FeedbackSink (app/app.py imports nothing from freshnet)."""
    spec = importlib.util.spec_from_file_location("freshnet_space_app", REPO / "app" / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.FeedbackSink


def _fid(n: int) -> str:
    return f"20261127T{n // 3600:02d}{n // 60 % 60:02d}{n % 60:02d}-{n:08x}"


def _write(root: Path, folder: str, fid: str, image: bytes | None, record) -> None:
    (root / folder).mkdir(parents=True, exist_ok=True)
    if image is not None:
        (root / folder / f"{fid}.jpg").write_bytes(image)
    data = record if isinstance(record, bytes) else json.dumps(record).encode()
    (root / folder / f"{fid}.json").write_bytes(data)


def _record(fid: str, label: str, **extra) -> dict:
    return {"id": fid, "label": label, "predicted": "roses", "model_version": "v1", **extra}


def _cfg(tmp_path, feedback_dir=None, source=None, **fb):
    return parse_config(
        {
            "classes": ["daisy", "roses"],
            "storage": f"file://{tmp_path / 'store'}",
            "source": source or {"kind": "folder", "path": str(tmp_path / "seed")},
            "dedupe": {"copies": False},
            "space": {"feedback_dir": feedback_dir or str(tmp_path / "feedback")},
            "feedback": fb,
        }
    )


def _store(tmp_path) -> FileStorage:
    return FileStorage(tmp_path / "store")


@pytest.fixture
def photo(flower_photos) -> bytes:
    return Path(flower_photos["daisy"][5]).read_bytes()


def _big_jpeg(path: Path, side: int = 2400) -> bytes:
    """A full-resolution upload: a real photo scaled up to ``side`` pixels."""
    with Image.open(path) as im:
        im = im.convert("RGB").resize((side, side * im.height // im.width))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _seed_folder(tmp_path, flower_photos, per_class: int):
    """A folder source of ``per_class`` real daisy and roses photos."""
    seed = tmp_path / "seed"
    for label in ("daisy", "roses"):
        (seed / label).mkdir(parents=True)
        for p in flower_photos[label][:per_class]:
            shutil.copy(p, seed / label / p.name)
    return seed


def test_app_records_are_read_normalised_and_wait_for_review(tmp_path, flower_photos) -> None:
    _seed_folder(tmp_path, flower_photos, 4)
    upload = tmp_path / "upload.jpg"
    upload.write_bytes(_big_jpeg(flower_photos["daisy"][20]))
    fid = _app_sink()(str(tmp_path / "feedback")).write(
        str(upload), "daisy", {"roses": 0.7, "daisy": 0.3}, "v1"
    )
    cfg = _cfg(tmp_path)
    report = search_all(cfg, "1")
    fb = [c for c in report.candidates if c.source == "feedback"]
    assert [(c.label, c.query) for c in fb] == [("daisy", f"feedback:{fid}")]

    store = _store(tmp_path)
    outcomes = ingest.ingest(report.candidates, cfg, store, progress=False)
    assert {o.status for o in outcomes} == {"accepted"}
    (out,) = [o for o in outcomes if o.source == "feedback"]
    # Normalised like every image: the 2400-px upload is stored at max_side.
    assert max(out.width, out.height) == cfg.images.max_side
    with Image.open(io.BytesIO(store.get(image_key(out.sha256)))) as im:
        assert max(im.size) == cfg.images.max_side

    curate(store, outcomes, "1", cfg)
    catalog = load_catalog(store)
    assert catalog.set_index("sha256").at[out.sha256, "status"] == "feedback"
    snap = make_snapshot(store, cfg)
    assert out.sha256 not in set(load_manifest(store, snap.id)["sha256"])
    assert snap.rows == 8
    assert list(pending(store)["sha256"]) == [out.sha256]


def test_abuse_records_are_skipped_with_reasons(tmp_path, photo) -> None:
    root = tmp_path / "feedback"
    good = _fid(1)
    _write(root, "daisy", good, photo, _record(good, "daisy", probabilities={"daisy": 0.4}))
    bad = {
        # The probe's 5.6 MB record: 20,000 fake probabilities.
        _fid(2): (
            "daisy",
            _record(_fid(2), "daisy", probabilities={f"c{i}": 0.5 for i in range(20_000)}),
        ),
        _fid(3): ("daisy", _record(_fid(3), "daisy", predicted="x" * 5000)),
        _fid(4): ("daisy", _record(_fid(4), "roses")),  # label is not its folder's class
        _fid(5): ("tulips", _record(_fid(5), "tulips")),  # not a configured class
        _fid(6): ("daisy", _record("../../../etc/passwd", "daisy")),  # traversal in the id
        _fid(7): ("daisy", b"{not json"),
        _fid(8): ("daisy", b"[1, 2]"),
        _fid(9): ("daisy", _record(_fid(9), "daisy", probabilities={"daisy": 7})),
        _fid(10): ("daisy", _record(_fid(10), "daisy", probabilities=[0.1])),
        _fid(11): (
            "daisy",
            _record(_fid(11), "daisy", probabilities={"a": 0.1, "b": 0.1, "c": 0.1}),
        ),
        _fid(12): ("daisy", _record(_fid(12), "d" * 300)),
    }
    for fid, (folder, rec) in bad.items():
        _write(root, folder, fid, photo, rec)
    _write(root, "roses", _fid(13), None, _record(_fid(13), "roses"))  # image missing
    _write(root, "roses", _fid(14), photo + b"\0", _record(_fid(14), "roses"))  # too big
    # Not records at all: never read (a name outside the app's id format, a path-like name).
    _write(root, "daisy", "..%2F..%2Fescape", photo, _record("x", "daisy"))
    (root / "daisy" / f".{_fid(15)}.json.tmp").write_text("{}")  # the app's unfinished write

    cfg = _cfg(tmp_path, source={"kind": "demo"}, max_image_bytes=len(photo))
    report = feedback.search(cfg, "1")
    assert [c.query for c in report.candidates] == [f"feedback:{good}"]
    reasons = {
        r["reason"].split(".json: ")[0].rsplit("/", 1)[1]: r["reason"] for r in report.failures
    }
    expect = {
        _fid(2): "max_record_bytes 16384",
        _fid(3): "field 'predicted' has 5000 characters",
        _fid(4): "field 'label' 'roses' is not 'daisy'",
        _fid(5): "folder 'tulips' is not a configured class",
        _fid(6): "is not the file's id",
        _fid(7): "not valid JSON",
        _fid(8): "expected a JSON object, got list",
        _fid(9): "is not in [0, 1]",
        _fid(10): "must be an object",
        _fid(11): "3 entries (at most 2",
        _fid(12): "field 'label' has 300 characters",
        _fid(13): "its image is missing",
        _fid(14): f"feedback.max_image_bytes {len(photo)}",
    }
    assert sorted(reasons) == sorted(expect)
    for fid, text in expect.items():
        assert text in reasons[fid], reasons[fid]
    assert all(r["query"] == "feedback" for r in report.failures)


def test_each_record_is_read_by_one_night_and_a_retry_rereads_its_own(tmp_path, photo) -> None:
    root = tmp_path / "feedback"
    for n in (1, 2):
        _write(root, "daisy", _fid(n), photo, _record(_fid(n), "daisy"))
    cfg = _cfg(tmp_path, source={"kind": "demo"})

    def ids(night: str) -> list[str]:
        return [c.query.removeprefix("feedback:") for c in feedback.search(cfg, night).candidates]

    assert ids("1") == [_fid(1), _fid(2)]
    assert ids("2") == []
    _write(root, "roses", _fid(3), photo, _record(_fid(3), "roses"))
    assert ids("2") == [_fid(3)]
    assert ids("2") == [_fid(3)]  # a retried night reads what it read before, nothing else
    assert ids("3") == []
    # Records are still there: nothing stored is lost.
    assert len(list(root.glob("*/*.json"))) == 3


def test_cursor_skips_old_ids_without_listing_them_again(tmp_path, photo) -> None:
    root = tmp_path / "feedback"
    old, new = "20261101T000000-00000001", "20261127T000000-00000002"
    for fid in (old, new):
        _write(root, "daisy", fid, photo, _record(fid, "daisy"))
    cfg = _cfg(tmp_path, source={"kind": "demo"})
    feedback.search(cfg, "1")
    feedback.search(cfg, "2")  # night 1's reads are now behind the cursor's floor
    raw, _ = _store(tmp_path).read_pointer(feedback.CURSOR)
    state = json.loads(raw)["sources"][str(root.resolve())]
    assert state["floor"] == "20261126T000000"
    # The kept set stays small: ids at or below the floor are dropped from it.
    assert state["seen"] == {f"daisy/{new}": "1"}
    assert feedback.search(cfg, "3").candidates == []


def test_per_night_cap_leaves_the_rest_for_later_nights(tmp_path, photo) -> None:
    root = tmp_path / "feedback"
    for n in range(1, 6):
        _write(root, "daisy", _fid(n), photo, _record(_fid(n), "daisy"))
    cfg = _cfg(tmp_path, source={"kind": "demo"}, max_per_night=2)
    got = []
    for night in ("1", "2", "3", "4"):
        report = feedback.search(cfg, night)
        got.append([c.query[-8:] for c in report.candidates])
        if night == "1":
            assert "3 feedback records wait for a later night (feedback.max_per_night 2)" in [
                f["reason"] for f in report.failures
            ]
    assert got == [[_fid(1)[-8:], _fid(2)[-8:]], [_fid(3)[-8:], _fid(4)[-8:]], [_fid(5)[-8:]], []]


def test_s3_feedback_source_is_read_once_and_ingested(
    tmp_path, s3_env, monkeypatch, photo, flower_photos
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env["FRESHNET_S3_ENDPOINT_URL"])  # the app's sink
    bucket = f"fb-{uuid.uuid4().hex[:12]}"
    S3Storage(bucket).ensure_bucket()
    sink = _app_sink()(f"s3://{bucket}/space/feedback")
    upload = tmp_path / "upload.jpg"
    upload.write_bytes(_big_jpeg(flower_photos["roses"][3]))
    fid = sink.write(str(upload), "roses", {"daisy": 0.9}, "v1")
    box = S3Storage(bucket, "space/feedback")
    huge = _fid(9)
    box.put(f"daisy/{huge}.jpg", photo)
    rec = _record(huge, "daisy", probabilities={f"c{i}": 0.5 for i in range(20_000)})
    box.put(f"daisy/{huge}.json", json.dumps(rec).encode())

    cfg = _cfg(tmp_path, feedback_dir=f"s3://{bucket}/space/feedback", source={"kind": "demo"})
    report = feedback.search(cfg, "1")
    (cand,) = report.candidates
    assert cand.url == f"s3://{bucket}/space/feedback/roses/{fid}.jpg"
    assert any(huge in f["reason"] and "max_record_bytes" in f["reason"] for f in report.failures)
    store = _store(tmp_path)
    (out,) = ingest.ingest(report.candidates, cfg, store, progress=False)
    assert (out.status, out.label) == ("accepted", "roses")
    assert max(out.width, out.height) == cfg.images.max_side
    assert store.exists(image_key(out.sha256))
    assert feedback.search(cfg, "2").candidates == []
    # An image over ingest's byte cap is refused by a ranged read, not downloaded whole.
    status, detail, data = feedback.read_stored_image(cand.url, 1024)
    assert (status, data) == ("too_large", None) and "1024" in detail


def test_unreachable_s3_feedback_is_one_failure_not_a_crash(tmp_path, s3_env) -> None:
    cfg = _cfg(tmp_path, feedback_dir="s3://no-such-bucket-fb/x", source={"kind": "demo"})
    report = feedback.search(cfg, "1")
    assert report.candidates == []
    assert len(report.failures) == 1 and "no-such-bucket-fb" in report.failures[0]["reason"]


def _manifest(rows) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"sha256": f"{i:064x}", "label": lab, "split": sp, "source": src, "first_seen": night}
            for i, (lab, sp, src, night) in enumerate(rows)
        ]
    )


def test_share_cap_per_class_and_split_keeps_the_oldest() -> None:
    rows = [("daisy", "train", "web", "1")] * 18 + [("daisy", "holdout", "web", "1")] * 4
    rows += [("daisy", "train", "feedback", str(n)) for n in (5, 3, 4)]
    rows += [("daisy", "holdout", "feedback", "1")] + [("roses", "train", "feedback", "1")]
    kept, waiting = cap_feedback_share(_manifest(rows), 0.1)
    fb = kept[kept["source"] == "feedback"]
    # 18 web train rows allow 2 (2/20 = 0.1), the oldest; 4 holdout allow 0; a class of only
    # feedback gets none.
    assert sorted(fb["first_seen"]) == ["3", "4"] and set(fb["split"]) == {"train"}
    assert waiting == 3
    assert cap_feedback_share(_manifest(rows), 1.0)[1] == 0


def test_feedback_config_errors_name_the_key(tmp_path) -> None:
    for key, value in (("max_share", 1.5), ("max_per_night", -1), ("max_record_bytes", "big")):
        with pytest.raises(ConfigError, match=rf"feedback\.{key}"):
            _cfg(tmp_path, **{key: value})


def test_accept_and_reject_move_rows_into_and_out_of_the_next_snapshot(
    tmp_path, flower_photos, capsys
) -> None:
    seed = _seed_folder(tmp_path, flower_photos, 5)
    root = tmp_path / "feedback"
    for n, (label, p) in enumerate(
        [("daisy", flower_photos["daisy"][30]), ("roses", flower_photos["roses"][30])], 1
    ):
        _write(root, label, _fid(n), Path(p).read_bytes(), _record(_fid(n), label))
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(
        f'classes = ["daisy", "roses"]\nstorage = "file://{tmp_path / "store"}"\n'
        f'[source]\nkind = "folder"\npath = "{seed}"\n[dedupe]\ncopies = false\n'
        f'[space]\nfeedback_dir = "{root}"\n[feedback]\nmax_share = 1.0\n'
    )
    cfg = parse_config(__import__("tomllib").loads(cfg_path.read_text()))
    store = _store(tmp_path)
    report = search_all(cfg, "1")
    curate(store, ingest.ingest(report.candidates, cfg, store, progress=False), "1", cfg)
    before = set(load_manifest(store, make_snapshot(store, cfg).id)["sha256"])
    q = pending(store)
    assert len(q) == 2 and not set(q["sha256"]) & before

    daisy, roses = (q.set_index("label").at[lab, "sha256"] for lab in ("daisy", "roses"))
    assert cli.main(["feedback", "list", "-c", str(cfg_path)]) == 0
    assert "2 feedback image(s) waiting for review" in capsys.readouterr().out
    assert cli.main(["feedback", "accept", daisy[:10], "-c", str(cfg_path)]) == 0
    assert cli.main(["feedback", "reject", roses[:10], "-c", str(cfg_path)]) == 0
    # Reviewed once: a second decision is refused with the reason.
    assert cli.main(["feedback", "accept", roses[:10], "-c", str(cfg_path)]) == 1
    assert "not waiting for feedback review (status dropped)" in capsys.readouterr().err

    after = load_manifest(store, make_snapshot(store, cfg).id)
    assert set(after["sha256"]) == before | {daisy}
    assert pending(store).empty
    actions = {d["sha256"]: d["action"] for d in load_decisions(store)}
    assert actions == {daisy: "feedback-accept", roses: "feedback-reject"}
    # The default share cap (0.1 of 5 web images per class and split) holds it back again.
    capped = parse_config({**cfg.dump(), "feedback": {"max_share": 0.1}})
    assert daisy not in set(load_manifest(store, make_snapshot(store, capped).id)["sha256"])


def test_unreviewed_feedback_cannot_take_web_images_out(tmp_path, flower_photos) -> None:
    """A "correction" that relabels a photo already in the dataset only waits for review."""
    seed = tmp_path / "seed"
    (seed / "daisy").mkdir(parents=True)
    (seed / "roses").mkdir(parents=True)
    shutil.copy(flower_photos["daisy"][0], seed / "daisy" / "a.jpg")
    shutil.copy(flower_photos["roses"][0], seed / "roses" / "b.jpg")
    cfg = _cfg(tmp_path)
    store = _store(tmp_path)
    report = search_all(cfg, "1")
    curate(store, ingest.ingest(report.candidates, cfg, store, progress=False), "1", cfg)
    # Night 2: the same daisy photo, recompressed, claimed to be roses.
    with Image.open(flower_photos["daisy"][0]) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=70)
    _write(tmp_path / "feedback", "roses", _fid(1), buf.getvalue(), _record(_fid(1), "roses"))
    report = feedback.search(cfg, "2")
    curate(store, ingest.ingest(report.candidates, cfg, store, progress=False), "2", cfg)
    df = load_catalog(store)
    web = df[df["source"] != "feedback"]
    assert set(web["status"]) == {"ok"}
    (fb,) = df[df["source"] == "feedback"].itertuples()
    assert (fb.status, fb.note) == ("label_conflict", "labels: daisy, roses")


def test_feedback_as_main_source_requires_the_folder(tmp_path) -> None:
    cfg = _cfg(tmp_path, source={"kind": "feedback", "path": str(tmp_path / "missing")})
    with pytest.raises(sources.SourceError, match="feedback folder does not exist"):
        search_all(cfg, "1")
