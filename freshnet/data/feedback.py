"""Feedback intake: the app's corrections, each read once, bounded, and held for review.

The app writes one pair per correction to ``space.feedback_dir`` (a folder or
``s3://bucket/prefix``): ``<label>/<id>.jpg`` first, then ``<label>/<id>.json`` (so a listed
record has its image). A night reads only records no earlier night read (a cursor pointer in
storage), at most ``feedback.max_per_night`` of them, oldest first. Every field is bounded; a bad
record is skipped with a reason and never stops the night. The images go through ingest like any
other (normalised, content-addressed) and enter the catalog as status ``feedback``: out of train
and holdout until a reviewer accepts them (``freshnet feedback accept``); the snapshot then caps
their share of each class and split (``feedback.max_share``).

With ``space.feedback_repo`` the app commits its corrections to a Hub dataset repo instead
(huggingface_hub's CommitScheduler, ``feedback/<replica uuid>/<label>/<id>.{jpg,json}``); the
night reads the files it has not seen through huggingface_hub (freshnet/data/feedback_hub.py).
Both readers share the record checks and the cursor (feedback_records.py); the review queue is
feedback_review.py, and search.py joins this reader to the night's main source.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from freshnet.config import Config
from freshnet.data.feedback_hub import search_hub
from freshnet.data.feedback_records import (
    CURSOR,
    ID_RE,
    CursorConflict,
    Listed,
    Skip,
    failure_lines,
    load_cursor,
    take_each,
)
from freshnet.data.sources import Candidate, SearchReport, SourceError, finish_report
from freshnet.storage import Storage, StorageError
from freshnet.storage_open import open_storage
from freshnet.storage_s3 import S3Storage

log = logging.getLogger(__name__)

# Records may be listed late (several app replicas, clock skew): the cursor keeps the ids it read
# within this window of the newest one, and skips, unread, only ids older than that.
GRACE = timedelta(days=1)
MAX_FOLDERS = 256  # label folders examined (the app makes one per class)


# ---------------------------------------------------------------- where records live


class _FolderBox:
    def __init__(self, root: Path):
        self.root = root
        self.where = str(root)

    def exists(self) -> bool:
        return self.root.is_dir()

    def folders(self) -> list[str]:
        return sorted(
            e.name
            for e in os.scandir(self.root)
            if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
        )

    def list(self, folder: str, after: str) -> list[Listed]:
        sizes: dict[str, int] = {}
        for e in os.scandir(self.root / folder):
            if e.is_file(follow_symlinks=False):
                sizes[e.name] = e.stat(follow_symlinks=False).st_size
        return _pairs(folder, sizes, after)

    def read(self, rel: str, cap: int) -> bytes:
        with (self.root / rel).open("rb") as f:
            data = f.read(cap + 1)
        if len(data) > cap:
            raise Skip(f"{rel}: more than {cap} bytes")
        return data

    def image_url(self, rel: str) -> str:
        return (self.root / f"{rel}.jpg").as_uri()


class _S3Box:
    def __init__(self, store: S3Storage):
        self.store = store
        self.where = store.uri
        self.base = f"{store.prefix}/" if store.prefix else ""

    def _client(self) -> Any:
        return self.store._client()  # the store's configured client (endpoint, retries)

    def exists(self) -> bool:
        return True  # a missing bucket shows as a listing error

    def folders(self) -> list[str]:
        pages = (
            self._client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.store.bucket, Prefix=self.base, Delimiter="/")
        )
        out = []
        for page in pages:
            out += [
                p["Prefix"][len(self.base) :].rstrip("/") for p in page.get("CommonPrefixes", [])
            ]
            if len(out) > MAX_FOLDERS:
                break
        return sorted(out)

    def list(self, folder: str, after: str) -> list[Listed]:
        head = f"{self.base}{folder}/"
        pages = (
            self._client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.store.bucket, Prefix=head, StartAfter=head + after)
        )
        sizes = {}
        for page in pages:
            for obj in page.get("Contents", []):
                name = obj["Key"][len(head) :]
                if "/" not in name:
                    sizes[name] = int(obj["Size"])
        return _pairs(folder, sizes, after)

    def read(self, rel: str, cap: int) -> bytes:
        return _s3_read(self.store, f"{self.base}{rel}", cap)

    def image_url(self, rel: str) -> str:
        return f"s3://{self.store.bucket}/{self.base}{rel}.jpg"


def _pairs(folder: str, sizes: dict[str, int], after: str) -> list[Listed]:
    out = []
    for name, size in sizes.items():
        fid, dot, ext = name.rpartition(".")
        if dot and ext == "json" and ID_RE.match(fid) and fid > after:
            out.append(Listed(folder, fid, size, sizes.get(f"{fid}.jpg")))
    return out


def _s3_read(store: S3Storage, key: str, cap: int) -> bytes:
    """At most cap bytes of an object (a ranged GET, so a huge object is never downloaded)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        resp = store._client().get_object(Bucket=store.bucket, Key=key, Range=f"bytes=0-{cap}")
        data: bytes = resp["Body"].read(cap + 1)
    except ClientError as exc:
        code = store._code(exc)
        if code in ("NoSuchKey", "404"):
            raise FileNotFoundError(f"s3://{store.bucket}/{key} does not exist") from None
        raise OSError(f"s3://{store.bucket}/{key}: {code or exc}") from None
    except BotoCoreError as exc:
        raise OSError(f"s3://{store.bucket}/{key}: {exc}") from None
    if len(data) > cap:
        raise Skip(f"s3://{store.bucket}/{key}: more than {cap} bytes")
    return data


