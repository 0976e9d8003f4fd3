"""Publishing under faults and races: after the next publish the Space and the ledger agree.

The one publish path (release.publish_and_record) is interrupted at each boundary it crosses:
the Space commit, the ledger entry write and the champion pointer move, before and after each,
for a git Space and for the Hugging Face stand-in. A fault is either a real SIGKILL of a publisher
process or a failure (the Space or storage raising) in this process. The next publish must then
leave the Space's head equal to the ledger champion's commit, with a ledger entry for every
freshnet commit the Space got, and nothing pending.

Models and bundles are a few bytes: the bundle's content is not what is tested here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from freshnet import release
from freshnet.config import Config, parse_config
from freshnet.space.ledger import Entry, Ledger, LedgerError
from freshnet.space.publish import PublishError, SpaceMoved, publish, space_head
from freshnet.storage import StorageError, sha256_file
from freshnet.storage_file import FileStorage
from tests.hf_standin import HubStandIn

REPO = Path(__file__).resolve().parents[1]
HF_TOKEN = "hf_faultsTEST_0123456789"
POINTS = [
    f"{when}-{boundary}"
    for boundary in ("space-commit", "ledger-write", "pointer-move")
    for when in ("before", "after")
]


def install_fault(
    patch: Callable[[object, str, object], None], point: str, fault: Callable
) -> None:
    """Call ``fault`` once, ``before`` or ``after`` the real call at a publish boundary.

    ``patch(owner, name, value)`` replaces an attribute (monkeypatch.setattr, or setattr in a
    publisher process about to be killed).
    """
    when, boundary = point.split("-", 1)
    fired = []

    def around(real: Callable, matches: Callable[..., bool]) -> Callable:
        def wrapper(*args, **kwargs):
            hit = not fired and matches(*args)
            if hit and when == "before":
                fired.append(point)
                fault()
            out = real(*args, **kwargs)
            if hit and when == "after":
                fired.append(point)
                fault()
            return out

        return wrapper

    if boundary == "space-commit":
        # The one publish path (release.publish_and_record) calls the publisher through here.
        patch(release, "publish", around(release.publish, lambda *a: True))
    elif boundary == "ledger-write":
        real = FileStorage.put_if_absent
        patch(
            FileStorage,
            "put_if_absent",
            around(real, lambda s, key, *a: key.startswith("ledger/entries/")),
        )
    elif boundary == "pointer-move":
        real = FileStorage.swap_pointer
        patch(FileStorage, "swap_pointer", around(real, lambda s, name, *a: name == "champion"))
    else:
        raise ValueError(point)


def tiny_bundle(root: Path, version: str) -> tuple[Path, Path]:
    """A minimal bundle for ``version`` and its model file (distinct bytes per version)."""
    bundle = root / "bundles" / version
    (bundle / "examples").mkdir(parents=True, exist_ok=True)
    (bundle / "app.py").write_text("# the Space app\n")
    (bundle / "README.md").write_text(f"# {version}\n")
    (bundle / "model.pkl").write_bytes(f"model {version}".encode())
    (bundle / "metadata.json").write_text(json.dumps({"version": version, "examples": []}))
    return bundle, bundle / "model.pkl"


@dataclass
class Setup:
    kind: str  # git | hf
    root: Path
    cfg_dict: dict
    hub: HubStandIn | None

    @property
    def cfg(self) -> Config:
        return parse_config(self.cfg_dict)

    @property
    def store(self) -> FileStorage:
        return FileStorage(self.root / "store")

    @property
    def target(self) -> str:
        return self.cfg_dict["space"]["target"]

    def prepare(self, version: str) -> tuple[Path, dict]:
        """Store ``version``'s model as training would; return its bundle and train result."""
        bundle, model = tiny_bundle(self.root, version)
        key = f"models/{version}/model.pkl"
        self.store.put(key, model.read_bytes())
        return bundle, {"model_key": key, "model_sha256": sha256_file(model)}

    def publish(self, version: str) -> Entry:
        """What the nightly does once a challenger won: release.publish_step."""
        bundle, trained = self.prepare(version)
        entry = release.publish_step(
            self.cfg, version, str(bundle), trained, {"accuracy": 0.9}, {"promote": True}, "snap"
        )
        return Entry.from_dict(entry)

    def head(self) -> str | None:
        return space_head(self.target, token=HF_TOKEN)

    def space_commits(self) -> list[tuple[str, str]]:
        """(commit, title) of every commit the Space got, newest first."""
        if self.kind == "hf":
            assert self.hub is not None
            repo = self.hub.repos.get("alice/faults")
            commits = repo.commits if repo else []
            return [(c["sha"], c["summary"]) for c in reversed(commits)]
        if not (Path(self.target) / ".git").exists():
            return []
        out = subprocess.run(
            ["git", "-C", self.target, "log", "--format=%H%x09%s", "main"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [tuple(line.split("\t", 1)) for line in out.splitlines()]  # type: ignore[misc]

    def assert_agree(self) -> list[Entry]:
        """Space head == champion's commit; every freshnet commit served has one ledger entry."""
        ledger = Ledger(self.store)
        champion = ledger.champion()
        assert champion is not None
        assert self.head() == champion.commit, "the ledger's champion is not what the Space serves"
        history = ledger.history()
        recorded = [e.commit for e in history]
        served = [c for c, title in self.space_commits() if title.startswith("freshnet:")]
        assert sorted(recorded) == sorted(served), (recorded, self.space_commits())
        assert ledger.intent()[0] is None, "a publish intent was left pending"
        return history


@pytest.fixture(params=["git", "hf"])
def setup(request, tmp_path, monkeypatch) -> Iterator[Setup]:
    monkeypatch.setenv("FRESHNET_CACHE", str(tmp_path / "cache"))
    # A killed publisher's lease blocks the next one for its TTL; keep that short here.
    monkeypatch.setattr(release, "PUBLISH_LEASE_TTL_S", 0.5)
    cfg = {"classes": ["a", "b"], "storage": f"file://{tmp_path / 'store'}"}
    if request.param == "git":
        cfg["space"] = {"target": str(tmp_path / "space")}
        yield Setup("git", tmp_path, cfg, None)
        return
    with HubStandIn(token=HF_TOKEN) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
        cfg["space"] = {"target": "hf://spaces/alice/faults"}
        yield Setup("hf", tmp_path, cfg, hub)


def _expect_after_fault(s: Setup, point: str, v1: Entry, v3: Entry) -> None:
    history = s.assert_agree()
    versions = [e.version for e in history]
    if point == "before-space-commit":
        # The commit never happened: the intent is dropped, v3 is built on v1.
        assert versions == ["v1", "v3"], versions
        assert v3.parent_commit == v1.commit
    else:
        # v2 reached the Space: its entry exists (written then, or completed from the intent).
        assert versions == ["v1", "v2", "v3"], versions
        assert v3.parent_commit == history[1].commit and history[1].parent_commit == v1.commit
        assert history[1].model_sha256 == sha256_file(s.root / "bundles/v2/model.pkl")


# ---- failures in this process: the Space or storage raises ------------------------------------


@pytest.mark.parametrize("point", POINTS)
def test_failure_at_each_publish_boundary_heals_on_the_next_publish(setup, point, monkeypatch):
    s = setup
    v1 = s.publish("v1")
    if point.endswith("space-commit"):
        error: Exception = PublishError(f"injected Space failure {point}")
    else:
        error = StorageError(f"injected storage failure {point}")

    def fail() -> None:
        raise error

    install_fault(monkeypatch.setattr, point, fail)
    if point == "after-space-commit":
        # The Space took the commit although the call failed (a time-out after the Hub
        # accepted it): the publisher finds its own commit by the intent and records it now.
        v2 = s.publish("v2")
        assert s.head() == v2.commit and v2.version == "v2"
    else:
        with pytest.raises(type(error), match="injected"):
            s.publish("v2")
    v3 = s.publish("v3")
    _expect_after_fault(s, point, v1, v3)


# ---- a publisher process killed with SIGKILL at each boundary ---------------------------------

_KILLED_PUBLISHER = r"""
import json, os, signal, sys
from freshnet import release
from freshnet.config import parse_config
from tests.test_publish_faults import install_fault

point, cfg, bundle, trained = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
release.PUBLISH_LEASE_TTL_S = 0.5
install_fault(setattr, point, lambda: os.kill(os.getpid(), signal.SIGKILL))
release.publish_step(
    parse_config(cfg), "v2", bundle, json.loads(trained), {"accuracy": 0.9}, {"promote": True}, "snap"
)
"""


def kill_publisher_at(s: Setup, point: str, version: str = "v2") -> None:
    bundle, trained = s.prepare(version)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _KILLED_PUBLISHER,
            point,
            json.dumps(s.cfg_dict),
            str(bundle),
            json.dumps(trained),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point}: {proc.stderr[-3000:]}"


# Two kills stay in the fast suite (git: the commit landed, nothing recorded; hf: the entry
# written, the pointer not moved); the rest of the matrix is slow-marked (a process start each).
FAST_KILLS = {("git", "after-space-commit"), ("hf", "after-ledger-write")}


@pytest.mark.parametrize(
    ("setup", "point"),
    [
        pytest.param(kind, p, marks=() if (kind, p) in FAST_KILLS else pytest.mark.slow)
        for kind in ("git", "hf")
        for p in POINTS
    ],
    indirect=["setup"],
)
def test_publisher_killed_at_each_boundary_is_settled_by_the_next_publish(setup, point):
    s = setup
    v1 = s.publish("v1")
    kill_publisher_at(s, point)
    if point != "before-space-commit":
        # The Space serves v2 now; the ledger may not know it yet: status says a publish is pending.
        from freshnet.space.ledger import format_status

        assert "publish pending: promote v2" in format_status(s.store)
    v3 = s.publish("v3")  # waits out the dead publisher's lease, then settles its intent
    _expect_after_fault(s, point, v1, v3)


# ---- exactness: only the lost intent's own commit is adopted ----------------------------------


@pytest.mark.parametrize(
    "setup", ["git", pytest.param("hf", marks=pytest.mark.slow)], indirect=True
)
def test_a_freshnet_looking_commit_that_is_not_the_intents_is_not_adopted(setup):
    """The old rule took any "freshnet:" commit one ahead of the ledger as our lost publish."""
    s = setup
    v1 = s.publish("v1")
    kill_publisher_at(s, "before-space-commit")  # an intent is pending, its commit never made
    bundle, _ = tiny_bundle(s.root, "vX")
    foreign = publish(bundle, s.target, "freshnet: promote vX", v1.commit, token=HF_TOKEN)
    with pytest.raises(SpaceMoved, match="someone else changed the Space"):
        s.publish("v3")
    ledger = Ledger(s.store)
    assert [e.version for e in ledger.history()] == ["v1"] and ledger.champion() == v1
    assert ledger.intent()[0] is None  # the lost intent was discarded, not matched to `foreign`
    assert s.head() == foreign


# ---- rollback picks from what the Space serves ------------------------------------------------


def test_default_rollback_starts_from_the_version_the_space_serves(setup, monkeypatch):
    """v1, v2, then a manual promote of v1 whose ledger write fails: the Space serves v1.

    The old code rolled back "before the pointer's champion" (v2) to v1, which was already live.
    """
    s = setup
    s.publish("v1")
    s.publish("v2")
    install_fault(
        monkeypatch.setattr,
        "before-ledger-write",
        lambda: (_ for _ in ()).throw(StorageError("down")),
    )
    with pytest.raises(StorageError):
        release.promote_step(s.cfg, "v1", "v2 looks worse on tulips")
    monkeypatch.undo()
    monkeypatch.setenv("FRESHNET_CACHE", str(s.root / "cache"))
    if s.kind == "hf":
        assert s.hub is not None
        monkeypatch.setenv("HF_ENDPOINT", s.hub.url)
        monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    entry = Entry.from_dict(release.rollback_step(s.cfg))
    assert entry.version == "v2" and entry.reason == "rollback from v1"
    history = s.assert_agree()
    assert [(e.version, e.kind) for e in history] == [
        ("v1", "promote"),
        ("v2", "promote"),
        ("v1", "manual"),
        ("v2", "rollback"),
    ]
    with pytest.raises(LedgerError, match="already what the Space serves"):
        release.rollback_step(s.cfg, "v2")


@pytest.mark.parametrize("setup", ["hf"], indirect=True)  # wait_running is for HF Spaces
def test_rollback_waits_for_the_space_to_run(setup):
    """Rollback goes through the same wait_running check as the nightly (hf targets)."""
    s = setup
    assert s.hub is not None
    s.publish("v1")
    s.publish("v2")
    s.hub.runtime_stage = "RUNTIME_ERROR"
    s.cfg_dict["space"]["wait_running"] = True
    with pytest.raises(PublishError, match="failed to start: stage RUNTIME_ERROR"):
        release.rollback_step(s.cfg, token=HF_TOKEN)
    assert "GET /api/spaces/alice/faults/runtime" in s.hub.paths()
    assert s.assert_agree()[-1].kind == "rollback"  # live and recorded, just not running


# ---- concurrency: rollback and manual promote against a nightly publish -----------------------


def test_rollback_and_manual_promote_race_a_nightly_publish(setup, monkeypatch):
    s = setup
    s.publish("v1")
    s.publish("v2")
    bundle, trained = s.prepare("v3")
    real_publish = publish

    def slow_publish(*args, **kwargs):
        time.sleep(0.15)  # widen the window in which the others try to publish
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(release, "publish", slow_publish)
    cfg = s.cfg
    jobs = {
        "nightly": lambda: release.publish_step(
            cfg, "v3", str(bundle), trained, {"accuracy": 0.9}, {"promote": True}, "snap"
        ),
        "rollback": lambda: release.rollback_step(cfg),
        "manual": lambda: release.promote_step(cfg, "v1", "hand-picked"),
    }
    barrier = threading.Barrier(len(jobs))
    results: dict[str, object] = {}

    def run(name: str) -> None:
        barrier.wait()
        try:
            results[name] = jobs[name]()
        except Exception as exc:  # noqa: BLE001 - reported below
            results[name] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    failed = {n: r for n, r in results.items() if isinstance(r, Exception)}
    assert not failed and len(results) == 3, failed  # the lease serialised them: all published
    history = s.assert_agree()
    assert len(history) == 5
    # One linear chain: each publish was built on the one before it, in ledger order, and the
    # champion is the last one pushed.
    for before, after in zip(history, history[1:], strict=False):
        assert after.parent_commit == before.commit
    assert Ledger(s.store).champion() == history[-1]


def test_a_night_that_keeps_the_champion_still_heals_a_lost_publish(setup):
    """Reading the champion (every night does, first) settles a pending intent: the ledger
    names what the Space serves even when no publish follows."""
    s = setup
    s.publish("v1")

    def fail() -> None:
        raise StorageError("injected storage failure before the ledger write")

    with pytest.MonkeyPatch.context() as patch:
        install_fault(patch.setattr, "before-ledger-write", fail)
        with pytest.raises(StorageError, match="injected"):
            s.publish("v2")
    served = s.head()
    champion = release.champion_step(s.cfg)
    assert champion is not None and champion["version"] == "v2"
    assert champion["commit"] == served
    s.assert_agree()
