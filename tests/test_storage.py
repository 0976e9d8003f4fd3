"""One storage contract, run against file:// and s3:// (moto's S3 server on 127.0.0.1)."""

from __future__ import annotations

import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from freshnet.storage import FileStorage, NotFound, S3Storage, Storage, StorageError, open_storage
from tests.fixtures_servers import *  # noqa: F403  (fixtures, until conftest imports them)
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
    code = "import sys, freshnet.storage; assert 'boto3' not in sys.modules and 'botocore' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
