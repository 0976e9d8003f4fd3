"""Storage: a small key/value contract with atomic writes, put-if-absent and a compare-and-swap pointer.

Keys are '/'-separated relative paths ("images/ab/abcd.jpg"). Two backends implement it:
``file://`` (embedded default) and ``s3://`` (boto3, endpoint configurable).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


class NotFound(KeyError):
    """The key does not exist in storage."""


class StorageError(RuntimeError):
    """Storage is unreachable or refused the operation."""


def check_key(key: str) -> str:
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}: use a relative path like 'images/ab/cd.jpg'")
    return key


def version_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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

    def get_to_file(self, key: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(dest, self.get(key))
        return dest


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class FileStorage(Storage):
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(key) from None

    def put(self, key: str, data: bytes) -> None:
        _atomic_write(self._path(key), data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            # link() fails if the target exists: an atomic create-if-absent with full content.
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.exists():
            return []
        out = []
        for p in self.root.rglob("*"):
            if p.is_file() and not p.name.startswith("."):
                key = p.relative_to(self.root).as_posix()
                if key.startswith(prefix) and not key.startswith("_pointers/"):
                    out.append(key)
        return sorted(out)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        path = self.root / "_pointers" / check_key(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield path
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read_pointer(self, name: str) -> tuple[bytes | None, str | None]:
        path = self.root / "_pointers" / check_key(name)
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
            _atomic_write(path, value)
            return True


def open_storage(uri: str) -> Storage:
    """Open ``file://PATH`` (relative paths resolve against the working directory) or ``s3://bucket/prefix``."""
    if uri.startswith("file://"):
        return FileStorage(uri[len("file://") :] or ".")
    if uri.startswith("s3://"):
        return S3Storage.from_uri(uri)  # defined below; imports boto3 only when used
    raise ValueError(f"storage: unsupported URI {uri!r}; allowed: file://PATH, s3://BUCKET/PREFIX")


class S3Storage(Storage):
    """S3 backend (boto3). Implemented in the served-mode work; see issue 7."""

    @classmethod
    def from_uri(cls, uri: str) -> S3Storage:
        raise NotImplementedError("s3:// storage is not implemented yet")
