"""Ingest candidates: download concurrently, normalize in worker processes, store content-addressed.

Every candidate ends as one ``Outcome``: ``accepted`` or a reason code (see download.py and
images.py, plus ``duplicate_url``, ``bad_url``, ``missing_file`` and ``normalizer_crashed``).
Images are written with ``put_if_absent`` at ``images/<sha[:2]>/<sha>.jpg``, so nothing stored
earlier is ever overwritten. Memory stays bounded: at most ``2 * download.concurrency`` raw bodies
exist at any time, whatever the number of candidates, and the images being decoded at once never
need more than one decode budget together (``images.decode_budget``), whatever the number of
workers: each image's cost is read from its header before it goes to a worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import os
import sys
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from freshnet.config import Config
from freshnet.config_sections import ImagesConfig
from freshnet.data.download import Downloader
from freshnet.data.feedback import is_stored_image, read_stored_image
from freshnet.data.images import (
    ImageRejected,
    Normalized,
    decode_budget,
    header_cost,
    image_key,
    normalize,
)
from freshnet.data.process_pool import start_process_pool
from freshnet.data.sources import Candidate
from freshnet.data.url_guard import normalize_url
from freshnet.storage import Storage
from freshnet.storage_file import FileStorage

log = logging.getLogger(__name__)


class _Progress(Protocol):
    """What ingest reports progress to: a tqdm bar or a _Reporting wrapper around one."""

    def update(self, n: int = 1) -> object: ...


# Below this many downloads a process pool costs more to start than it saves.
_THREAD_POOL_BELOW = 24


@dataclass
class Outcome:
    label: str
    url: str
    query: str
    source: str
    status: str  # "accepted" or a reason code
    detail: str = ""
    sha256: str | None = None
    orig_sha256: str | None = None
    phash: str | None = None
    width: int | None = None
    height: int | None = None
    stored: bool = False  # True if this run wrote the image (False: it was already stored)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Outcome:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def count_outcomes(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    """{label: {status: count}} with statuses sorted, accepted first."""
    per: dict[str, Counter[str]] = {}
    for o in outcomes:
        per.setdefault(o.label, Counter())[o.status] += 1
    out = {}
    for label in sorted(per):
        c = per[label]
        keys = sorted(c, key=lambda s: (s != "accepted", s))
        out[label] = {k: c[k] for k in keys}
    return out


_WORKER_STORES: dict[str, FileStorage] = {}


def _normalize_job(
    data: bytes, cfg: ImagesConfig, store_root: str | None
) -> tuple[Normalized | ImageRejected, bool | None]:
    """Runs in a worker: normalize, and for file storage also write the image there (saves
    shipping the bytes back); rejections are returned, not raised, so they pickle cheaply."""
    try:
        result = normalize(data, cfg)
    except ImageRejected as exc:
        return exc, None
    except Exception as exc:  # noqa: BLE001 - a Pillow bug on hostile input is still a bad image
        return ImageRejected("decode_error", f"{type(exc).__name__}: {exc}"), None
    if store_root is None:
        return result, None
    store = _WORKER_STORES.get(store_root)
    if store is None:
        store = _WORKER_STORES[store_root] = FileStorage(store_root)
    wrote = store.put_if_absent(image_key(result.sha256), result.data)
    result.data = b""
    return result, wrote


class _DecodeBudget:
    """Bytes of decoding memory in flight across all workers, granted first come, first served
    (so a large image is not starved by a stream of small ones)."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self.waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, n: int) -> int:
        if n > self.total or n <= 0:
            return 0  # the worker rejects it from the header without decoding: nothing to hold
        if not self.waiters and self.used + n <= self.total:
            self.used += n
            return n
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self.waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted just as we were cancelled
            else:
                self.waiters.remove(entry)
            raise
        return n

    def release(self, n: int) -> None:
        self.used -= n
        while self.waiters and self.used + self.waiters[0][0] <= self.total:
            n0, fut = self.waiters.popleft()
            self.used += n0
            fut.set_result(None)


