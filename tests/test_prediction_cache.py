"""Predictions cached per (model version, image sha256): a night scores only unseen holdout
images, and the decision is the one a full evaluation gives.

The models are real exported fastai learners (tiny and untrained: a linear layer on the mean
colour, so flower photos get varied predictions in milliseconds), the storage is a real
FileStorage holding real photos and snapshot manifests, and the steps are freshnet.cycle's and freshnet.contest's.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from freshnet import contest, cycle
from freshnet.config import parse_config
from freshnet.model import evaluate, predictions
from freshnet.storage_file import FileStorage

CLASSES = ["daisy", "dandelion", "roses"]


def _export_tiny(path: Path, photos: list[Path], seed: int) -> None:
    import torch
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from torch import nn

    from freshnet.config_sections import TrainConfig
    from freshnet.model.loaders import LABEL_COL, PATH_COL, VALID_COL, build_dls
    from freshnet.model.train import export_learner

    df = pd.DataFrame(
        {
            PATH_COL: [str(p) for p in photos],
            LABEL_COL: [p.parent.name for p in photos],
            VALID_COL: [i % 4 == 0 for i in range(len(photos))],
        }
    )
    cfg = TrainConfig(image_size=32, batch_size=8, device="cpu", augment=False)
    dls = build_dls(df, cfg, torch.device("cpu"), CLASSES)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, len(CLASSES)))
    export_learner(Learner(dls, model, loss_func=CrossEntropyLossFlat()), path, "tiny")


@pytest.fixture(scope="module")
def world(tmp_path_factory, flower_photos):
    """Storage with 36 real photos, two tiny models and two nights' snapshots.

    Night 1's holdout: rows 0..23. Night 2's: rows 8..35, i.e. 8 rows removed, 16 kept, 12 new.
    """
    root = tmp_path_factory.mktemp("predcache")
    photos = [p for c in CLASSES for p in flower_photos[c][:12]]
    store = FileStorage(root / "store")
    rows = []
    for p in photos:
        data = p.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        store.put(f"images/{sha[:2]}/{sha}.jpg", data)
        rows.append({"sha256": sha, "label": p.parent.name, "split": "holdout"})
    # Interleave the classes so each night's holdout has all three.
    rows = [rows[i] for i in np.argsort([i % 12 for i in range(len(rows))], kind="stable")]
    snaps = {}
    for name, part in {"snap1": rows[:24], "snap2": rows[8:]}.items():
        manifest = pd.DataFrame(part + [{"sha256": "f" * 64, "label": "daisy", "split": "train"}])
        buf = io.BytesIO()
        manifest.to_parquet(buf)
        store.put(f"snapshots/{name}.parquet", buf.getvalue())
        snaps[name] = [r["sha256"] for r in part]
    for version, seed in (("v1", 1), ("v2", 2)):
        _export_tiny(root / f"{version}.pkl", photos, seed)
        store.put(f"models/{version}/model.pkl", (root / f"{version}.pkl").read_bytes())
    return {"root": root, "store": store, "rows": rows, "snaps": snaps}


@pytest.fixture
def night(world, tmp_path, monkeypatch):
    """A config on a fresh copy of the world's storage, and a record of every predict call."""
    import shutil

    shutil.copytree(world["root"] / "store", tmp_path / "store")
    monkeypatch.setenv("FRESHNET_CACHE", str(tmp_path / "cache"))
    cfg = parse_config({"classes": CLASSES, "storage": f"file://{tmp_path / 'store'}"})
    calls: list[list[str]] = []
    real = evaluate.predict_files

    def counting(model_path, paths):
        calls.append([Path(p).stem for p in paths])
        return real(model_path, paths)

    monkeypatch.setattr(evaluate, "predict_files", counting)
    return {"cfg": cfg, "store": FileStorage(tmp_path / "store"), "calls": calls, "real": real}


