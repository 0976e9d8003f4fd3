"""The training stage's decoded-image cache: each image decoded and resized once, kept as uint8 rows.

One cache per stored size and resize method (``<root>/<method>-<size>/``):

- ``rows.u8``: N x size x size x 3 uint8 pixels (HWC, RGB), read through a memory map; rows are
  only ever appended, a committed row is never written again.
- ``index.npy``: one record per committed row: the sha256 of the source bytes it was decoded from,
  its row number, the CRC-32 of its pixels and the source size. Replaced atomically, and only
  after the appended rows are on disk, so a half-written append never becomes a valid row.

A row is served for a sha only when it was decoded from bytes whose sha256 is that sha (checked
at decode time) and its pixels still match their CRC (checked each time a training opens the
cache); a row failing the check is decoded again into a new row. Another night's images extend
the same cache: only shas it does not hold are decoded.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

log = logging.getLogger(__name__)

ResizeMethod = Literal["squish", "crop", "pad"]
ROWS_FILE = "rows.u8"
INDEX_FILE = "index.npy"
LOCK_FILE = "lock"


class PixelCacheError(RuntimeError):
    """An image cannot be cached (missing, undecodable, or its bytes do not match its sha256)."""


def _index_dtype() -> np.dtype[np.void]:
    import numpy as np

    return np.dtype([("sha", "S32"), ("row", "<i8"), ("crc", "<u4"), ("src_size", "<i8")])


def _sha_hex(value: bytes) -> str:
    """The hex sha256 of an index record: numpy's ``S32`` drops trailing NUL bytes on read, so a
    digest ending in 00 must be padded back to 32 bytes."""
    return bytes(value).ljust(32, b"\0").hex()


def stored_size(image_size: int, margin: float) -> int:
    """The side rows are stored at: the training size plus a margin that random crops cut into."""
    return max(int(image_size), int(round(image_size * margin)))


def decode_row(data: bytes, size: int, method: ResizeMethod) -> np.ndarray:
    """JPEG/PNG bytes -> size x size x 3 uint8, resized the way fastai's ``Resize`` does on validation."""
    import io

    import numpy as np
    from PIL import Image

    # PILImage.create's loader: RGB, no EXIF transpose (ingest stores images already upright).
    with Image.open(io.BytesIO(data)) as im:
        img = im.convert("RGB")
    w, h = img.size
    if method == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if method == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        arr = np.asarray(img.resize((nw, nh), Image.Resampling.BILINEAR))
        top, left = (size - nh) // 2, (size - nw) // 2
        # Reflection padding, as fastai's Resize(method='pad') defaults to.
        mode: Literal["reflect", "edge"] = "reflect" if min(nh, nw) > 1 else "edge"
        arr = np.pad(arr, ((top, size - nh - top), (left, size - nw - left), (0, 0)), mode=mode)
        return np.ascontiguousarray(arr, dtype=np.uint8)
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


@dataclass
class UpdateStats:
    decoded: int = 0  # images decoded tonight (new shas and rebuilt rows)
    reused: int = 0  # rows served as they were
    rebuilt: int = 0  # rows whose pixels failed their check and were decoded again
    seconds: float = 0.0


