"""The feedback loop's intake: corrections written by the app join the next night's candidates."""

from __future__ import annotations

import json
import shutil

import pytest

from freshnet import ingest, sources
from freshnet.config import parse_config
from freshnet.storage import FileStorage


def _write_feedback(root, label, photo, fid="20261127T000000-abcd1234"):
    (root / label).mkdir(parents=True, exist_ok=True)
    shutil.copy(photo, root / label / f"{fid}.jpg")
    (root / label / f"{fid}.json").write_text(
        json.dumps({"id": fid, "label": label, "predicted": "roses", "model_version": "v1"})
    )


def _cfg(tmp_path, **source):
    return parse_config(
        {
            "classes": ["daisy", "roses"],
            "storage": f"file://{tmp_path / 'store'}",
            "source": source,
            "space": {"feedback_dir": str(tmp_path / "feedback")},
        }
    )


def test_feedback_joins_main_source_and_is_ingested(tmp_path, flower_photos):
    folder = tmp_path / "seed"
    for label in ("daisy", "roses"):
        (folder / label).mkdir(parents=True)
        shutil.copy(flower_photos[label][0], folder / label / "a.jpg")
    _write_feedback(tmp_path / "feedback", "daisy", flower_photos["daisy"][5])
    # A record without its image (still being written) and one for an unknown class.
    (tmp_path / "feedback" / "daisy" / "x.json").write_text('{"label": "daisy"}')
    _write_feedback(tmp_path / "feedback", "tulips", flower_photos["tulips"][0], "t1")

    cfg = _cfg(tmp_path, kind="folder", path=str(folder))
    report = sources.search(cfg, "1")
    fb = [c for c in report.candidates if c.source == "feedback"]
    assert [(c.label, c.query) for c in fb] == [("daisy", "feedback")]
    assert any("not a configured class" in f["reason"] for f in report.failures)
    outcomes = ingest.ingest(
        report.candidates, cfg, FileStorage(tmp_path / "store"), progress=False
    )
    assert sorted(o.status for o in outcomes) == ["accepted"] * 3


def test_feedback_as_main_source_requires_the_folder(tmp_path):
    cfg = _cfg(tmp_path, kind="feedback", path=str(tmp_path / "missing"))
    with pytest.raises(sources.SourceError, match="feedback folder does not exist"):
        sources.search(cfg, "1")
