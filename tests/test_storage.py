"""One storage contract, run against file:// and s3:// (moto's S3 server on 127.0.0.1)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from freshnet import storage_file as storage_file_mod
from freshnet.storage import NotFound, ReservedKey, Storage, StorageError
from freshnet.storage_file import FileStorage
from freshnet.storage_open import open_storage
from freshnet.storage_s3 import S3Storage
from tests.fixtures_servers import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "file":
        return open_storage(f"file://{tmp_path / 'store'}")
    return open_storage(request.getfixturevalue("s3_uri"))


def test_get_missing_raises_notfound(store: Storage) -> None:
    with pytest.raises(NotFound):
        store.get("nope/missing.json")
    store.put("dir/a.txt", b"a")
    with pytest.raises(NotFound):  # a prefix is not a key
        store.get("dir")


def test_put_get_overwrite_exists_delete(store: Storage) -> None:
    assert not store.exists("a/b.bin")
    store.put("a/b.bin", b"\x00one")
    assert store.exists("a/b.bin")
    assert store.get("a/b.bin") == b"\x00one"
    store.put("a/b.bin", b"two")
    assert store.get("a/b.bin") == b"two"
    store.put("empty", b"")
    assert store.get("empty") == b""
    store.delete("a/b.bin")
    assert not store.exists("a/b.bin")
    store.delete("a/b.bin")  # deleting a missing key is not an error
    with pytest.raises(NotFound):
        store.get("a/b.bin")


def test_put_if_absent_never_overwrites(store: Storage) -> None:
    assert store.put_if_absent("images/ab/abc.jpg", b"first") is True
    assert store.put_if_absent("images/ab/abc.jpg", b"second") is False
    assert store.get("images/ab/abc.jpg") == b"first"


def test_list_sorted_prefix_and_pointers_hidden(store: Storage) -> None:
    for k in ["b/2", "a/1", "a/3", "ab/x", "c"]:
        store.put(k, k.encode())
    assert store.swap_pointer("champion", b"v1", None)
    assert store.list() == ["a/1", "a/3", "ab/x", "b/2", "c"]
    assert store.list("a/") == ["a/1", "a/3"]
    assert store.list("a") == ["a/1", "a/3", "ab/x"]
    assert store.list("zzz/") == []


def test_list_paginates(store: Storage) -> None:
    keys = [f"many/{i:03d}" for i in range(23)]
    for k in keys:
        store.put(k, b"x")
    if isinstance(store, S3Storage):
        store.page_size = 5  # forces 5 pages of ListObjectsV2
    assert store.list("many/") == keys


def test_invalid_keys_rejected(store: Storage) -> None:
    for bad in ["", "/abs", "a//b", "a/../b", "./a", "a\\b"]:
        with pytest.raises(ValueError, match="invalid storage key"):
            store.put(bad, b"x")


def test_pointer_compare_and_swap(store: Storage) -> None:
    assert store.read_pointer("champion") == (None, None)
    assert store.swap_pointer("champion", b"v1", None) is True
    assert store.swap_pointer("champion", b"other", None) is False  # must be unset
    value, version = store.read_pointer("champion")
    assert value == b"v1" and version
    assert store.swap_pointer("champion", b"v2", version) is True
    assert store.swap_pointer("champion", b"v3", version) is False  # stale version
    assert store.swap_pointer("champion", b"v3", "not-a-version") is False
    assert store.read_pointer("champion")[0] == b"v2"
    assert store.read_pointer("catalog") == (None, None)  # pointers are independent


def test_get_to_file_and_url(store: Storage, tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000
    store.put("models/v1/model.pkl", data)
    dest = store.get_to_file("models/v1/model.pkl", tmp_path / "out" / "model.pkl")
    assert dest.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == ["model.pkl"]  # no temp files left
    with pytest.raises(NotFound):
        store.get_to_file("models/v9/model.pkl", tmp_path / "out" / "x.pkl")
    assert store.url("models/v1/model.pkl") == store.uri.rstrip("/") + "/models/v1/model.pkl"


def test_concurrent_put_if_absent_has_one_winner(store: Storage) -> None:
    n = 8
    barrier = threading.Barrier(n)
    results: dict[int, bool] = {}

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = store.put_if_absent("ledger/entries/000001.json", f"writer {i}".encode())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, ok in results.items() if ok]
    assert len(results) == n and len(winners) == 1
    assert store.get("ledger/entries/000001.json") == f"writer {winners[0]}".encode()


def test_concurrent_swap_pointer_has_one_winner(store: Storage) -> None:
    store.swap_pointer("champion", b"start", None)
    _, version = store.read_pointer("champion")
    n = 8
    barrier = threading.Barrier(n)
    results: dict[int, bool] = {}

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = store.swap_pointer("champion", f"writer {i}".encode(), version)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, ok in results.items() if ok]
    assert len(winners) == 1
    assert store.read_pointer("champion")[0] == f"writer {winners[0]}".encode()


def test_cas_counter_loses_no_increment(store: Storage) -> None:
    threads_n, increments = 4, 5

    def worker() -> None:
        for _ in range(increments):
            while True:
                value, version = store.read_pointer("counter")
                nxt = str(int(value or b"0") + 1).encode()
                if store.swap_pointer("counter", nxt, version):
                    break

    threads = [threading.Thread(target=worker) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.read_pointer("counter")[0] == str(threads_n * increments).encode()


def test_open_storage_dispatch(tmp_path: Path) -> None:
    assert isinstance(open_storage(f"file://{tmp_path}"), FileStorage)
    s3 = open_storage("s3://my-bucket/some/prefix/")
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix, s3.uri) == (
        "my-bucket",
        "some/prefix",
        "s3://my-bucket/some/prefix",
    )
    assert S3Storage.from_uri("s3://b").uri == "s3://b"
    with pytest.raises(ValueError, match="no bucket"):
        open_storage("s3:///prefix")
    with pytest.raises(ValueError, match="unsupported URI"):
        open_storage("gs://x")


def test_s3_storage_pickles_without_client(s3_uri: str) -> None:
    store = open_storage(s3_uri)
    store.put("k", b"v")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.get("k") == b"v"


def test_s3_unreachable_endpoint_names_it(s3_env: dict[str, str]) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3Storage("bucket", "p", endpoint_url=endpoint, max_attempts=1, timeout_s=2)
    for op in (lambda: store.get("k"), lambda: store.put("k", b"v"), lambda: store.list()):
        with pytest.raises(StorageError, match=endpoint.replace(".", r"\.")):
            op()


def test_s3_missing_bucket_is_clear(s3_env: dict[str, str]) -> None:
    store = S3Storage("no-such-bucket-here", "p")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        store.put("k", b"v")
    with pytest.raises(StorageError, match="does not exist"):
        store.list()


def test_s3_ensure_bucket_idempotent(s3_env: dict[str, str]) -> None:
    store = S3Storage("idempotent-bucket", "x")
    store.ensure_bucket()
    assert store.ensure_bucket() is False
    store.put("a", b"1")
    assert store.list() == ["a"]


def test_importing_storage_does_not_import_boto3() -> None:
    code = "import sys, freshnet.storage_open; assert 'boto3' not in sys.modules and 'botocore' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_pointers_writable_only_through_swap_pointer(store: Storage) -> None:
    assert store.swap_pointer("champion", b"v1", None)
    for write in (
        lambda: store.put("_pointers/champion", b"forged"),
        lambda: store.put_if_absent("_pointers/other", b"forged"),
        lambda: store.delete("_pointers/champion"),
    ):
        with pytest.raises(ReservedKey, match=r"'_pointers/.*swap_pointer"):
            write()
    with pytest.raises(ReservedKey, match="_tmp/"):
        store.put("_tmp/x", b"x")
    assert store.read_pointer("champion")[0] == b"v1"
    assert store.read_pointer("other") == (None, None)
    assert store.list() == []


def _touch_tree(root: Path, n: int) -> None:
    """``n`` empty image files in 256 fan-out folders, as a large catalog stores them."""
    for i in range(n):
        h = f"{i % 256:02x}{i:062x}"
        d = root / "images" / h[:2]
        if i < 256:
            d.mkdir(parents=True, exist_ok=True)
        os.close(os.open(d / f"{h}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))


def test_file_list_reads_only_the_prefix_folder(tmp_path: Path, monkeypatch) -> None:
    store = FileStorage(tmp_path / "s")
    _touch_tree(store.root, 20_000)  # a big sibling tree list("ledger/") must never visit
    ledger = [f"ledger/{i:08d}.json" for i in range(30)]
    for k in ledger + ["ledger/sub/x.json", "ledgerish/y", "models/v1/model.pkl"]:
        store.put(k, b"{}")
    scanned: list[Path] = []
    real_scandir = os.scandir

    def recording_scandir(path="."):
        scanned.append(Path(path))
        return real_scandir(path)

    monkeypatch.setattr(storage_file_mod.os, "scandir", recording_scandir)

    t0 = time.perf_counter()
    assert store.list("ledger/") == ledger + ["ledger/sub/x.json"]
    took = time.perf_counter() - t0
    assert set(scanned) == {store.root / "ledger", store.root / "ledger/sub"}, scanned

    scanned.clear()
    assert store.list("ledger/0000001") == ledger[10:20]
    assert scanned == [store.root / "ledger"]

    scanned.clear()
    assert store.list("led") == ledger + ["ledger/sub/x.json", "ledgerish/y"]
    # The root is read once for names starting with "led"; images/ and models/ are not entered.
    assert not any(p.is_relative_to(store.root / "images") for p in scanned), scanned

    scanned.clear()
    assert len(store.list("images/0")) == sum(i % 256 < 16 for i in range(20_000))
    assert {p for p in scanned if p != store.root / "images"} == {
        store.root / "images" / f"0{c}" for c in "0123456789abcdef"
    }
    assert store.list("../") == store.list("a//b") == store.list("_pointers/") == []
    assert len(store.list()) == 20_000 + 33
    # Reading 31 small files' names must not cost a walk of 20,000 (it took ~1 s before).
    assert took < 0.5, took


def test_killed_write_temp_files_are_swept_by_age(tmp_path: Path) -> None:
    root = tmp_path / "s"
    FileStorage(root).put("keep/a", b"a")
    # A writer killed between writing its temp file and renaming it (os.replace never returns).
    code = (
        "import os, time, sys\n"
        "from freshnet.storage_file import FileStorage\n"
        "os.replace = lambda *a: time.sleep(600)\n"
        f"FileStorage({str(root)!r}).put('models/v1/model.pkl', b'x' * 2_000_000)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not [p for p in (root / "_tmp").glob("*.tmp") if p.stat().st_size == 2_000_000]:
            assert time.monotonic() < deadline and proc.poll() is None, "writer never wrote"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    (orphan,) = (root / "_tmp").glob("*.tmp")
    # A store from before _tmp kept temp files next to the key; one of those is swept once too.
    legacy = root / "keep" / ".a.x1y2z3.tmp"
    legacy.write_bytes(b"partial")

    store = FileStorage(root)  # opening it sweeps, but a young temp may be a live writer's
    assert orphan.exists() and legacy.exists()
    old = time.time() - storage_file_mod.TEMP_MAX_AGE_S - 60
    for p in (orphan, legacy):
        os.utime(p, (old, old))
    (root / "_tmp" / storage_file_mod._LEGACY_SWEPT).unlink()
    fresh = root / "_tmp" / ".b.live.tmp"
    fresh.write_bytes(b"in flight")

    store = FileStorage(root)
    assert not orphan.exists() and not legacy.exists()
    assert fresh.exists()  # a concurrent writer's temp file is left alone
    assert store.get("keep/a") == b"a" and store.list() == ["keep/a"]

    # A long-lived store sweeps again by age, not only when opened.
    os.utime(fresh, (old, old))
    store.put("keep/b", b"b")
    assert fresh.exists()  # swept less than SWEEP_EVERY_S ago
    store._last_sweep -= storage_file_mod.SWEEP_EVERY_S + 1
    store.put("keep/c", b"c")
    assert not fresh.exists()


def test_file_writes_fsync_the_folder_after_rename(tmp_path: Path, monkeypatch) -> None:
    store = FileStorage(tmp_path / "s")
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(dst)))
        return real_replace(src, dst)

    def link(src, dst):
        events.append(("link", str(dst)))
        return real_link(src, dst)

    monkeypatch.setattr(storage_file_mod.os, "fsync", fsync)
    monkeypatch.setattr(storage_file_mod.os, "replace", replace)
    monkeypatch.setattr(storage_file_mod.os, "link", link)
    folder = str(store.root / "ledger")
    for op, write in (
        ("rename", lambda: store.put("ledger/a.json", b"1")),
        ("link", lambda: store.put_if_absent("ledger/b.json", b"2")),
        ("rename", lambda: store.swap_pointer("champion", b"v", None)),
    ):
        events.clear()
        write()
        done = [i for i, e in enumerate(events) if e[0] == op]
        assert done, events
        target_dir = str(Path(events[done[0]][1]).parent)
        assert ("fsync", target_dir) in events[done[0] + 1 :], events
    assert target_dir == str(store.root / "_pointers")
    events.clear()
    store.delete("ledger/a.json")
    assert events == [("fsync", folder)]