def _box(where: str) -> _FolderBox | _S3Box:
    if where.startswith("s3://"):
        store = open_storage(where)
        assert isinstance(store, S3Storage)
        return _S3Box(store)
    return _FolderBox(Path(where).expanduser().resolve())


def location(cfg: Config) -> str:
    """Where the app writes corrections: source.path when feedback is the main source."""
    if cfg.source.kind == "feedback" and cfg.source.path:
        return cfg.source.path
    return cfg.space.feedback_dir


def is_stored_image(url: str, source: str) -> bool:
    """A feedback image ingest reads from S3 (not fetched over HTTP)."""
    return source == "feedback" and url.startswith("s3://")


def read_stored_image(url: str, max_bytes: int) -> tuple[str, str, bytes | None]:
    """(status, detail, bytes) of a feedback image in S3, as ingest's local reads report them."""
    bucket, _, key = url[len("s3://") :].partition("/")
    try:
        return "ok", "", _s3_read(S3Storage(bucket), key, max_bytes)
    except FileNotFoundError as exc:
        return "missing_file", str(exc), None
    except Skip as exc:
        return "too_large", f"{exc} > max_bytes {max_bytes}", None
    except (OSError, StorageError) as exc:
        return "connection_error", str(exc), None


# ---------------------------------------------------------------- the night's read


def _floor(fid: str) -> str:
    when = datetime.strptime(fid[:15], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    return (when - GRACE).strftime("%Y%m%dT%H%M%S")


def _read_once(
    cfg: Config, night: str, box: _FolderBox | _S3Box, store: Storage
) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """One pass: list, read what no other night read, move the cursor (compare-and-swap)."""
    fb = cfg.feedback
    classes = {c.replace("/", "_"): c for c in cfg.classes}  # the app's folder name per class
    cursor, token = load_cursor(store)
    mine = cursor["sources"].get(box.where) or {"floor": "", "seen": {}}
    floor, seen = str(mine.get("floor", "")), dict(mine.get("seen", {}))
    folders = box.folders()
    notes: list[str] = []
    if len(folders) > MAX_FOLDERS:
        notes.append(f"{len(folders)}+ folders in {box.where}: only the first {MAX_FOLDERS} read")
        folders = folders[:MAX_FOLDERS]
    listed = sorted(
        (i for f in folders for i in box.list(f, floor)), key=lambda i: (i.fid, i.folder)
    )
    todo = [i for i in listed if seen.get(i.rel, night) == night]
    waiting = max(0, len(todo) - fb.max_per_night)
    tonight = todo[: fb.max_per_night]
    candidates, skipped, retry = take_each(box, tonight, classes, cfg, box.where, (OSError,), str)
    unread = set(retry)  # unreadable ones stay unseen: tried again next night
    for item in tonight:
        if item.rel not in unread:
            seen[item.rel] = night
    # Advance past what earlier nights read; tonight's reads stay listed so a retried night
    # rereads exactly them.
    earlier = [rel.rpartition("/")[2] for rel, n in seen.items() if n != night]
    if earlier:
        floor = max(floor, _floor(max(earlier)))
    seen = {rel: n for rel, n in seen.items() if rel.rpartition("/")[2] > floor}
    cursor["sources"][box.where] = {"floor": floor, "seen": seen}
    if not store.swap_pointer(CURSOR, json.dumps(cursor, sort_keys=True).encode(), token):
        raise CursorConflict
    return candidates, failure_lines(
        box.where, len(todo) - waiting, waiting, candidates, skipped, notes, fb
    )


def _io_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (OSError, StorageError, BotoCoreError, ClientError)


def search(
    cfg: Config,
    night: str,
    required: bool = False,
    store: Storage | None = None,
    token: str | None = None,
) -> SearchReport:
    """Tonight's unread feedback as candidates (source "feedback"); bad records are failures.

    ``required`` (feedback is the main source): a missing folder (without a feedback repo) is an
    error and classes without a candidate are reported. Otherwise an unreachable feedback
    location is one failure line. With space.feedback_repo the dataset repo is read too;
    ``token`` is its token read at run time by the caller (default: FRESHNET_FEEDBACK_TOKEN).
    """
    where = location(cfg)
    box = _box(where)
    hub: tuple[list[Candidate], list[dict[str, Any]]] = ([], [])
    if cfg.space.feedback_repo:
        store = store or open_storage(cfg.storage)
        hub = search_hub(cfg, str(night), store, token, required)
    if not box.exists():
        if required and not cfg.space.feedback_repo:
            raise SourceError(f"{box.where}: feedback folder does not exist")
        if required:
            return finish_report(cfg, *hub)
        return SearchReport(*hub, [])
    store = store or open_storage(cfg.storage)
    for _ in range(5):
        try:
            candidates, failures = _read_once(cfg, str(night), box, store)
            break
        except CursorConflict:
            continue
        except _io_errors() as exc:
            if required:
                raise SourceError(f"{box.where}: feedback unreadable: {exc}") from None
            log.warning("feedback from %s unreadable: %s", box.where, exc)
            return SearchReport(
                [], [{"label": "", "query": "feedback", "reason": f"{box.where}: {exc}"}], []
            )
    else:
        raise SourceError("feedback cursor kept changing under this night (another run?); rerun")
    candidates, failures = hub[0] + candidates, hub[1] + failures
    if required:
        return finish_report(cfg, candidates, failures)
    return SearchReport(candidates, failures, [])
