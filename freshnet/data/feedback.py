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
night reads the files it has not seen through huggingface_hub (see ``_hub_read_once``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freshnet.config import Config
from freshnet.data import sources
from freshnet.data.sources import Candidate, SearchReport, SourceError, _finish
from freshnet.redact import redact
from freshnet.storage import S3Storage, Storage, StorageError, open_storage

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

# The app's id: UTC time of the correction and 8 random hex digits. Ids sort by time, which the
# cursor relies on; anything else in the folder is not a record (and is never read).
ID_RE = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{8}$")
CURSOR = "feedback-cursor"
# Records may be listed late (several app replicas, clock skew): the cursor keeps the ids it read
# within this window of the newest one, and skips, unread, only ids older than that.
GRACE = timedelta(days=1)
MAX_REPORTED = 20  # skip reasons listed one by one per night; the rest are counted
MAX_FOLDERS = 256  # label folders examined (the app makes one per class)
MAX_TEXT = 200  # characters in any text field of a record
STATUS = "feedback"  # catalog status of an image waiting for review
HUB_FOLDER = "feedback"  # the app's folder in the dataset repo: <replica>/<label>/<id>.*
REPLICA_RE = re.compile(r"^[0-9a-f]{32}$")  # the app's replica folder (a uuid4 hex)
TOKEN_ENV = "FRESHNET_FEEDBACK_TOKEN"  # the nightly's token for the dataset (or a Secret block)
STAGED = "feedback-hub"  # storage prefix of the Hub's images, read by ingest like S3 feedback


class FeedbackError(ValueError):
    """A feedback review command names an unknown image or one not waiting for review."""


@dataclass(frozen=True)
class _Listed:
    folder: str
    fid: str
    json_size: int | None  # None: unknown until read
    image_size: int | None  # None: the image is missing

    @property
    def rel(self) -> str:
        return f"{self.folder}/{self.fid}"


class _Skip(Exception):
    """This record is not taken; the message says why."""


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

    def list(self, folder: str, after: str) -> list[_Listed]:
        sizes: dict[str, int] = {}
        for e in os.scandir(self.root / folder):
            if e.is_file(follow_symlinks=False):
                sizes[e.name] = e.stat(follow_symlinks=False).st_size
        return _pairs(folder, sizes, after)

    def read(self, rel: str, cap: int) -> bytes:
        with (self.root / rel).open("rb") as f:
            data = f.read(cap + 1)
        if len(data) > cap:
            raise _Skip(f"{rel}: more than {cap} bytes")
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

    def list(self, folder: str, after: str) -> list[_Listed]:
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


def _pairs(folder: str, sizes: dict[str, int], after: str) -> list[_Listed]:
    out = []
    for name, size in sizes.items():
        fid, dot, ext = name.rpartition(".")
        if dot and ext == "json" and ID_RE.match(fid) and fid > after:
            out.append(_Listed(folder, fid, size, sizes.get(f"{fid}.jpg")))
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
        raise _Skip(f"s3://{store.bucket}/{key}: more than {cap} bytes")
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
    except _Skip as exc:
        return "too_large", f"{exc} > max_bytes {max_bytes}", None
    except (OSError, StorageError) as exc:
        return "connection_error", str(exc), None


# ---------------------------------------------------------------- one record


def _text(record: dict[str, Any], name: str, required: bool = False) -> str | None:
    value = record.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _Skip(f"field {name!r} must be a non-empty string")
    if len(value) > MAX_TEXT:
        raise _Skip(f"field {name!r} has {len(value)} characters (at most {MAX_TEXT})")
    return value


def check_record(data: bytes, item: _Listed, label: str, cfg: Config) -> None:
    """Raise _Skip naming the field when a record is not a well-formed correction for ``label``."""
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Skip(f"not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise _Skip(f"expected a JSON object, got {type(record).__name__}")
    if _text(record, "id", required=True) != item.fid:
        raise _Skip(f"field 'id' {str(record['id'])[:40]!r} is not the file's id {item.fid!r}")
    if _text(record, "label", required=True) != label:
        raise _Skip(
            f"field 'label' {str(record['label'])[:40]!r} is not {label!r}, the class of its folder"
        )
    _text(record, "predicted")
    _text(record, "model_version")
    _text(record, "time")
    probs = record.get("probabilities")
    if probs is not None:
        if not isinstance(probs, dict):
            raise _Skip("field 'probabilities' must be an object {label: probability}")
        if len(probs) > len(cfg.classes):
            raise _Skip(
                f"field 'probabilities' has {len(probs)} entries (at most {len(cfg.classes)}, "
                "one per class)"
            )
        for k, v in probs.items():
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if len(k) > MAX_TEXT or not ok or not 0 <= v <= 1:
                raise _Skip(
                    f"field 'probabilities' entry {k[:40]!r}: {str(v)[:40]} is not in [0, 1]"
                )


def _take_each(
    box: _FolderBox | _S3Box | _HubBox,
    items: Sequence[_Listed],
    classes: dict[str, str],
    cfg: Config,
    where: str,
    unreadable: tuple[type[Exception], ...],
    reason: Callable[[Exception], str],
) -> tuple[list[Candidate], list[str], list[str]]:
    """Read each record: (candidates, skip notes, records unreadable now to retry next night).

    A record that is wrong (_Skip) is skipped for good; one that cannot be read now (an
    ``unreadable`` error, described by ``reason``) is retried by the next night.
    """
    candidates: list[Candidate] = []
    skipped: list[str] = []
    retry: list[str] = []
    for item in items:
        try:
            candidates.append(_take(box, item, classes, cfg))
        except _Skip as exc:
            skipped.append(f"{where}/{item.rel}.json: {exc}")
        except unreadable as exc:
            skipped.append(
                f"{where}/{item.rel}.json: unreadable ({reason(exc)}); retried next night"
            )
            retry.append(item.rel)
    return candidates, skipped, retry


def _take(
    box: _FolderBox | _S3Box | _HubBox, item: _Listed, classes: dict[str, str], cfg: Config
) -> Candidate:
    """The candidate for one listed record, or _Skip naming what is wrong."""
    fb = cfg.feedback
    label = classes.get(item.folder)
    if label is None:
        raise _Skip(f"folder {item.folder[:40]!r} is not a configured class")
    if item.json_size is not None and item.json_size > fb.max_record_bytes:
        raise _Skip(
            f"record is {item.json_size} bytes (feedback.max_record_bytes {fb.max_record_bytes})"
        )
    if item.image_size is None:
        raise _Skip("its image is missing")
    if not 0 < item.image_size <= fb.max_image_bytes:
        raise _Skip(
            f"image is {item.image_size} bytes (feedback.max_image_bytes {fb.max_image_bytes})"
        )
    try:
        data = box.read(f"{item.rel}.json", fb.max_record_bytes)
    except FileNotFoundError:
        raise _Skip("record vanished while reading") from None
    check_record(data, item, label, cfg)
    return Candidate(label, box.image_url(item.rel), f"feedback:{item.fid}", "feedback")


# ---------------------------------------------------------------- the night's read


def _floor(fid: str) -> str:
    when = datetime.strptime(fid[:15], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    return (when - GRACE).strftime("%Y%m%dT%H%M%S")


def _load_cursor(store: Storage) -> tuple[dict[str, Any], str | None]:
    raw, token = store.read_pointer(CURSOR)
    if raw is None:
        return {"version": 1, "sources": {}}, None
    try:
        cursor = json.loads(raw)
        assert isinstance(cursor.get("sources"), dict)
    except Exception as exc:  # noqa: BLE001 - a broken cursor must not reread all feedback
        raise SourceError(
            f"{store.url('_pointers/' + CURSOR)}: feedback cursor is not valid ({exc}); "
            "fix or delete it (deleting rereads every record once)"
        ) from None
    return cursor, token


def _read_once(
    cfg: Config, night: str, box: _FolderBox | _S3Box, store: Storage
) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """One pass: list, read what no other night read, move the cursor (compare-and-swap)."""
    fb = cfg.feedback
    classes = {c.replace("/", "_"): c for c in cfg.classes}  # the app's folder name per class
    cursor, token = _load_cursor(store)
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
    candidates, skipped, retry = _take_each(box, tonight, classes, cfg, box.where, (OSError,), str)
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
        raise _Conflict
    return candidates, _report(
        box.where, len(todo) - waiting, waiting, candidates, skipped, notes, fb
    )


def _report(
    where: str,
    new: int,
    waiting: int,
    candidates: list[Candidate],
    skipped: list[str],
    notes: list[str],
    fb: Any,
) -> list[dict[str, Any]]:
    """The night's failure lines for one feedback location (and its log lines)."""
    failures = [{"label": "", "query": "feedback", "reason": r} for r in skipped[:MAX_REPORTED]]
    if len(skipped) > MAX_REPORTED:
        notes.append(f"{len(skipped) - MAX_REPORTED} more feedback records skipped")
    if waiting:
        notes.append(
            f"{waiting} feedback records wait for a later night "
            f"(feedback.max_per_night {fb.max_per_night})"
        )
    failures += [{"label": "", "query": "feedback", "reason": n} for n in notes]
    for r in skipped:
        log.warning("feedback record skipped: %s", r)
    for n in notes:
        log.warning("feedback: %s", n)
    log.info(
        "feedback from %s: %d new record(s), %d taken for review, %d skipped",
        where,
        new,
        len(candidates),
        len(skipped),
    )
    return failures


class _Conflict(Exception):
    """Another reader moved the cursor meanwhile."""


# ---------------------------------------------------------------- the Hub's dataset repo


class HubFeedbackError(SourceError):
    """The feedback dataset repo cannot be read (token, repo name, network)."""


def hub_repo_id(cfg: Config) -> str | None:
    """``owner/name`` of space.feedback_repo (validated by the config), or None."""
    repo = cfg.space.feedback_repo
    return repo.removeprefix("hf://datasets/") if repo else None


def _hub_errors() -> tuple[type[Exception], ...]:
    # huggingface_hub raises HfHubHTTPError (an OSError and its HTTP client's HTTPError) for HTTP
    # answers, and that client's own errors (not OSErrors) for refused or timed-out connections.
    from huggingface_hub.errors import HfHubHTTPError

    return tuple(c for c in HfHubHTTPError.__mro__ if c not in (Exception, BaseException, object))


def _hub_reason(exc: Exception, repo_id: str, cfg: Config) -> str:
    """What went wrong, naming the repo and where the token comes from."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    where = f"hf://datasets/{repo_id} (space.feedback_repo)"
    key = f"{TOKEN_ENV} or the Prefect Secret block {cfg.space.feedback_token_secret!r} "
    key += "(space.feedback_token_secret)"
    if status in (401, 403, 404):
        return (
            f"{where}: HTTP {status}, the token cannot read this dataset (missing, wrong or "
            f"scoped to another repo), or the dataset does not exist; set {key} to a token with "
            "read access to this dataset"
        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{where}: {redact(first)[:300]}"


class _HubBox:
    """The dataset repo at one commit: reads records and stages images into storage."""

    def __init__(self, cfg: Config, repo_id: str, token: str | None, store: Storage):
        from huggingface_hub import HfApi

        self.repo_id = repo_id
        self.where = f"hf://datasets/{repo_id}"
        self.token = token
        self.endpoint = os.environ.get("HF_ENDPOINT") or None  # read at run time (tests, mirrors)
        self.api = HfApi(endpoint=self.endpoint, token=token or False)
        self.store = store
        self.image_cap = cfg.feedback.max_image_bytes
        self.revision: str | None = None

    def head(self) -> str:
        sha = self.api.dataset_info(self.repo_id).sha
        if sha is None:  # the Hub always names a revision; a stand-in might not
            raise HubFeedbackError(f"{self.where}: the Hub reported no revision")
        self.revision = sha
        return sha

    def tree(self, revision: str) -> dict[str, int]:
        """{path: size} of every file under feedback/ at ``revision`` (empty when none)."""
        from huggingface_hub import RepoFile
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return {
                e.path: int(e.size)
                for e in self.api.list_repo_tree(
                    self.repo_id,
                    path_in_repo=HUB_FOLDER,
                    recursive=True,
                    revision=revision,
                    repo_type="dataset",
                )
                if isinstance(e, RepoFile) and e.size is not None  # folders have no size
            }
        except EntryNotFoundError:  # no correction committed yet
            return {}

    def read(self, rel: str, cap: int) -> bytes:
        import tempfile

        from huggingface_hub import hf_hub_download

        with tempfile.TemporaryDirectory(prefix="freshnet-feedback-") as tmp:
            path = hf_hub_download(
                self.repo_id,
                f"{HUB_FOLDER}/{rel}",
                repo_type="dataset",
                revision=self.revision,
                token=self.token or False,
                endpoint=self.endpoint,
                local_dir=tmp,
            )
            with open(path, "rb") as f:
                data = f.read(cap + 1)
        if len(data) > cap:
            raise _Skip(f"{rel}: more than {cap} bytes")
        return data

    def image_url(self, rel: str) -> str:
        # Staged in storage so that ingest (another task, maybe a retry) reads it without a token.
        # Named by the replica and id only (safe characters): the URL needs no quoting.
        replica, fid = rel.split("/")[0], rel.rpartition("/")[2]
        key = f"{STAGED}/{self.repo_id}/{replica}/{fid}.jpg"
        self.store.put(key, self.read(f"{rel}.jpg", self.image_cap))
        return self.store.url(key)


@dataclass(frozen=True)
class _HubListed(_Listed):
    replica: str = ""

    @property
    def rel(self) -> str:
        return f"{self.replica}/{self.folder}/{self.fid}"


def _hub_records(files: dict[str, int], paths: Iterable[str]) -> list[_HubListed]:
    """The records among ``paths`` (feedback/<replica>/<label>/<id>.json), oldest id first."""
    out = []
    for path in paths:
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != HUB_FOLDER or path not in files:
            continue
        fid, dot, ext = parts[3].rpartition(".")
        if dot and ext == "json" and ID_RE.match(fid) and REPLICA_RE.match(parts[1]):
            image = f"{HUB_FOLDER}/{parts[1]}/{parts[2]}/{fid}.jpg"
            out.append(_HubListed(parts[2], fid, files[path], files.get(image), parts[1]))
    return sorted(out, key=lambda i: (i.fid, i.replica, i.folder))


def _hub_read_once(
    cfg: Config, night: str, box: _HubBox, store: Storage
) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """One pass over the dataset repo; moves the cursor with a compare-and-swap.

    The cursor is the commit the last night read up to, plus the records it left for later
    (over feedback.max_per_night, or unreadable). New records are the files in the head's tree
    that were not in that commit's tree. The Hub orders a branch's commits, whichever replica
    sent them, and a commit's tree holds everything committed before it: the difference of two
    trees is exactly what was committed in between, whatever the replicas' clocks or how late a
    replica pushed (an id or time cursor would skip a record committed after a newer one). The
    head is pinned for the whole pass, so a commit landing meanwhile is read by the next night.
    A retried night starts again from where the night before left (``before``): it rereads its
    own records, and the catalog's content hashes keep each image once.
    """
    fb = cfg.feedback
    classes = {c.replace("/", "_"): c for c in cfg.classes}
    cursor, token = _load_cursor(store)
    mine = cursor["sources"].get(box.where) or {}
    start = (mine.get("before") if mine.get("night") == night else mine.get("after")) or {}
    base, left = start.get("commit"), list(start.get("left", []))
    head = box.head()
    files = box.tree(head)
    if base == head:
        new_paths: list[str] = []
    else:
        try:
            old = box.tree(base) if base else {}
        except _hub_errors() as exc:
            if getattr(getattr(exc, "response", None), "status_code", None) != 404:
                raise
            raise HubFeedbackError(
                f"{box.where}: the feedback cursor's commit {base} is no longer in the repo "
                "(history squashed or rewritten?); delete the storage pointer "
                f"{store.url('_pointers/' + CURSOR)} to read every record once more (the catalog "
                "keeps each image once)"
            ) from None
        new_paths = [p for p in files if p not in old]
    todo = _hub_records(files, set(new_paths) | set(left))
    later = [i.rel for i in todo[fb.max_per_night :]]
    candidates, skipped, retry = _take_each(
        box,
        todo[: fb.max_per_night],
        classes,
        cfg,
        f"{box.where}/{HUB_FOLDER}",
        _hub_errors(),
        lambda exc: _hub_reason(exc, box.repo_id, cfg),
    )
    later += retry  # unreadable now: left for the next night
    after = {"commit": head, "left": sorted(f"{HUB_FOLDER}/{rel}.json" for rel in later)}
    cursor["sources"][box.where] = {"night": night, "before": start, "after": after}
    if not store.swap_pointer(CURSOR, json.dumps(cursor, sort_keys=True).encode(), token):
        raise _Conflict
    waiting = max(0, len(todo) - fb.max_per_night)
    return candidates, _report(box.where, len(todo) - waiting, waiting, candidates, skipped, [], fb)


def _search_hub(
    cfg: Config, night: str, store: Storage, token: str | None, required: bool
) -> tuple[list[Candidate], list[dict[str, Any]]]:
    repo_id = hub_repo_id(cfg)
    assert repo_id is not None
    token = token or os.environ.get(TOKEN_ENV) or None
    box = _HubBox(cfg, repo_id, token, store)
    for _ in range(5):
        try:
            return _hub_read_once(cfg, night, box, store)
        except _Conflict:
            continue
        except HubFeedbackError:
            raise
        except _hub_errors() as exc:
            reason = _hub_reason(exc, repo_id, cfg)
            if required:
                raise HubFeedbackError(f"feedback unreadable: {reason}") from None
            log.warning("feedback unreadable: %s", reason)
            return [], [{"label": "", "query": "feedback", "reason": reason}]
    raise SourceError("feedback cursor kept changing under this night (another run?); rerun")


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
        hub = _search_hub(cfg, str(night), store, token, required)
    if not box.exists():
        if required and not cfg.space.feedback_repo:
            raise SourceError(f"{box.where}: feedback folder does not exist")
        if required:
            return _finish(cfg, *hub)
        return SearchReport(*hub, [])
    store = store or open_storage(cfg.storage)
    for _ in range(5):
        try:
            candidates, failures = _read_once(cfg, str(night), box, store)
            break
        except _Conflict:
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
        return _finish(cfg, candidates, failures)
    return SearchReport(candidates, failures, [])


def search_all(
    cfg: Config, night: str, feedback_token: str | None = None, **source_options: Any
) -> SearchReport:
    """Tonight's candidates: the main source's, plus the app's corrections waiting for review.

    Corrections join every night, whatever the main source; with source.kind = "feedback" they
    are the only source. ``feedback_token``: for space.feedback_repo (see ``search``).
    """
    if cfg.source.kind == "feedback":
        return search(cfg, night, required=True, token=feedback_token)
    report = sources.search(cfg, night, **source_options)
    extra = search(cfg, night, token=feedback_token)
    report.candidates.extend(extra.candidates)
    report.failures.extend(extra.failures)
    return report


# ---------------------------------------------------------------- review


def pending(store: Storage) -> pd.DataFrame:
    """Feedback images waiting for review, oldest first."""
    from freshnet.data import dataset  # pandas and the catalog: not for ingest's worker processes

    df = dataset.load_catalog(store)
    q = df[df["status"] == STATUS]
    q = q.sort_values(["first_seen", "sha256"], kind="stable")
    return q[["sha256", "label", "first_seen", "query", "url", "group", "split"]].reset_index(
        drop=True
    )


def format_pending(q: pd.DataFrame) -> str:
    if q.empty:
        return "no feedback waiting for review"
    view = q.assign(sha256=q["sha256"].str[:12], record=q["query"].str.removeprefix("feedback:"))
    return f"{len(q)} feedback image(s) waiting for review\n" + view[
        ["sha256", "label", "first_seen", "record", "url"]
    ].to_string(index=False, max_colwidth=70)


def review(store: Storage, shas: Sequence[str] | None, accept: bool) -> list[dict[str, Any]]:
    """Accept (status ok: joins train/holdout from the next snapshot) or reject (dropped).

    ``shas`` are sha256 prefixes of pending feedback images; None means every pending one. One
    catalog commit for all; each decision is recorded in the quarantine audit log.
    """
    from freshnet.data import dataset

    action = "feedback-accept" if accept else "feedback-reject"
    for _ in range(5):
        state = dataset.load_state(store)
        df = state.df.copy()
        if shas is None:
            rows = [int(r) for r in df.index[df["status"] == STATUS]]
        else:
            try:
                rows = sorted({dataset._resolve(df, s) for s in shas})
            except dataset.QuarantineError as exc:
                raise FeedbackError(str(exc)) from None
        for r in rows:
            if df.at[r, "status"] != STATUS:
                raise FeedbackError(
                    f"{str(df.at[r, 'sha256'])[:12]} is not waiting for feedback review "
                    f"(status {str(df.at[r, 'status'])}); see 'freshnet feedback list'"
                )
        if not rows:
            return []
        when = datetime.now(UTC).isoformat(timespec="seconds")
        entries = []
        for r in rows:
            df.at[r, "status"] = "ok" if accept else "dropped"
            df.at[r, "note"] = "feedback accepted" if accept else "feedback rejected"
            entries.append(
                {
                    "sha256": df.at[r, "sha256"],
                    "action": action,
                    "before": {"label": df.at[r, "label"], "status": STATUS},
                    "after": {"label": df.at[r, "label"], "status": df.at[r, "status"]},
                    "time": when,
                }
            )
        try:
            dataset._commit(store, state, df, list(state.index.segments), f"{action} {len(rows)}")
        except dataset.CatalogConflict:
            continue
        decisions = dataset.load_decisions(store) + entries
        store.put(dataset.DECISIONS_KEY, json.dumps({"decisions": decisions}, indent=1).encode())
        log.info("%s: %d image(s)", action, len(rows))
        return entries
    raise dataset.CatalogConflict(f"{action}: the catalog kept changing under it; rerun")


def format_entries(entries: Iterable[dict[str, Any]]) -> str:
    return "\n".join(
        f"{e['action'].removeprefix('feedback-')}: {e['sha256'][:12]} {e['after']['label']} "
        f"-> {e['after']['status']}"
        for e in entries
    )
