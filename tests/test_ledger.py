"""Ledger: append-only history, champion pointer under concurrent writers, rollback and manual promote."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from freshnet import space
from freshnet.config import parse_config
from freshnet.ledger import Entry, Ledger, LedgerError, format_status
from freshnet.storage import FileStorage
from tests.space_helpers import bundle_meta, model_for_tests


def _record(ledger: Ledger, version: str, commit: str = "c" * 40, **kw) -> Entry:
    return ledger.record(version=version, kind=kw.pop("kind", "promote"), commit=commit, **kw)


def test_record_history_and_champion(tmp_path):
    ledger = Ledger(FileStorage(tmp_path))
    assert ledger.champion() is None and ledger.history() == []
    e1 = _record(ledger, "v1", metrics={"holdout_accuracy": 0.9}, dataset="snap1")
    e2 = _record(ledger, "v2", commit="d" * 40)
    assert (e1.seq, e2.seq) == (1, 2)
    assert ledger.champion() == e2
    assert [e.version for e in ledger.history()] == ["v1", "v2"]
    assert ledger.find("v1") == e1 and ledger.find("nope") is None
    stored = json.loads(FileStorage(tmp_path).get("ledger/entries/000001.json"))
    assert stored["version"] == "v1" and stored["metrics"] == {"holdout_accuracy": 0.9}
    assert stored["time"].endswith("+00:00")


def test_record_refuses_bad_entries(tmp_path):
    ledger = Ledger(FileStorage(tmp_path))
    with pytest.raises(LedgerError, match="kind must be one of"):
        _record(ledger, "v1", kind="yolo")
    with pytest.raises(LedgerError, match="non-empty 'commit'"):
        ledger.record(version="v1", kind="promote", commit="")
    assert ledger.history() == []


def test_concurrent_threads_never_lose_an_entry(tmp_path):
    store = FileStorage(tmp_path)
    n_threads, per_thread = 8, 10
    barrier = threading.Barrier(n_threads)

    def writer(i: int) -> None:
        ledger = Ledger(store)
        barrier.wait()
        for j in range(per_thread):
            _record(ledger, f"t{i}-{j}")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    history = Ledger(store).history()
    assert len(history) == n_threads * per_thread
    assert sorted(e.version for e in history) == sorted(
        f"t{i}-{j}" for i in range(n_threads) for j in range(per_thread)
    )
    assert [e.seq for e in history] == list(range(1, n_threads * per_thread + 1))
    assert Ledger(store).champion().seq == n_threads * per_thread  # pointer never went backwards


def _process_writer(root: str, i: int, n: int, start) -> None:
    start.wait()
    ledger = Ledger(FileStorage(root))
    for j in range(n):
        ledger.record(version=f"p{i}-{j}", kind="promote", commit="e" * 40)


def test_concurrent_processes_never_lose_an_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [
        ctx.Process(target=_process_writer, args=(str(tmp_path), i, 8, start)) for i in range(4)
    ]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    history = Ledger(FileStorage(tmp_path)).history()
    assert sorted(e.version for e in history) == sorted(
        f"p{i}-{j}" for i in range(4) for j in range(8)
    )
    assert len({e.seq for e in history}) == 32
    assert Ledger(FileStorage(tmp_path)).champion().seq == 32


# ---- rollback and manual promotion through a real local git Space -----------------------------


@pytest.fixture(scope="session")
def two_models(flower_photos, tmp_path_factory) -> tuple[Path, Path]:
    """v1 = the test model; v2 = the same with a shifted head bias (a different, loadable model)."""
    v1 = model_for_tests(flower_photos, tmp_path_factory)
    v2 = tmp_path_factory.mktemp("v2") / "model.pkl"
    script = (
        "import torch\nfrom fastai.learner import load_learner\n"
        f"learn = load_learner({str(v1)!r})\n"
        "with torch.no_grad(): learn.model._fc.bias += 0.01\n"
        f"learn.export({str(v2)!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    return v1, v2


def _promote(cfg, store, version: str, model: Path, examples: list[Path], work: Path) -> Entry:
    """What the nightly publish step does: store the model, bundle, one commit, then the ledger."""
    key = f"models/{version}/model.pkl"
    store.put(key, model.read_bytes())
    ledger = Ledger(store)
    champion = ledger.champion()
    bundle = space.build_bundle(model, bundle_meta(version), examples, work / version, cfg.space)
    commit = space.publish(
        bundle, cfg.space.target, f"promote {version}", champion.commit if champion else None
    )
    return ledger.record(
        version=version,
        kind="promote",
        dataset="snap-test",
        metrics={"holdout_accuracy": 0.8},
        commit=commit,
        model_key=key,
        model_sha256=space.sha256_file(model),
        target=cfg.space.target,
    )


def _git(target: str, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", target, *args], check=True, capture_output=True, text=True
    ).stdout


@pytest.mark.slow
def test_rollback_republishes_the_earlier_model_as_a_new_commit(
    two_models, example_photos, tmp_path
):
    v1, v2 = two_models
    target = str(tmp_path / "space")
    cfg = parse_config(
        {
            "classes": ["a", "b"],
            "storage": f"file://{tmp_path / 'store'}",
            "space": {"target": target},
        }
    )
    store = FileStorage(tmp_path / "store")
    with pytest.raises(LedgerError, match="nothing to roll back"):
        space.rollback(cfg, store=store)
    e1 = _promote(cfg, store, "v1", v1, example_photos, tmp_path)
    with pytest.raises(LedgerError, match="only version published"):
        space.rollback(cfg, store=store)
    e2 = _promote(cfg, store, "v2", v2, example_photos, tmp_path)
    assert space.space_head(target) == e2.commit

    entry = space.rollback(cfg, store=store)
    assert entry.kind == "rollback" and entry.version == "v1" and entry.seq == 3
    assert entry.reason == "rollback from v2" and entry.parent_commit == e2.commit
    assert entry.commit not in (e1.commit, e2.commit)  # a new commit, history kept
    assert _git(target, "rev-parse", f"{entry.commit}^").strip() == e2.commit
    assert space.space_head(target) == entry.commit
    assert space.sha256_file(Path(target) / "model.pkl") == e1.model_sha256  # serves v1's model
    meta = json.loads((Path(target) / "metadata.json").read_text())
    assert meta["version"] == "v1" and meta["published_as"] == "rollback"
    assert sorted(p.name for p in (Path(target) / "examples").iterdir()) == [
        p.name for p in example_photos
    ]
    assert Ledger(store).champion() == entry

    status = format_status(store)
    assert (
        "champion: v1" in status and "rollback from v2" in status and "history (3 entries" in status
    )

    with pytest.raises(LedgerError, match="already the champion"):
        space.rollback(cfg, "v1", store=store)
    with pytest.raises(LedgerError, match="was never published; published versions: v1, v2"):
        space.rollback(cfg, "v9", store=store)

    # Manual override back to v2, with its reason recorded.
    with pytest.raises(LedgerError, match="needs a reason"):
        space.promote_manual(cfg, "v2", " ", store=store)
    manual = space.promote_manual(cfg, "v2", "v1 misclassifies tulips", store=store)
    assert manual.kind == "manual" and manual.reason == "v1 misclassifies tulips"
    assert space.sha256_file(Path(target) / "model.pkl") == e2.model_sha256
    assert int(_git(target, "rev-list", "--count", "HEAD")) == 4


@pytest.mark.slow
def test_rollback_refuses_a_tampered_model(two_models, example_photos, tmp_path):
    v1, v2 = two_models
    target = str(tmp_path / "space")
    cfg = parse_config({"classes": ["a", "b"], "space": {"target": target}})
    store = FileStorage(tmp_path / "store")
    _promote(cfg, store, "v1", v1, example_photos, tmp_path)
    e2 = _promote(cfg, store, "v2", v2, example_photos, tmp_path)
    store.put("models/v1/model.pkl", v2.read_bytes())  # storage no longer holds what was published
    with pytest.raises(LedgerError, match="refusing to publish a different model"):
        space.rollback(cfg, store=store)
    assert space.space_head(target) == e2.commit and Ledger(store).champion() == e2


def test_promote_manual_needs_the_model_in_storage(tmp_path):
    cfg = parse_config({"classes": ["a", "b"], "space": {"target": str(tmp_path / "space")}})
    with pytest.raises(LedgerError, match="model of v7 is not in storage"):
        space.promote_manual(cfg, "v7", "because", store=FileStorage(tmp_path / "store"))