class PixelCache:
    """Decoded training images of one stored size and resize method, by sha256."""

    def __init__(self, root: Path, size: int, method: ResizeMethod = "squish"):
        if method not in ("squish", "crop", "pad"):
            raise ValueError(f"resize method {method!r} is not one of squish, crop, pad")
        self.size = int(size)
        self.method = method
        self.dir = Path(root) / f"{method}-{self.size}"
        self.row_bytes = self.size * self.size * 3

    # ---- files --------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (two trainings on one machine share the cache)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / LOCK_FILE, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def read_index(self) -> np.ndarray:
        """The committed rows' records (an empty array for a new cache)."""
        import numpy as np

        path = self.dir / INDEX_FILE
        if not path.exists():
            return np.zeros(0, dtype=_index_dtype())
        try:
            index: np.ndarray = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            # Written by os.replace, so only outside damage gets here: start over, losing no data
            # that is not in storage anyway.
            log.warning("pixel cache index %s is unreadable (%s); rebuilding the cache", path, exc)
            return np.zeros(0, dtype=_index_dtype())
        if index.dtype != _index_dtype():
            log.warning("pixel cache index %s has another layout; rebuilding the cache", path)
            return np.zeros(0, dtype=_index_dtype())
        return index

    def _write_index(self, index: np.ndarray) -> None:
        import numpy as np

        tmp = self.dir / (INDEX_FILE + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, index, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / INDEX_FILE)

    def rows(self) -> np.ndarray:
        """The pixel rows as a read-only memory map (N x size x size x 3)."""
        index = self.read_index()
        return self._map(int(index["row"].max()) + 1 if len(index) else 0)

    def _map(self, n_rows: int) -> np.ndarray:
        import numpy as np

        if n_rows == 0:
            return np.zeros((0, self.size, self.size, 3), dtype=np.uint8)
        return np.memmap(
            self.dir / ROWS_FILE, dtype=np.uint8, mode="r", shape=(n_rows, self.size, self.size, 3)
        )

    # ---- building -----------------------------------------------------------------------------

    def _decode(self, sha: str, path: Path) -> tuple[np.ndarray, int]:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise PixelCacheError(f"image {sha} cannot be read from {path}: {exc}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha:
            # Caching these pixels under ``sha`` would serve another image for it.
            raise PixelCacheError(
                f"image file {path} does not hold image {sha} (its bytes hash to {actual}); "
                f"delete the file so that it is fetched again"
            )
        try:
            return decode_row(data, self.size, self.method), len(data)
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
            raise PixelCacheError(f"image {sha} at {path} cannot be decoded: {exc}") from None

    def update(
        self, shas: Iterable[str], path_for: Callable[[str], Path], workers: int | None = None
    ) -> tuple[np.ndarray, UpdateStats]:
        """Make sure every sha has a valid row; return their row numbers (in order) and stats.

        ``path_for(sha)`` is the source image file of a sha. Only shas without a valid row are
        decoded; their rows are appended, then the index is committed.
        """
        import time

        import numpy as np

        start = time.perf_counter()
        shas = list(shas)
        stats = UpdateStats()
        with self._locked():
            index = self.read_index()
            n_rows = int(index["row"].max()) + 1 if len(index) else 0
            rows_path = self.dir / ROWS_FILE
            if n_rows and (
                not rows_path.exists() or rows_path.stat().st_size < n_rows * self.row_bytes
            ):
                log.warning("pixel cache %s lost rows its index lists; rebuilding it", self.dir)
                index, n_rows = index[:0], 0
            where = {_sha_hex(r["sha"]): i for i, r in enumerate(index)}
            arr = self._map(n_rows)
            wanted = list(dict.fromkeys(shas))
            held = [(sha, where[sha]) for sha in wanted if sha in where]
            n_workers = workers or min(8, len(os.sched_getaffinity(0)))
            # zlib releases the GIL on large buffers: checking 100k rows takes seconds, not 15 s.
            rows_held = [int(index[i]["row"]) for _, i in held]
            with ThreadPoolExecutor(max_workers=n_workers) as pool:
                crcs = list(pool.map(lambda r: zlib.crc32(arr[r].data), rows_held))
            bad: set[int] = set()
            for (sha, i), crc in zip(held, crcs, strict=True):
                if crc == int(index[i]["crc"]):
                    stats.reused += 1
                    continue
                log.warning(
                    "pixel cache row %d (%s) is corrupt; decoding it again",
                    int(index[i]["row"]),
                    sha,
                )
                bad.add(i)
                stats.rebuilt += 1
            todo = [sha for sha in wanted if sha not in where or where[sha] in bad]
            if todo:
                index = self._append(index, n_rows, todo, path_for, workers, bad)
                stats.decoded = len(todo)
        where = {_sha_hex(r["sha"]): int(r["row"]) for r in index}
        stats.seconds = time.perf_counter() - start
        log.info(
            "pixel cache %s: %d decoded (%d rebuilt), %d reused, %.1f s",
            self.dir,
            stats.decoded,
            stats.rebuilt,
            stats.reused,
            stats.seconds,
        )
        return np.array([where[s] for s in shas], dtype=np.int64), stats

    def _append(
        self,
        index: np.ndarray,
        n_rows: int,
        todo: list[str],
        path_for: Callable[[str], Path],
        workers: int | None,
        bad: set[int],
    ) -> np.ndarray:
        import numpy as np

        rows_path = self.dir / ROWS_FILE
        # Bytes past the committed rows are a crashed append's leftovers: drop them.
        with open(rows_path, "ab"):
            pass
        os.truncate(rows_path, n_rows * self.row_bytes)
        workers = workers or min(8, len(os.sched_getaffinity(0)))
        new = np.zeros(len(todo), dtype=_index_dtype())
        # Pillow releases the GIL while decoding and resizing, so threads use every core.
        with ThreadPoolExecutor(max_workers=workers) as pool, open(rows_path, "r+b") as f:
            f.seek(n_rows * self.row_bytes)
            decoded = pool.map(lambda s: self._decode(s, path_for(s)), todo)
            for k, (sha, (pixels, src_size)) in enumerate(zip(todo, decoded, strict=True)):
                f.write(pixels.tobytes())
                new[k] = (bytes.fromhex(sha), n_rows + k, zlib.crc32(pixels.data), src_size)
            f.flush()
            os.fsync(f.fileno())
        keep = np.ones(len(index), dtype=bool)
        replaced = {bytes(index[i]["sha"]) for i in bad}
        for i, rec in enumerate(index):
            if bytes(rec["sha"]) in replaced:
                keep[i] = False
        index = np.concatenate([index[keep], new])
        self._write_index(index)
        return index


class CachedImages:
    """Training items over a pixel cache: rows (int64), their labels (int64), and the class names.

    fastai's DataLoader reads ``vocab``/``c``/``n_inp`` off its dataset; the batch is built by
    gathering whole rows from the memory map at once.
    """

    n_inp = 1

    def __init__(self, pixels: np.ndarray, rows: np.ndarray, labels: np.ndarray, vocab: list[str]):
        self.pixels, self.rows, self.labels = pixels, rows, labels
        self.vocab = list(vocab)
        self.c = len(self.vocab)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> int:
        return int(i)

    def gather(self, idxs: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (B x H x W x 3 uint8) and labels of items ``idxs``."""
        import numpy as np

        idxs = np.asarray(idxs, dtype=np.int64)
        rows = self.rows[idxs]
        # Reading in row order turns random access into forward reads of the file.
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self.pixels.shape[1:]), dtype=np.uint8)
        out[order] = self.pixels[rows[order]]
        return out, self.labels[idxs]
