"""The storage contract: key rules, errors, the Storage interface and durable local writes.

Keys are '/'-separated relative paths ("images/ab/abcd.jpg"). Backends: ``FileStorage``
(freshnet/storage_file.py, ``file://``, the embedded default) and ``S3Storage``
(freshnet/storage_s3.py, ``s3://``); ``open_storage`` (freshnet/storage_open.py) picks one by
URI. Keys under ``_pointers/`` and ``_tmp/`` belong to the storage: put/delete refuse them
(ReservedKey) and list() never shows them; pointers change only through ``swap_pointer``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path


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
        atomic_write(dest, self.get(key))
        return dest


def fsync_dir(path: Path) -> None:
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


def make_dirs(path: Path) -> None:
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
        fsync_dir(d.parent)


def write_temp(tmp_dir: Path, name: str, data: bytes) -> str:
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


def atomic_write(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Temp file, fsync, rename over ``path``, fsync the folder: old or new bytes, never a part."""
    make_dirs(path.parent)
    if tmp_dir is not None:
        make_dirs(tmp_dir)
    tmp = write_temp(tmp_dir or path.parent, path.name, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
