"""FileStorage: the storage contract on a local folder (``file://``), atomic through ``<root>/_tmp``."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from freshnet.storage import (
    POINTERS_DIR,
    RESERVED,
    TEMP_DIR,
    NotFound,
    Storage,
    atomic_write,
    check_key,
    check_writable_key,
    fsync_dir,
    make_dirs,
    version_of,
    write_temp,
)

log = logging.getLogger(__name__)

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
                make_dirs(self._tmp)
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
        make_dirs(self._tmp)
        return self._tmp

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(key) from None

    def put(self, key: str, data: bytes) -> None:
        path = self._writable(key)
        atomic_write(path, data, self._temp_dir())

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._writable(key)
        make_dirs(path.parent)
        tmp = write_temp(self._temp_dir(), path.name, data)
        try:
            # link() fails if the target exists: an atomic create-if-absent with full content.
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        fsync_dir(path.parent)
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
        fsync_dir(path.parent)

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        path = self.root / POINTERS_DIR / check_key(name)
        make_dirs(path.parent)
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
            atomic_write(path, value, self._temp_dir())
            return True