def _read_local(path: Path, max_bytes: int) -> tuple[str, str, bytes | None]:
    try:
        size = path.stat().st_size
    except OSError as exc:
        return "missing_file", f"{path}: {exc.strerror or exc}", None
    if not path.is_file():
        return "missing_file", f"{path}: not a regular file", None
    if size > max_bytes:
        return "too_large", f"{path}: {size} bytes > max_bytes {max_bytes}", None
    with path.open("rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        return "too_large", f"{path}: grew past max_bytes {max_bytes}", None
    return "ok", "", data


def _interleave_by_host(jobs: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Round-robin over hosts, so a host with many URLs does not hold every worker at its limit."""
    groups: dict[str, deque[tuple[int, str]]] = {}
    for job in jobs:
        groups.setdefault(urlsplit(job[1]).netloc, deque()).append(job)
    out: list[tuple[int, str]] = []
    queues = list(groups.values())
    while queues:
        for q in queues:
            out.append(q.popleft())
        queues = [q for q in queues if q]
    return out


class _Pool:
    """The normalizer pool, recreated if a worker dies (e.g. killed by the OOM killer)."""

    def __init__(self, jobs: int, workers: int):
        self.workers = workers
        self.threads = jobs < _THREAD_POOL_BELOW
        self.executor = self._make()

    def _make(self) -> cf.Executor:
        if self.threads:
            return cf.ThreadPoolExecutor(self.workers, thread_name_prefix="freshnet-normalize")
        # The server imports the normalizer once and forks every worker from it.
        return start_process_pool(self.workers, __name__)

    async def run(
        self, data: bytes, cfg: ImagesConfig, store_root: str | None
    ) -> tuple[Normalized | ImageRejected, bool | None]:
        loop = asyncio.get_running_loop()
        executor = self.executor
        try:
            return await loop.run_in_executor(executor, _normalize_job, data, cfg, store_root)
        except cf.process.BrokenProcessPool as exc:
            if self.executor is executor:
                log.error("normalizer pool broke (%s); starting a new one", exc)
                executor.shutdown(wait=False, cancel_futures=True)
                self.executor = self._make()
            return ImageRejected("normalizer_crashed", f"worker process died: {exc}"), None

    def close(self) -> None:
        # No wait: worker teardown (scipy, numpy) takes a second and nothing is pending by now.
        self.executor.shutdown(wait=False, cancel_futures=True)


async def _ingest_async(
    candidates: list[Candidate], cfg: Config, store: Storage, bar: _Progress
) -> list[Outcome]:
    n = len(candidates)
    outcomes: list[Outcome | None] = [None] * n

    def done(i: int, status: str, detail: str = "", **kw: Any) -> None:
        c = candidates[i]
        outcomes[i] = Outcome(c.label, c.url, c.query, c.source, status, detail, **kw)
        bar.update(1)

    # Normalize and de-duplicate URLs before any request.
    seen: dict[str, int] = {}
    jobs: list[tuple[int, str]] = []
    for i, c in enumerate(candidates):
        try:
            # Feedback kept in S3 is read through the S3 API, not fetched over HTTP.
            url = c.url if is_stored_image(c.url, c.source) else normalize_url(c.url)
        except ValueError as exc:
            done(i, "bad_url", str(exc))
            continue
        if url in seen:
            done(
                i,
                "duplicate_url",
                f"same URL as candidate #{seen[url]} ({candidates[seen[url]].label})",
            )
            continue
        seen[url] = i
        jobs.append((i, url))
    if not jobs:
        return outcomes  # type: ignore[return-value]

    jobs = _interleave_by_host(jobs)
    workers = cfg.download.workers or os.cpu_count() or 1
    pool = _Pool(len(jobs), workers)
    images_cfg = cfg.images
    budget = _DecodeBudget(decode_budget(images_cfg))
    max_bytes = cfg.download.max_bytes
    # Workers write to file storage themselves; other backends are written from here.
    store_root = str(store.root) if type(store) is FileStorage else None

    async def handle(dl: Downloader, i: int, url: str) -> None:
        c = candidates[i]
        if is_stored_image(url, c.source):
            status, detail, data = await asyncio.to_thread(read_stored_image, url, max_bytes)
        elif url.startswith("file://"):
            if c.source not in ("folder", "feedback"):
                done(i, "bad_url", "file:// URLs are read only for the folder and feedback sources")
                return
            path = Path(unquote(urlsplit(url).path))
            status, detail, data = await asyncio.to_thread(_read_local, path, max_bytes)
        else:
            fetched = await dl.fetch(url)
            status, detail, data = fetched.status, fetched.detail, fetched.data
            fetched.data = None
        if status != "ok" or data is None:
            done(i, status, detail)
            return
        held = await budget.acquire(header_cost(data, images_cfg.max_side))
        try:
            result, wrote = await pool.run(data, images_cfg, store_root)
        finally:
            budget.release(held)
        del data
        if isinstance(result, ImageRejected):
            done(i, result.reason, result.detail)
            return
        if wrote is None:
            wrote = await asyncio.to_thread(
                store.put_if_absent, image_key(result.sha256), result.data
            )
        done(
            i,
            "accepted",
            sha256=result.sha256,
            orig_sha256=result.orig_sha256,
            phash=result.phash,
            width=result.width,
            height=result.height,
            stored=wrote,
        )

    it = iter(jobs)

    async def worker(dl: Downloader) -> None:
        # A fixed set of workers pulling from one iterator bounds the bodies held in memory.
        for i, url in it:
            await handle(dl, i, url)

    try:
        async with Downloader(cfg.download) as dl:
            n_workers = min(len(jobs), 2 * cfg.download.concurrency)
            await asyncio.gather(*(worker(dl) for _ in range(n_workers)))
    finally:
        await asyncio.to_thread(pool.close)
    return outcomes  # type: ignore[return-value]


class _Reporting:
    """The progress bar, also reporting each step to a callback (e.g. the Prefect UI)."""

    def __init__(self, bar: Any, total: int, report: Callable[[int, int], None]) -> None:
        self.bar, self.total, self.report, self.done = bar, total, report, 0

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.done += n
        self.report(self.done, self.total)


def ingest(
    candidates: list[Candidate],
    cfg: Config,
    store: Storage,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Outcome]:
    """Download, validate, normalize and store every candidate; one Outcome per candidate, in order.

    ``progress`` shows a terminal bar; ``on_progress(done, total)`` is called as each one ends.
    """
    from tqdm import tqdm

    with tqdm(
        total=len(candidates),
        desc="ingest",
        unit="url",
        file=sys.stderr,
        disable=not progress,
        mininterval=0.5,
    ) as bar:
        counter = bar if on_progress is None else _Reporting(bar, len(candidates), on_progress)
        coro_args = (list(candidates), cfg, store, counter)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            outcomes = asyncio.run(_ingest_async(*coro_args))
        else:
            # Called from inside an event loop (e.g. an async task runner): run on a fresh thread.
            with cf.ThreadPoolExecutor(1) as ex:
                outcomes = ex.submit(asyncio.run, _ingest_async(*coro_args)).result()
    counts = Counter(o.status for o in outcomes)
    log.info("ingested %d candidates: %s", len(outcomes), dict(sorted(counts.items())))
    return outcomes