def _full(world, version: str, snapshot: str) -> evaluate.Evaluation:
    """A full evaluation: every holdout row predicted in one call, no cache involved."""
    holdout = pd.DataFrame([r for r in world["rows"] if r["sha256"] in world["snaps"][snapshot]])
    images = world["root"] / "store" / "images"
    flat = world["root"] / "flat"
    flat.mkdir(exist_ok=True)
    for sha in holdout["sha256"]:
        if not (flat / f"{sha}.jpg").exists():
            (flat / f"{sha}.jpg").write_bytes((images / sha[:2] / f"{sha}.jpg").read_bytes())
    return evaluate.evaluate_model(world["root"] / f"{version}.pkl", version, holdout, flat)


DECISION_FIELDS = ["shas", "truth", "predicted", "accuracy", "per_class", "confusion", "vocab"]


def test_cached_predictions_give_the_same_decision_as_a_full_evaluation(world, night, caplog):
    cfg, calls = night["cfg"], night["calls"]
    snap1, snap2 = world["snaps"]["snap1"], world["snaps"]["snap2"]
    contest.evaluate_step(cfg, "models/v1/model.pkl", "v1", "snap1")
    assert [sorted(c) for c in calls] == [sorted(snap1)]
    calls.clear()

    with caplog.at_level(logging.INFO, logger="freshnet"):
        champ = contest.evaluate_step(cfg, "models/v1/model.pkl", "v1", "snap2")
    # Only the 12 images night 1 did not score were predicted; the 8 removed ones are not asked.
    new = sorted(set(snap2) - set(snap1))
    assert len(new) == 12 and [sorted(c) for c in calls] == [new]
    assert (champ["cached_predictions"], champ["new_predictions"]) == (16, 12)
    assert "16 image(s) served from the cache, 12 predicted" in caplog.text

    # The challenger is a new version: nothing of v1's cache is reused for it.
    calls.clear()
    chal = contest.evaluate_step(cfg, "models/v2/model.pkl", "v2", "snap2")
    assert [sorted(c) for c in calls] == [sorted(snap2)]
    assert chal["cached_predictions"] == 0

    full_champ, full_chal = _full(world, "v1", "snap2"), _full(world, "v2", "snap2")
    # Same rows in the same order for both models, and every number equal to the full run.
    assert champ["shas"] == chal["shas"] == full_champ.shas == sorted(snap2)
    for f in DECISION_FIELDS:
        assert champ[f] == getattr(full_champ, f), f
        assert chal[f] == getattr(full_chal, f), f
    np.testing.assert_allclose(champ["confidence"], full_champ.confidence, rtol=0, atol=1e-6)
    # The two models disagree on some rows, so the paired statistics below are not trivial.
    assert champ["predicted"] != chal["predicted"]
    assert len(set(champ["predicted"])) > 1

    cached_out = contest.decide_step(cfg, chal, champ)
    full_out = contest.decide_step(cfg, full_chal.to_dict(), full_champ.to_dict())
    assert cached_out["comparison"] == full_out["comparison"]
    assert cached_out["comparison"]["b"] + cached_out["comparison"]["c"] > 0
    assert cached_out["decision"] == full_out["decision"]
    assert cached_out["confusion_table"] == full_out["confusion_table"]


def test_a_corrupt_cache_entry_is_ignored_and_recomputed(world, night, caplog):
    cfg, store, calls = night["cfg"], night["store"], night["calls"]
    snap2 = world["snaps"]["snap2"]
    contest.evaluate_step(cfg, "models/v1/model.pkl", "v1", "snap1")
    (shard,) = store.list("predictions/v1/")
    # Damage one probability byte in place: still a readable npz, wrong numbers.
    path = Path(cfg.storage.removeprefix("file://")) / shard
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    # And a shard whose name matches its bytes but which is no npz at all.
    junk = b"not a shard"
    store.put(f"predictions/v1/{hashlib.sha256(junk).hexdigest()[:32]}.npz", junk)
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="freshnet"):
        ev = contest.evaluate_step(cfg, "models/v1/model.pkl", "v1", "snap2")
    assert [sorted(c) for c in calls] == [sorted(snap2)]  # nothing served from the bad cache
    assert ev["cached_predictions"] == 0
    assert caplog.text.count("is corrupt") == 2
    full = _full(world, "v1", "snap2")
    for f in DECISION_FIELDS:
        assert ev[f] == getattr(full, f), f
    # The bad shards are gone and the rebuilt one serves the next evaluation.
    assert shard not in store.list("predictions/v1/") and len(store.list("predictions/v1/")) == 1
    calls.clear()
    scored = predictions.score(store, "v1", snap2, lambda shas: pytest.fail(f"predicted {shas}"))
    assert scored.cached == len(snap2)


