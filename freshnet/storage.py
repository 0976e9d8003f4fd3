"""Storage: a small key/value contract with atomic writes, put-if-absent and a compare-and-swap pointer.

Keys are '/'-separated relative paths ("images/ab/abcd.jpg"). Two backends implement it:
``file://`` (embedded default) and ``s3://`` (boto3, endpoint configurable). Keys under
``_pointers/`` and ``_tmp/`` belong to the storage: put/delete refuse them (ReservedKey) and
list() never shows them; pointers change only through ``swap_pointer``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class NotFound(KeyError):
    """The key does not exist in storage."""


class StorageError(RuntimeError):
    """Storage is unreachable or refused the operation."""


def check_key(key: str) -> str:
    if (
        not key
        or key.startswith("/")
        or "\\" in key
        or any(p in ("", ".", "..") for p in key.split("/"))
    ):
        raise ValueError(
            f"invalid storage key {key!r}: use a relative path like 'images/ab/cd.jpg'"
        )
    return key


# Top-level folders that belong to the storage itself, never to a caller's put/delete:
# pointers change only by compare-and-swap (a plain put could tear the champion or a lease),
# and _tmp holds FileStorage's in-flight writes.
POINTERS_DIR = "_pointers"
TEMP_DIR = "_tmp"
RESERVED = (POINTERS_DIR, TEMP_DIR)


class ReservedKey(ValueError):
    """A put/delete aimed at a key the storage reserves for itself (pointers, temp files)."""


def check_writable_key(key: str) -> str:
    """``check_key`` plus: the key is not under a reserved folder."""
    top = check_key(key).split("/", 1)[0]
    if top == POINTERS_DIR:
        raise ReservedKey(
            f"storage key {key!r} is a pointer: pointers change only through "
            "swap_pointer (compare-and-swap) and are read with read_pointer, never put or deleted"
        )
    if top == TEMP_DIR:
        raise ReservedKey(
            f"storage key {key!r} is under {TEMP_DIR}/, which holds the storage's own temp "
            "files; use another folder"
        )
    return key


def version_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks (models are tens of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Storage(ABC):
    uri: str

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write atomically: readers see the old or the new bytes, never a part."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write only if the key does not exist; True if this call wrote it."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with ``prefix``, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def read_pointer(self, name: str) -> tuple[bytes | None, str | None]:
        """The pointer's value and a version token (None, None when unset)."""

    @abstractmethod
    def swap_pointer(self, name: str, value: bytes, expected: str | None) -> bool:
        """Set the pointer if its version is still ``expected`` (None: must be unset); True on success."""

    def url(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{check_key(key)}"

    def presigned_url(self, key: str, expires_s: int = 7 * 24 * 3600) -> str | None:
        """A URL a browser can GET without credentials (e.g. an image in the Prefect UI), or None
        when this storage cannot give one (files on a worker's disk)."""
        return None

    def get_to_file(self, key: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(dest, self.get(key))
        return dest


def _fsync_dir(path: Path) -> None:
    """Make a rename/link/unlink in ``path`` durable: without it a crash can lose the new entry."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems (certain network and FUSE mounts) cannot fsync a directory.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """``mkdir -p`` that also fsyncs the parent of every folder it created."""
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
    for d in missing:
        _fsync_dir(d.parent)


def _write_temp(tmp_dir: Path, name: str, data: bytes) -> str:
    """A fully written and fsynced temp file in ``tmp_dir``; its path."""
    # Names are cut: a key's last part may be up to 255 bytes, the temp name adds ~14.
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=f".{name[:100]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def _atomic_write(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Temp file, fsync, rename over ``path``, fsync the folder: old or new bytes, never a part."""
    _make_dirs(path.parent)
    if tmp_dir is not None:
        _make_dirs(tmp_dir)
    tmp = _write_temp(tmp_dir or path.parent, path.name, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


# A temp file untouched this long belongs to a killed write: a live write of even a large model
# rewrites its temp file within seconds, so sweeping older ones never disturbs a running writer.
TEMP_MAX_AGE_S = 3600.0
# How often a long-lived FileStorage sweeps again (each sweep reads only the _tmp folder).
SWEEP_EVERY_S = 600.0
# Marks a store whose pre-_tmp layout (temp files next to their key) has been swept once.
_LEGACY_SWEPT = ".legacy-temp-swept"


class FileStorage(Storage):
    """A folder: one file per key, written atomically through ``<root>/_tmp``.

    Temp files live in one folder, so a killed write's leftovers are found without walking the
    tree: they are removed when a FileStorage opens the folder and every ``SWEEP_EVERY_S`` after,
    once older than ``TEMP_MAX_AGE_S``.
    """

    def __init__(self, root: str | Path, temp_max_age_s: float = TEMP_MAX_AGE_S):
        self.root = Path(root).resolve()
        self.uri = f"file://{self.root}"
        self.temp_max_age_s = temp_max_age_s
        self._tmp = self.root / TEMP_DIR
        self._last_sweep = 0.0
        self.sweep_temp()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _writable(self, key: str) -> Path:
        return self.root / check_writable_key(key)

    def sweep_temp(self, max_age_s: float | None = None) -> int:
        """Remove temp files of killed writes older than ``max_age_s``; how many were removed."""
        age = self.temp_max_age_s if max_age_s is None else max_age_s
        self._last_sweep = time.monotonic()
        if not self.root.is_dir():
            return 0
        cutoff = time.time() - age
        removed = freed = 0
        try:
            entries = list(os.scandir(self._tmp))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            removed, freed = self._drop_old_temp(entry, cutoff, removed, freed)
        if not (self._tmp / _LEGACY_SWEPT).exists():
            # Stores written before _tmp existed kept temp files next to their keys: walk the
            # tree for them once, then never again.
            for entry in self._walk(self.root):
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    removed, freed = self._drop_old_temp(entry, cutoff, removed, freed)
            with contextlib.suppress(OSError):
                _make_dirs(self._tmp)
                (self._tmp / _LEGACY_SWEPT).touch()
        if removed:
            log.info(
                "%s: removed %d temp file(s) of killed writes (%.1f MB)",
                self.uri,
                removed,
                freed / 1e6,
            )
        return removed

    @staticmethod
    def _drop_old_temp(
        entry: os.DirEntry[str], cutoff: float, removed: int, freed: int
    ) -> tuple[int, int]:
        if not entry.name.endswith(".tmp"):
            return removed, freed
        try:
            st = entry.stat(follow_symlinks=False)
            if st.st_mtime >= cutoff or not entry.is_file(follow_symlinks=False):
                return removed, freed
            os.unlink(entry.path)
        except FileNotFoundError:  # another process swept it first
            return removed, freed
        return removed + 1, freed + st.st_size

    def _temp_dir(self) -> Path:
        if time.monotonic() - self._last_sweep > SWEEP_EVERY_S:
            self.sweep_temp()
        _make_dirs(self._tmp)
        return self._tmp

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(key) from None

    def put(self, key: str, data: bytes) -> None:
        path = self._writable(key)
        _atomic_write(path, data, self._temp_dir())

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._writable(key)
        _make_dirs(path.parent)
        tmp = _write_temp(self._temp_dir(), path.name, data)
        try:
            # link() fails if the target exists: an atomic create-if-absent with full content.
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _fsync_dir(path.parent)
        return True

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    @staticmethod
    def _walk(top: Path | str) -> Iterator[os.DirEntry[str]]:
        """Every non-folder entry below ``top`` (hidden names too), without following links."""
        stack = [str(top)]
        while stack:
            try:
                it = os.scandir(stack.pop())
            except (FileNotFoundError, NotADirectoryError):
                continue
            with it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    else:
                        yield entry

    def list(self, prefix: str = "") -> list[str]:
        # Only the folder the prefix names is read: "ledger/00" scans ledger/ for names starting
        # with "00" and walks below those, never the images next to it.
        head, _, start = prefix.rpartition("/")
        parts = head.split("/") if head else []
        if prefix.startswith("/") or "\\" in prefix or any(p in ("", ".", "..") for p in parts):
            return []  # no valid key starts like this
        if parts and parts[0] in RESERVED:
            return []
        base = self.root.joinpath(*parts)
        try:
            it = os.scandir(base)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out: list[str] = []
        stack: list[tuple[str, str]] = []
        with it:
            for entry in it:
                name = entry.name
                if name.startswith(".") or not name.startswith(start):
                    continue
                if not parts and name in RESERVED:
                    continue
                key = f"{head}/{name}" if head else name
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, key))
                elif entry.is_file():
                    out.append(key)
        while stack:
            path, key_dir = stack.pop()
            try:
                sub = os.scandir(path)
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed while we listed
            with sub:
                for entry in sub:
                    if entry.name.startswith("."):
                        continue  # temp and lock files
                    key = f"{key_dir}/{entry.name}"
                    if entry.is_dir(follow_symlinks=False):
                        stack.append((entry.path, key))
                    elif entry.is_file():
                        out.append(key)
        return sorted(out)

    def delete(self, key: str) -> None:
        path = self._writable(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        path = self.root / POINTERS_DIR / check_key(name)
        _make_dirs(path.parent)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield path
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read_pointer(self, name: str) -> tuple[bytes | None, str | None]:
        path = self.root / POINTERS_DIR / check_key(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None, None
        return data, version_of(data)

    def swap_pointer(self, name: str, value: bytes, expected: str | None) -> bool:
        with self._locked(name) as path:
            try:
                current: str | None = version_of(path.read_bytes())
            except FileNotFoundError:
                current = None
            if current != expected:
                return False
            _atomic_write(path, value, self._temp_dir())
            return True


def open_storage(uri: str) -> Storage:
    """Open ``file://PATH`` (relative paths resolve against the working directory) or ``s3://bucket/prefix``."""
    if uri.startswith("file://"):
        return FileStorage(uri[len("file://") :] or ".")
    if uri.startswith("s3://"):
        return S3Storage.from_uri(uri)  # defined below; imports boto3 only when used
    raise ValueError(f"storage: unsupported URI {uri!r}; allowed: file://PATH, s3://BUCKET/PREFIX")


def _s3_endpoint_from_env() -> str | None:
    for name in ("FRESHNET_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return os.environ[name]
    return None


_CLIENTS: dict[tuple[object, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _s3_client(
    endpoint_url: str | None, region: str | None, attempts: int, timeout_s: float
) -> Any:
    """A boto3 S3 client, shared per process and settings (building one costs ~0.3 s)."""
    style = os.environ.get("FRESHNET_S3_ADDRESSING_STYLE", "path") if endpoint_url else None
    # Credentials from the environment are part of the key: a changed key must not reuse a client.
    creds = tuple(
        os.environ.get(n) for n in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_SESSION_TOKEN")
    )
    key = (os.getpid(), endpoint_url, region, attempts, timeout_s, style, creds)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            import boto3  # lazily: importing freshnet.storage must stay cheap
            from botocore.config import Config as BotoConfig

            conf = BotoConfig(
                retries={"max_attempts": attempts, "mode": "standard"},
                connect_timeout=min(timeout_s, 10.0),
                read_timeout=timeout_s,
                # Custom endpoints (moto, MinIO, an IP address) rarely resolve bucket subdomains.
                s3={"addressing_style": style} if style else None,
                max_pool_connections=32,  # ingest writes images from many threads
            )
            # A Session per client: boto3's default session is not thread-safe to create from.
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=conf
            )
            _CLIENTS[key] = client
    return client


# S3 error codes meaning "the key is not there" (GET and HEAD answer differently).
_MISSING = {"NoSuchKey", "404", "NotFound"}
# A conditional write lost: the precondition (If-None-Match / If-Match) did not hold.
_PRECONDITION = {"PreconditionFailed", "412"}
# S3 answers 409 when another conditional write on the same key is in flight; retrying resolves it.
_CONFLICT = {"ConditionalRequestConflict", "409"}


class S3Storage(Storage):
    """S3 backend (boto3): the same contract as FileStorage, using S3 conditional writes.

    ``put_if_absent`` is ``PutObject`` with ``If-None-Match: *``; a pointer lives at
    ``<prefix>/_pointers/<name>``, its version token is the object's ETag, and ``swap_pointer``
    is ``PutObject`` with ``If-Match: <etag>`` (or ``If-None-Match: *`` when it must be unset).
    Both are atomic on AWS S3 (since Aug/Nov 2024) and on S3-compatible servers that implement
    conditional writes. The endpoint comes from ``endpoint_url`` or FRESHNET_S3_ENDPOINT_URL /
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL; region and credentials from boto3's standard chain.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_attempts: int | None = None,
        timeout_s: float | None = None,
    ):
        if not bucket:
            raise ValueError("s3 storage: empty bucket name; use s3://BUCKET/PREFIX")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or _s3_endpoint_from_env()
        self.region = region or os.environ.get("FRESHNET_S3_REGION") or None
        # Few quick retries: a dead endpoint must fail a task fast, Prefect retries the task.
        self.max_attempts = max_attempts or int(os.environ.get("FRESHNET_S3_MAX_ATTEMPTS", "3"))
        self.timeout_s = timeout_s or float(os.environ.get("FRESHNET_S3_TIMEOUT_S", "30"))
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.page_size = 1000  # ListObjectsV2 keys per request (S3's maximum)
        self._client_obj: Any = None
        self._client_pid: int | None = None

    @classmethod
    def from_uri(cls, uri: str) -> S3Storage:
        """Open ``s3://BUCKET[/PREFIX]``."""
        if not uri.startswith("s3://"):
            raise ValueError(f"s3 storage: URI must start with s3://, got {uri!r}")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"s3 storage: no bucket in {uri!r}; use s3://BUCKET/PREFIX")
        return cls(bucket, prefix)

    def __getstate__(self) -> dict[str, Any]:
        # A boto3 client is neither picklable nor fork-safe: each process builds its own.
        state = self.__dict__.copy()
        state["_client_obj"] = None
        state["_client_pid"] = None
        return state

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"{self.uri} at {self.endpoint_url or 'the AWS S3 default endpoint'}"

    def _client(self) -> Any:
        if self._client_obj is None or self._client_pid != os.getpid():
            self._client_obj = _s3_client(
                self.endpoint_url, self.region, self.max_attempts, self.timeout_s
            )
            self._client_pid = os.getpid()
        return self._client_obj

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _pointer_key(self, name: str) -> str:
        return self._key(f"{POINTERS_DIR}/{check_key(name)}")

    @staticmethod
    def _code(exc: Exception) -> str:
        resp = getattr(exc, "response", None) or {}
        err = resp.get("Error") or {}
        code = str(err.get("Code") or "")
        status = str((resp.get("ResponseMetadata") or {}).get("HTTPStatusCode") or "")
        return code or status

    def _call(self, op: str, key: str, fn: Any, **kwargs: Any) -> Any:
        """Run one client call; turn transport and permission failures into StorageError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = self._code(exc)
            if code in _MISSING or code in _PRECONDITION or code in _CONFLICT:
                raise  # the caller decides what these mean
            if code == "NoSuchBucket":
                raise StorageError(
                    f"s3 storage: bucket {self.bucket!r} does not exist ({self._where}); "
                    "create it (infra/bootstrap.py) or fix the storage URI"
                ) from exc
            raise StorageError(f"s3 storage: {op} {key!r} failed in {self._where}: {exc}") from exc
        except BotoCoreError as exc:
            # Connection refused, timeouts, no credentials, bad endpoint URL, ...
            raise StorageError(f"s3 storage: {op} {key!r} failed, {self._where}: {exc}") from exc

    def _retry_conflicts(self, attempt: Callable[[], T]) -> T:
        """Call ``attempt()``; repeat while S3 reports a concurrent conditional write (409)."""
        from botocore.exceptions import ClientError

        delay = 0.05
        for _ in range(8):
            try:
                return attempt()
            except ClientError as exc:
                if self._code(exc) not in _CONFLICT:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        return attempt()

    # -- contract ---------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        k = self._key(key)
        try:
            resp = self._call("get", key, self._client().get_object, Key=k)
            body: bytes = resp["Body"].read()
            return body
        except ClientError as exc:
            if self._code(exc) in _MISSING:
                raise NotFound(key) from None
            raise StorageError(f"s3 storage: get {key!r} failed in {self._where}: {exc}") from exc

    def put(self, key: str, data: bytes) -> None:
        # A single PutObject is atomic: readers see the old or the new object, never a part.
        check_writable_key(key)
        self._call("put", key, self._client().put_object, Key=self._key(key), Body=data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        k = self._key(check_writable_key(key))

        def attempt() -> bool:
            try:
                self._call(
                    "put_if_absent",
                    key,
                    self._client().put_object,
                    Key=k,
                    Body=data,
                    IfNoneMatch="*",
                )
                return True
            except ClientError as exc:
                if self._code(exc) in _PRECONDITION:
                    return False
                raise

        try:
            return self._retry_conflicts(attempt)
        except ClientError as exc:
            raise StorageError(
                f"s3 storage: put_if_absent {key!r} failed in {self._where}: {exc}"
            ) from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call("exists", key, self._client().head_object, Key=self._key(key))
            return True
        except ClientError as exc:
            if self._code(exc) in _MISSING:
                return False
            raise StorageError(
                f"s3 storage: exists {key!r} failed in {self._where}: {exc}"
            ) from exc

    def list(self, prefix: str = "") -> list[str]:
        root = f"{self.prefix}/" if self.prefix else ""
        paginator = self._client().get_paginator("list_objects_v2")
        out: list[str] = []
        pages = self._call(
            "list",
            prefix,
            paginator.paginate,
            Prefix=root + prefix,
            PaginationConfig={"PageSize": self.page_size},
        )
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            for page in pages:  # pagination is lazy: errors surface while iterating
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(root) :]
                    if key.split("/", 1)[0] not in RESERVED:
                        out.append(key)
        except ClientError as exc:
            if self._code(exc) == "NoSuchBucket":
                raise StorageError(
                    f"s3 storage: bucket {self.bucket!r} does not exist ({self._where}); "
                    "create it (infra/bootstrap.py) or fix the storage URI"
                ) from exc
            raise StorageError(
                f"s3 storage: list {prefix!r} failed in {self._where}: {exc}"
            ) from exc
        except BotoCoreError as exc:
            raise StorageError(f"s3 storage: list {prefix!r} failed, {self._where}: {exc}") from exc
        return sorted(out)

    def delete(self, key: str) -> None:
        check_writable_key(key)
        self._call("delete", key, self._client().delete_object, Key=self._key(key))

    def read_pointer(self, name: str) -> tuple[bytes | None, str | None]:
        from botocore.exceptions import ClientError

        try:
            resp = self._call(
                "read_pointer", name, self._client().get_object, Key=self._pointer_key(name)
            )
        except ClientError as exc:
            if self._code(exc) in _MISSING:
                return None, None
            raise StorageError(
                f"s3 storage: read_pointer {name!r} failed in {self._where}: {exc}"
            ) from exc
        # Body and ETag come from the same GET, so the token matches the bytes returned.
        return resp["Body"].read(), resp["ETag"]

    def swap_pointer(self, name: str, value: bytes, expected: str | None) -> bool:
        from botocore.exceptions import ClientError

        k = self._pointer_key(name)
        cond = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}

        def attempt() -> bool:
            try:
                self._call(
                    "swap_pointer", name, self._client().put_object, Key=k, Body=value, **cond
                )
                return True
            except ClientError as exc:
                # 412: someone else moved it; 404 (If-Match on a deleted pointer): not what we saw.
                if self._code(exc) in _PRECONDITION or self._code(exc) in _MISSING:
                    return False
                raise

        try:
            return self._retry_conflicts(attempt)
        except ClientError as exc:
            raise StorageError(
                f"s3 storage: swap_pointer {name!r} failed in {self._where}: {exc}"
            ) from exc

    def get_to_file(self, key: str, dest: Path) -> Path:
        """Stream the object to ``dest`` (temp file + rename), for models too big to hold twice."""
        from botocore.exceptions import ClientError

        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            resp = self._call("get", key, self._client().get_object, Key=self._key(key))
        except ClientError as exc:
            if self._code(exc) in _MISSING:
                raise NotFound(key) from None
            raise StorageError(f"s3 storage: get {key!r} failed in {self._where}: {exc}") from exc
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in resp["Body"].iter_chunks(1 << 20):
                    f.write(chunk)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return dest

    def presigned_url(self, key: str, expires_s: int = 7 * 24 * 3600) -> str | None:
        """A presigned GET URL (SigV4 allows at most 7 days). It is signed for the host the browser
        uses: FRESHNET_S3_PUBLIC_ENDPOINT_URL when the workers reach S3 by another name."""
        import boto3
        from botocore.config import Config as BotoConfig

        public = os.environ.get("FRESHNET_S3_PUBLIC_ENDPOINT_URL") or self.endpoint_url
        style = os.environ.get("FRESHNET_S3_ADDRESSING_STYLE", "path") if public else None
        # SigV4 explicitly: boto3 may presign with SigV2, which AWS rejects in newer regions.
        conf = BotoConfig(
            signature_version="s3v4", s3={"addressing_style": style} if style else None
        )
        client = boto3.session.Session().client(
            "s3", endpoint_url=public, region_name=self.region, config=conf
        )
        url: str = client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=max(1, min(int(expires_s), 7 * 24 * 3600)),
        )
        return url

    def ensure_bucket(self) -> bool:
        """Create the bucket if missing (idempotent); True if this call created it."""
        from botocore.exceptions import ClientError

        client = self._client()
        try:
            self._call("head_bucket", "", client.head_bucket)
            return False
        except ClientError as exc:
            if self._code(exc) not in _MISSING and self._code(exc) != "NoSuchBucket":
                raise StorageError(
                    f"s3 storage: cannot check bucket in {self._where}: {exc}"
                ) from exc
        kwargs: dict[str, Any] = {}
        region = client.meta.region_name
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._call("create_bucket", "", client.create_bucket, **kwargs)
        except StorageError as exc:
            if "BucketAlreadyOwnedByYou" in str(exc):
                return False
            raise
        return True
