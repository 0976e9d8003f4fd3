"""Training: split, materialize, export without freshnet, architectures, warm start, label noise, snapshots.

Fast tests train tiny models (two flower classes, 64 px, one epoch); the slow tests train the
real recipe and check holdout accuracy and wall time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

import pandas as pd
import pytest

from freshnet.config import parse_config
from freshnet.config_sections import TrainConfig
from freshnet.model.evaluate import find_label_noise
from freshnet.model.loaders import materialize, valid_mask
from freshnet.model.network import PretrainedWeightsUnavailable, TrainError
from freshnet.model.train import train_model
from freshnet.storage_file import FileStorage
from tests.model_helpers import predict_in_clean_process

TINY = dict(image_size=64, batch_size=16, epochs=1, freeze_epochs=0, device="cpu", augment=False)


def flower_manifest(
    flower_photos, dest: Path, classes: list[str], per_class: int, holdout_every: int = 5
):
    """Copy real photos into ``dest`` as <sha>.jpg and describe them as a manifest."""
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for label in classes:
        for i, src in enumerate(flower_photos[label][:per_class]):
            data = src.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            (dest / f"{sha}.jpg").write_bytes(data)
            rows.append(
                {
                    "sha256": sha,
                    "label": label,
                    "split": "holdout" if i % holdout_every == 0 else "train",
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, flower_photos):
    """A tiny two-class model trained once for the module."""
    root = tmp_path_factory.mktemp("tiny")
    manifest = flower_manifest(flower_photos, root / "images", ["daisy", "sunflowers"], 15)
    train = manifest[manifest["split"] == "train"]
    # What a watcher sees while it trains: the epoch lines and the progress callback's calls.
    lines: list[str] = []
    calls: list[tuple[float, int]] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("freshnet.model.train")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        res = train_model(
            train,
            root / "images",
            TrainConfig(**TINY),
            root / "model.pkl",
            progress=lambda done, total: calls.append((done, total)),
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return {
        "root": root,
        "manifest": manifest,
        "train": train,
        "result": res,
        "lines": lines,
        "progress": calls,
    }


def test_training_logs_each_epoch_and_reports_progress_while_it_runs(tiny):
    """One line per epoch (train loss, valid loss, valid accuracy, time), as it ends."""
    epochs = [line for line in tiny["lines"] if line.startswith("epoch ")]
    assert len(epochs) == TINY["epochs"] + TINY["freeze_epochs"], tiny["lines"]
    acc = tiny["result"].valid_accuracy
    assert re.fullmatch(
        rf"epoch 1/1: train loss \d+\.\d{{4}}, valid loss \d+\.\d{{4}}, "
        rf"valid accuracy {acc:.4f}, \d+\.\d s",
        epochs[0],
    ), epochs
    # The epoch line comes before the summary line written after training.
    assert tiny["lines"].index(epochs[-1]) < next(
        i for i, line in enumerate(tiny["lines"]) if line.startswith("trained ")
    )
    assert tiny["progress"] and tiny["progress"][-1] == (1, 1), tiny["progress"]
    assert all(0 < done <= total for done, total in tiny["progress"])


def test_valid_mask_is_seeded_per_class_and_stable():
    df = pd.DataFrame(
        {"sha256": [f"{i:064x}" for i in range(40)], "label": ["a"] * 30 + ["b"] * 10}
    )
    m = valid_mask(df, 0.2, seed=1)
    assert m == valid_mask(df, 0.2, seed=1)
    assert sum(m[:30]) == 6 and sum(m[30:]) == 2  # each class contributes its share
    assert m != valid_mask(df, 0.2, seed=2)
    # Adding rows does not move existing ones between train and valid more than the quota needs.
    bigger = pd.concat(
        [df, pd.DataFrame({"sha256": ["f" * 64], "label": ["b"]})], ignore_index=True
    )
    m2 = valid_mask(bigger, 0.2, seed=1)
    assert m2[:30] == m[:30]
    # A class with a single row stays in training.
    assert valid_mask(pd.DataFrame({"sha256": ["0" * 64], "label": ["a"]}), 0.2, 0) == [False]


def test_materialize_fetches_missing_and_names_absent_images(tmp_path):
    store = FileStorage(tmp_path / "store")
    shas = []
    for i in range(3):
        data = f"img{i}".encode()
        sha = hashlib.sha256(data).hexdigest()
        store.put(f"images/{sha[:2]}/{sha}.jpg", data)
        shas.append(sha)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{shas[0]}.jpg").write_bytes(b"already here")
    out = materialize(store, pd.DataFrame({"sha256": shas, "label": "x"}), cache)
    assert (out / f"{shas[0]}.jpg").read_bytes() == b"already here"  # skipped, not refetched
    assert (out / f"{shas[1]}.jpg").read_bytes() == b"img1"
    missing = "ab" * 32
    with pytest.raises(TrainError, match=f"{missing}.*images/ab/{missing}.jpg"):
        materialize(store, pd.DataFrame({"sha256": [missing], "label": "x"}), cache)


def test_train_rejects_bad_input(tmp_path):
    df = pd.DataFrame(
        {"sha256": ["a" * 64, "b" * 64], "label": ["x", "y"], "split": ["train", "holdout"]}
    )
    with pytest.raises(TrainError, match="holdout is never trained on"):
        train_model(df, tmp_path, TrainConfig(**TINY), tmp_path / "m.pkl")
    with pytest.raises(TrainError, match="at least 2 classes"):
        train_model(df.iloc[:1], tmp_path, TrainConfig(**TINY), tmp_path / "m.pkl")
    with pytest.raises(TrainError, match="missing under"):
        train_model(df.assign(split="train"), tmp_path, TrainConfig(**TINY), tmp_path / "m.pkl")


def test_tiny_training_result(tiny):
    res = tiny["result"]
    assert res.model_path.exists() and res.arch == "efficientnet_lite0"
    assert res.vocab == ["daisy", "sunflowers"]
    assert (
        res.train_size + res.valid_size == len(tiny["train"]) and res.valid_size == 4
    )  # ceil(12 * 0.1) per class
    assert res.device == "cpu" and res.precision == "fp32" and res.init == "imagenet"
    assert 0.0 <= res.valid_accuracy <= 1.0 and res.history


def _weights_digest(model_path: Path) -> str:
    from fastai.learner import load_learner

    model = load_learner(model_path).model
    return hashlib.sha256(
        b"".join(t.detach().cpu().numpy().tobytes() for t in model.state_dict().values())
    ).hexdigest()


def test_same_snapshot_and_seed_train_the_same_weights_while_other_threads_draw_random(
    tiny, tmp_path
):
    """Other threads (Prefect's events client) use the process-wide `random` during training.

    fastai's augmentations draw from it, so without freshnet's private generator the two models
    differ. Augmentation on, so the augmentation stream is exercised.
    """
    import random
    import threading

    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            random.random()
            time.sleep(0.0005)

    drawer = threading.Thread(target=draw, daemon=True)
    drawer.start()
    try:
        cfg = TrainConfig(**{**TINY, "augment": True, "freeze_epochs": 1})
        digests = [
            _weights_digest(
                train_model(
                    tiny["train"], tiny["root"] / "images", cfg, tmp_path / f"{i}.pkl"
                ).model_path
            )
            for i in range(2)
        ]
    finally:
        stop.set()
        drawer.join()
    assert digests[0] == digests[1]
    other_seed = cfg.model_copy(update={"seed": 7})
    res = train_model(tiny["train"], tiny["root"] / "images", other_seed, tmp_path / "s7.pkl")
    assert _weights_digest(res.model_path) != digests[0], "the seed must matter"


@pytest.mark.slow  # ~8 s: a clean Python process loads torch and fastai
def test_exported_model_loads_and_predicts_without_freshnet(tiny, tmp_path):
    from freshnet.model.evaluate import predict_files

    holdout = tiny["manifest"][tiny["manifest"]["split"] == "holdout"]
    paths = [tiny["root"] / "images" / f"{s}.jpg" for s in holdout["sha256"]]
    out = predict_in_clean_process(tiny["result"].model_path, paths, tmp_path / "space")
    assert out["vocab"] == ["daisy", "sunflowers"]
    # The Space's predictions agree with in-process evaluation.
    predicted, probs, vocab = predict_files(tiny["result"].model_path, paths)
    assert [p[0] for p in out["pred"]] == predicted
    assert probs.shape == (len(paths), 2) and vocab == ["daisy", "sunflowers"]


def test_evaluate_model_aligns_by_sha(tiny):
    from freshnet.model.evaluate import evaluate_model

    holdout = tiny["manifest"][tiny["manifest"]["split"] == "holdout"]
    shuffled = holdout.sample(frac=1.0, random_state=3)
    ev = evaluate_model(tiny["result"].model_path, "v1", shuffled, tiny["root"] / "images")
    assert ev.shas == sorted(holdout["sha256"])
    assert sum(map(sum, ev.confusion)) == len(holdout) == ev.n
    assert ev.vocab == ["daisy", "sunflowers"] and len(ev.confidence) == ev.n
    truth = dict(zip(holdout["sha256"], holdout["label"], strict=True))
    assert ev.truth == [truth[s] for s in ev.shas]
    with pytest.raises(ValueError, match="non-holdout"):
        evaluate_model(tiny["result"].model_path, "v1", tiny["train"], tiny["root"] / "images")


def test_find_label_noise_flags_confident_disagreements(tiny):
    from freshnet.model.evaluate import predict_files

    train = tiny["train"].reset_index(drop=True)
    images = tiny["root"] / "images"
    predicted, probs, vocab = predict_files(
        tiny["result"].model_path, [images / f"{s}.jpg" for s in train["sha256"]]
    )
    conf = 0.51
    # Relabel three images against the model's own opinion: they must be flagged, nothing else.
    order = sorted(range(len(train)), key=lambda i: -probs[i].max())[:3]
    relabeled = train.copy()
    other = {"daisy": "sunflowers", "sunflowers": "daisy"}
    expected = set()
    for i in range(len(train)):
        if i in order:
            relabeled.loc[i, "label"] = other[predicted[i]]
        else:
            relabeled.loc[i, "label"] = predicted[i]
        if i in order and probs[i].max() >= conf:
            expected.add(train.loc[i, "sha256"])
    noisy = find_label_noise(tiny["result"].model_path, relabeled, images, conf)
    assert {n["sha256"] for n in noisy} == expected and expected
    for n in noisy:
        assert n["predicted"] != n["label"] and n["p"] >= conf and n["reason"] == "confident"
    assert [n["p"] for n in noisy] == sorted((n["p"] for n in noisy), reverse=True)
    # The top-loss tail adds the least-likely labels even below the confidence threshold.
    tail = find_label_noise(
        tiny["result"].model_path, relabeled, images, 0.999, top_loss_fraction=0.1
    )
    assert tail and all(n["predicted"] != n["label"] for n in tail)


def test_resnet_without_cached_weights_names_the_offline_choice(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("FRESHNET_ALLOW_WEIGHT_DOWNLOAD", raising=False)
    cfg = TrainConfig(**{**TINY, "arch": "resnet18"})
    with pytest.raises(PretrainedWeightsUnavailable, match="efficientnet_lite0") as err:
        train_model(tiny["train"], tiny["root"] / "images", cfg, tmp_path / "m.pkl")
    assert str(tmp_path / "torch_home") in str(err.value)
    assert not (tmp_path / "m.pkl").exists()


def test_resnet_from_scratch_trains_offline(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cfg = TrainConfig(**{**TINY, "arch": "resnet18", "init": "scratch"})
    res = train_model(tiny["train"], tiny["root"] / "images", cfg, tmp_path / "m.pkl")
    assert res.init == "scratch" and res.arch == "resnet18" and (tmp_path / "m.pkl").exists()


def test_champion_warm_start_and_fallback(tiny, tmp_path, flower_photos, caplog):
    images = tiny["root"] / "images"
    cfg = TrainConfig(**{**TINY, "init": "champion"})
    warm = train_model(
        tiny["train"], images, cfg, tmp_path / "warm.pkl", init_from=tiny["result"].model_path
    )
    assert warm.init == "champion" and warm.init_note == "warm start from champion"
    # Other classes: the champion's head does not fit, so it falls back to ImageNet and says why.
    other = flower_manifest(flower_photos, images, ["daisy", "roses"], 8)
    other = other[other["split"] == "train"]
    cold = train_model(
        other, images, cfg, tmp_path / "cold.pkl", init_from=tiny["result"].model_path
    )
    assert cold.init == "imagenet"
    assert "differ" in cold.init_note and "roses" in cold.init_note
    assert "init=champion not used" in caplog.text
    # No champion at all (first night): same fallback.
    first = train_model(other, images, cfg, tmp_path / "first.pkl", init_from=None)
    assert first.init == "imagenet" and "no champion" in first.init_note


def test_train_snapshot_uploads_model_and_returns_small_dict(tiny, tmp_path):
    from freshnet.data.snapshot import load_manifest

    store = FileStorage(tmp_path / "store")
    manifest = tiny["manifest"]
    for sha in manifest["sha256"]:
        store.put(
            f"images/{sha[:2]}/{sha}.jpg", (tiny["root"] / "images" / f"{sha}.jpg").read_bytes()
        )
    snapshot_id = "test-snapshot"
    buf = tmp_path / "m.parquet"
    manifest.to_parquet(buf)
    store.put(f"snapshots/{snapshot_id}.parquet", buf.read_bytes())
    assert len(load_manifest(store, snapshot_id)) == len(manifest)
    cfg = parse_config(
        {"classes": ["daisy", "sunflowers"], "train": {**TINY, "noise_confidence": 0.51}}
    )
    out = train_snapshot_call(store, snapshot_id, cfg, tmp_path)
    assert out["model_key"] == "models/v1/model.pkl"
    assert hashlib.sha256(store.get("models/v1/model.pkl")).hexdigest() == out["model_sha256"]
    info = json.loads(store.get("models/v1/train.json"))
    assert info["model_sha256"] == out["model_sha256"] and info["snapshot"] == snapshot_id
    assert out["metrics"]["train_size"] + out["metrics"]["valid_size"] == int(
        (manifest["split"] == "train").sum()
    )
    assert isinstance(out["noisy"], list)
    json.dumps(out)  # small and JSON-able: it crosses machines


def train_snapshot_call(store, snapshot_id, cfg, tmp_path):
    from freshnet.model.snapshot_train import train_snapshot

    return train_snapshot(store, snapshot_id, cfg, "v1", tmp_path / "work")


# ---- slow: the real recipe -------------------------------------------------------------------


# The default recipe on all real flower photos (>= 0.85) is checked end to end by
# tests/test_cycle.py::test_flowers_two_nights_reach_085; not trained twice here.


@pytest.mark.slow
def test_demo_classes_reach_090_within_5_minutes(tmp_path):
    """Issue 5 acceptance: on CPU, the demo classes reach >= 0.90 holdout accuracy in <= 5 min."""
    from freshnet.data import demo, ingest, search
    from freshnet.model.evaluate import evaluate_model

    cfg = parse_config(
        {
            "classes": ["circle", "square", "triangle", "star", "ring"],
            "queries": ["photo {label}", "{label} drawing"],
            "source": {"kind": "demo", "demo_per_query": 40},
            "download": {"allow_private": ["127.0.0.1/32"]},
            "train": {"device": "cpu"},
        }
    )
    store = FileStorage(tmp_path / "store")
    try:
        report = search.search(cfg, "1")
        outcomes = ingest.ingest(report.candidates, cfg, store, progress=False)
    finally:
        demo.stop_server()
    manifest = _demo_manifest(outcomes)
    images = materialize(store, manifest, tmp_path / "images")
    train = manifest[manifest["split"] == "train"]
    holdout = manifest[manifest["split"] == "holdout"]
    t0, c0 = time.perf_counter(), time.process_time()
    res = train_model(train, images, cfg.train, tmp_path / "model.pkl")
    ev = evaluate_model(res.model_path, "demo", holdout, images)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    load = os.getloadavg()[0]
    print(f"demo: {res.train_size} train, {ev.n} holdout, accuracy {ev.accuracy:.3f}, "
          f"{seconds:.0f}s wall, {cpu:.0f}s cpu, load {load:.1f}")  # fmt: skip
    assert ev.accuracy >= 0.90
    cores = len(os.sched_getaffinity(0))
    if load > 2 * cores:
        # A machine shared with other jobs: wall time then measures the neighbours. The CPU work
        # done must still fit what `cores` cores deliver in 5 minutes.
        assert cpu <= 300 * cores, f"{cpu:.0f}s of CPU for training and evaluation"
    else:
        assert seconds <= 300, f"{seconds:.0f}s wall for training and evaluation"


def _demo_manifest(outcomes) -> pd.DataFrame:
    """Accepted images, near-duplicate copies dropped (so none straddles the split), 20% holdout."""
    kept: list[dict] = []
    for o in sorted((o for o in outcomes if o.status == "accepted"), key=lambda o: o.sha256):
        bits = int(o.phash, 16)
        if any(bin(bits ^ k["bits"]).count("1") <= 8 for k in kept):
            continue
        h = int(hashlib.sha256(f"split:{o.sha256}".encode()).hexdigest()[:8], 16)
        kept.append(
            {
                "sha256": o.sha256,
                "label": o.label,
                "split": "holdout" if h % 5 == 0 else "train",
                "bits": bits,
            }
        )
    return pd.DataFrame(kept).drop(columns="bits")