def test_cache_is_per_version_and_shared_with_the_label_check(world, night):
    cfg, store, calls = night["cfg"], night["store"], night["calls"]
    rows = pd.DataFrame(world["rows"])
    snap1, snap2 = world["snaps"]["snap1"], world["snaps"]["snap2"]
    new = rows["sha256"].isin(set(snap2) - set(snap1)).to_numpy()
    champion = {"version": "v1", "model_key": "models/v1/model.pkl"}
    # The label check scores tonight's new images with the champion...
    probs = cycle._champion_probs(cfg, store, champion, rows, new)
    assert np.isfinite(probs[new]).all() and np.isnan(probs[~new]).all()
    assert [sorted(c) for c in calls] == [sorted(rows["sha256"][new])]
    calls.clear()
    # ...so the champion's evaluation of tonight's holdout predicts only the rest.
    ev = contest.evaluate_step(cfg, "models/v1/model.pkl", "v1", "snap2")
    assert [sorted(c) for c in calls] == [sorted(set(snap2) & set(snap1))]
    assert ev["cached_predictions"] == 12
    # Another version reads only its own folder: v1's entries never answer for v2.
    scored_v2 = predictions.score(
        store, "v2", snap2, cycle.predictor(cfg, store, "models/v2/model.pkl", "v2")
    )
    assert scored_v2.cached == 0 and scored_v2.predicted == len(snap2)
    v1 = predictions.load(store, "v1")
    assert not np.array_equal(
        scored_v2.probs, v1.probs[[v1.index[s] for s in snap2]]
    )  # reusing v1's rows would have been wrong


def test_shards_are_merged_and_rows_stay_exact(world, night, monkeypatch):
    cfg, store = night["cfg"], night["store"]
    monkeypatch.setattr(predictions, "MAX_SHARDS", 2)
    rows = world["rows"]
    shas = [r["sha256"] for r in rows]
    predict = cycle.predictor(cfg, store, "models/v1/model.pkl", "v1")
    for start in range(0, 36, 9):  # four nights, nine new images each
        predictions.score(store, "v1", shas[: start + 9], predict)
        assert len(store.list("predictions/v1/")) <= 2
    scored = predictions.score(store, "v1", shas[::-1], lambda s: pytest.fail(f"predicted {s}"))
    full = night["real"](
        world["root"] / "v1.pkl",
        [world["root"] / "store" / "images" / s[:2] / f"{s}.jpg" for s in shas[::-1]],
    )
    assert scored.vocab == CLASSES and scored.cached == 36
    assert (scored.probs.argmax(axis=1) == full[1].argmax(axis=1)).all()
    np.testing.assert_allclose(scored.probs, full[1], rtol=0, atol=1e-6)


def test_the_night_summary_says_how_many_champion_predictions_came_from_the_cache():
    from freshnet import summary

    cfg = parse_config({"classes": CLASSES})
    snap = {"id": "s", "counts": {}}
    report = summary.start(cfg, "7", {}, {"counts": {}}, {}, snap)
    decided = {"decision": {"summary": "keep", "rules": []}}
    defending = {
        "accuracy": 0.8,
        "shas": ["a"] * 28,
        "cached_predictions": 16,
        "new_predictions": 12,
    }
    s = summary.finish(
        report, "v2", {}, {"accuracy": 0.7}, defending, {"version": "v1"}, decided, None
    )
    assert (s["champion"]["cached_predictions"], s["champion"]["new_predictions"]) == (16, 12)
    line = next(x for x in summary.format_summary(s).splitlines() if x.startswith("champion"))
    assert line.endswith("holdout accuracy 0.800 (16 predictions from the cache, 12 new)")
