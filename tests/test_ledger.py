"""Ledger: append-only history, champion pointer under concurrent writers, rollback and manual promote."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from freshnet import release
from freshnet.config import parse_config
from freshnet.space.bundle import build_bundle
from freshnet.space.ledger import Entry, Ledger, LedgerError, format_status
from freshnet.space.publish import space_head
from freshnet.storage import sha256_file
from freshnet.storage_file import FileStorage
from tests.app_helpers import bundle_meta


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
    # Unserialised writers (no publish lease): the pointer is whole and names one of them.
    assert Ledger(store).champion() in history


def test_champion_follows_the_last_push_not_the_highest_seq(tmp_path):
    """Defect: the pointer moved to the highest seq although an older entry was pushed last."""
    ledger = Ledger(FileStorage(tmp_path))
    e1 = ledger.append(version="v1", kind="promote", commit="a" * 40)
    e2 = ledger.append(version="v2", kind="promote", commit="b" * 40)
    assert ledger.champion() is None  # append alone never moves the pointer
    ledger.set_champion(e2)
    ledger.set_champion(e1)  # e1's commit is what the Space got last
    assert ledger.champion() == e1 and e1.seq < e2.seq


def test_ledger_stores_targets_redacted(tmp_path):
    ledger = Ledger(FileStorage(tmp_path))
    e = ledger.record(
        version="v1", kind="promote", commit="a" * 40, target="https://bob:s3cr3t@git.example/s.git"
    )
    raw = FileStorage(tmp_path).get("ledger/entries/000001.json").decode()
    assert "s3cr3t" not in raw and e.target == "https://***@git.example/s.git"
    assert "s3cr3t" not in format_status(FileStorage(tmp_path))


def test_publish_intent_lifecycle(tmp_path):
    store = FileStorage(tmp_path)
    ledger = Ledger(store)
    assert ledger.intent() == (None, None)
    ledger.begin_intent({"id": "i1", "kind": "promote", "version": "v1"}, None)
    intent, token = ledger.intent()
    assert intent["id"] == "i1"
    with pytest.raises(LedgerError, match="intent changed under this publisher"):
        ledger.begin_intent({"id": "i2"}, None)  # a stale token: someone else wrote one
    assert "publish pending: promote v1 (intent i1" in format_status(store)
    ledger.end_intent("other")  # only the named intent is cleared
    assert ledger.intent()[0]["id"] == "i1"
    ledger.end_intent("i1")
    assert ledger.intent()[0] is None and "publish pending" not in format_status(store)
    ledger.begin_intent({"id": "i2"}, ledger.intent()[1])
    assert ledger.intent()[0]["id"] == "i2"


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
    assert Ledger(FileStorage(tmp_path)).champion() in history


# ---- rollback and manual promotion through a real local git Space -----------------------------


@pytest.fixture(scope="session")
def two_models(space_model, tmp_path_factory) -> tuple[Path, Path]:
    """v1 = the test model; v2 = the same with shifted output weights (a different, loadable model)."""
    v1 = space_model
    v2 = tmp_path_factory.mktemp("v2") / "model.pkl"
    script = (
        "import torch\nfrom fastai.learner import load_learner\n"
        f"learn = load_learner({str(v1)!r})\n"
        "last = [m for m in learn.model.modules() if isinstance(m, torch.nn.Linear)][-1]\n"
        "with torch.no_grad(): last.weight += 0.01\n"
        f"learn.export({str(v2)!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    return v1, v2


def _promote(cfg, store, version: str, model: Path, examples: list[Path], work: Path) -> Entry:
    """The nightly publish step: the model in storage, a bundle, then the one publish path."""
    key = f"models/{version}/model.pkl"
    store.put(key, model.read_bytes())
    bundle = build_bundle(model, bundle_meta(version), examples, work / version, cfg.space)
    entry = release.publish_step(
        cfg,
        version,
        str(bundle),
        {"model_key": key, "model_sha256": sha256_file(model)},
        {"accuracy": 0.8},
        {"promote": True},
        "snap-test",
    )
    return Entry.from_dict(entry)


def _rollback(cfg, version: str | None = None) -> Entry:
    return Entry.from_dict(release.rollback_step(cfg, version))


def _manual(cfg, version: str, reason: str) -> Entry:
    return Entry.from_dict(release.promote_step(cfg, version, reason))


def _git(target: str, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", target, *args], check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FRESHNET_CACHE", str(tmp_path / "cache"))


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
        _rollback(cfg)
    e1 = _promote(cfg, store, "v1", v1, example_photos, tmp_path)
    with pytest.raises(LedgerError, match="only version published"):
        _rollback(cfg)
    e2 = _promote(cfg, store, "v2", v2, example_photos, tmp_path)
    assert space_head(target) == e2.commit

    entry = _rollback(cfg)
    assert entry.kind == "rollback" and entry.version == "v1" and entry.seq == 3
    assert entry.reason == "rollback from v2" and entry.parent_commit == e2.commit
    assert entry.commit not in (e1.commit, e2.commit)  # a new commit, history kept
    assert _git(target, "rev-parse", f"{entry.commit}^").strip() == e2.commit
    assert space_head(target) == entry.commit
    assert sha256_file(Path(target) / "model.pkl") == e1.model_sha256  # serves v1's model
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

    with pytest.raises(LedgerError, match="already what the Space serves"):
        _rollback(cfg, "v1")
    with pytest.raises(LedgerError, match="was never published; published versions: v1, v2"):
        _rollback(cfg, "v9")

    # Manual override back to v2, with its reason recorded.
    with pytest.raises(LedgerError, match="needs a reason"):
        _manual(cfg, "v2", " ")
    manual = _manual(cfg, "v2", "v1 misclassifies tulips")
    assert manual.kind == "manual" and manual.reason == "v1 misclassifies tulips"
    assert sha256_file(Path(target) / "model.pkl") == e2.model_sha256
    assert int(_git(target, "rev-list", "--count", "HEAD")) == 4


@pytest.mark.slow
def test_rollback_refuses_a_tampered_model(two_models, example_photos, tmp_path):
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
    _promote(cfg, store, "v1", v1, example_photos, tmp_path)
    e2 = _promote(cfg, store, "v2", v2, example_photos, tmp_path)
    store.put("models/v1/model.pkl", v2.read_bytes())  # storage no longer holds what was published
    with pytest.raises(LedgerError, match="refusing to publish a different model"):
        _rollback(cfg)
    assert space_head(target) == e2.commit and Ledger(store).champion() == e2


def test_promote_manual_needs_the_model_in_storage(tmp_path):
    cfg = parse_config(
        {
            "classes": ["a", "b"],
            "storage": f"file://{tmp_path / 'store'}",
            "space": {"target": str(tmp_path / "space")},
        }
    )
    with pytest.raises(LedgerError, match="model of v7 is not in storage"):
        _manual(cfg, "v7", "because")
    assert Ledger(FileStorage(tmp_path / "store")).intent()[0] is None  # nothing left pending


@pytest.mark.slow
def test_cli_rollback_and_promote_run_the_flows(tmp_path):
    """`freshnet rollback` / `promote` run the rollback / promote flows: the one publish path."""
    import os

    from tests.test_publish_faults import tiny_bundle

    store_dir, target = tmp_path / "store", tmp_path / "space"
    config = tmp_path / "cfg.toml"
    config.write_text(
        f'classes = ["a", "b"]\nstorage = "file://{store_dir}"\n[space]\ntarget = "{target}"\n'
    )
    cfg = parse_config(
        {"classes": ["a", "b"], "storage": f"file://{store_dir}", "space": {"target": str(target)}}
    )
    store = FileStorage(store_dir)
    for version in ("v1", "v2"):
        bundle, model = tiny_bundle(tmp_path, version)
        store.put(f"models/{version}/model.pkl", model.read_bytes())
        release.publish_step(
            cfg,
            version,
            str(bundle),
            {"model_key": f"models/{version}/model.pkl", "model_sha256": sha256_file(model)},
            {"accuracy": 0.5},
            {},
            "snap",
        )
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / ".prefect"),
        "FRESHNET_CACHE": str(tmp_path / "cache"),
    }

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "freshnet.cli", *args, "--config", str(config)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    r = cli("rollback")
    assert r.returncode == 0 and "rolled back: v1 is champion again" in r.stdout, r.stderr[-3000:]
    r = cli("promote", "v2", "--reason", "back to v2")
    assert r.returncode == 0 and "promoted v2 by hand" in r.stdout, r.stderr[-3000:]
    history = Ledger(store).history()
    assert [(e.kind, e.version) for e in history][-2:] == [("rollback", "v1"), ("manual", "v2")]
    assert space_head(str(target)) == Ledger(store).champion().commit == history[-1].commit
