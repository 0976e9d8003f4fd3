"""The app's corrections in a Hub dataset repo: read through huggingface_hub, with a commit cursor."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from freshnet.config import Config
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
from freshnet.data.sources import Candidate, SourceError
from freshnet.redact import redact
from freshnet.storage import Storage

log = logging.getLogger(__name__)

HUB_FOLDER = "feedback"  # the app's folder in the dataset repo: <replica>/<label>/<id>.*
REPLICA_RE = re.compile(r"^[0-9a-f]{32}$")  # the app's replica folder (a uuid4 hex)
TOKEN_ENV = "FRESHNET_FEEDBACK_TOKEN"  # the nightly's token for the dataset (or a Secret block)
STAGED = "feedback-hub"  # storage prefix of the Hub's images, read by ingest like S3 feedback


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
            raise Skip(f"{rel}: more than {cap} bytes")
        return data

    def image_url(self, rel: str) -> str:
        # Staged in storage so that ingest (another task, maybe a retry) reads it without a token.
        # Named by the replica and id only (safe characters): the URL needs no quoting.
        replica, fid = rel.split("/")[0], rel.rpartition("/")[2]
        key = f"{STAGED}/{self.repo_id}/{replica}/{fid}.jpg"
        self.store.put(key, self.read(f"{rel}.jpg", self.image_cap))
        return self.store.url(key)


@dataclass(frozen=True)
class _HubListed(Listed):
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
    cursor, token = load_cursor(store)
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
    candidates, skipped, retry = take_each(
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
        raise CursorConflict
    waiting = max(0, len(todo) - fb.max_per_night)
    return candidates, failure_lines(
        box.where, len(todo) - waiting, waiting, candidates, skipped, [], fb
    )


def search_hub(
    cfg: Config, night: str, store: Storage, token: str | None, required: bool
) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """Tonight's records from the dataset repo and their failure lines (an error if required)."""
    repo_id = hub_repo_id(cfg)
    assert repo_id is not None
    token = token or os.environ.get(TOKEN_ENV) or None
    box = _HubBox(cfg, repo_id, token, store)
    for _ in range(5):
        try:
            return _hub_read_once(cfg, night, box, store)
        except CursorConflict:
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
