"""One feedback record: its listing, its checks, and the cursor and report lines readers share."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from freshnet.config import Config
from freshnet.data.sources import Candidate, SourceError
from freshnet.storage import Storage

log = logging.getLogger(__name__)

# The app's id: UTC time of the correction and 8 random hex digits. Ids sort by time, which the
# cursor relies on; anything else in the folder is not a record (and is never read).
ID_RE = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{8}$")
CURSOR = "feedback-cursor"
MAX_REPORTED = 20  # skip reasons listed one by one per night; the rest are counted
MAX_TEXT = 200  # characters in any text field of a record


@dataclass(frozen=True)
class Listed:
    """One record as a listing shows it: its folder and id, and the sizes listed with it."""

    folder: str
    fid: str
    json_size: int | None  # None: unknown until read
    image_size: int | None  # None: the image is missing

    @property
    def rel(self) -> str:
        return f"{self.folder}/{self.fid}"


class Skip(Exception):
    """This record is not taken; the message says why."""


class CursorConflict(Exception):
    """Another reader moved the cursor meanwhile."""


class RecordBox(Protocol):
    """Where records live (a folder, S3, the Hub's dataset repo), as reading one record needs it."""

    def read(self, rel: str, cap: int) -> bytes: ...

    def image_url(self, rel: str) -> str: ...


def _text(record: dict[str, Any], name: str, required: bool = False) -> str | None:
    value = record.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise Skip(f"field {name!r} must be a non-empty string")
    if len(value) > MAX_TEXT:
        raise Skip(f"field {name!r} has {len(value)} characters (at most {MAX_TEXT})")
    return value


def check_record(data: bytes, item: Listed, label: str, cfg: Config) -> None:
    """Raise Skip naming the field when a record is not a well-formed correction for ``label``."""
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Skip(f"not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise Skip(f"expected a JSON object, got {type(record).__name__}")
    if _text(record, "id", required=True) != item.fid:
        raise Skip(f"field 'id' {str(record['id'])[:40]!r} is not the file's id {item.fid!r}")
    if _text(record, "label", required=True) != label:
        raise Skip(
            f"field 'label' {str(record['label'])[:40]!r} is not {label!r}, the class of its folder"
        )
    _text(record, "predicted")
    _text(record, "model_version")
    _text(record, "time")
    probs = record.get("probabilities")
    if probs is not None:
        if not isinstance(probs, dict):
            raise Skip("field 'probabilities' must be an object {label: probability}")
        if len(probs) > len(cfg.classes):
            raise Skip(
                f"field 'probabilities' has {len(probs)} entries (at most {len(cfg.classes)}, "
                "one per class)"
            )
        for k, v in probs.items():
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if len(k) > MAX_TEXT or not ok or not 0 <= v <= 1:
                raise Skip(
                    f"field 'probabilities' entry {k[:40]!r}: {str(v)[:40]} is not in [0, 1]"
                )


def take_each(
    box: RecordBox,
    items: Sequence[Listed],
    classes: dict[str, str],
    cfg: Config,
    where: str,
    unreadable: tuple[type[Exception], ...],
    reason: Callable[[Exception], str],
) -> tuple[list[Candidate], list[str], list[str]]:
    """Read each record: (candidates, skip notes, records unreadable now to retry next night).

    A record that is wrong (Skip) is skipped for good; one that cannot be read now (an
    ``unreadable`` error, described by ``reason``) is retried by the next night.
    """
    candidates: list[Candidate] = []
    skipped: list[str] = []
    retry: list[str] = []
    for item in items:
        try:
            candidates.append(_take(box, item, classes, cfg))
        except Skip as exc:
            skipped.append(f"{where}/{item.rel}.json: {exc}")
        except unreadable as exc:
            skipped.append(
                f"{where}/{item.rel}.json: unreadable ({reason(exc)}); retried next night"
            )
            retry.append(item.rel)
    return candidates, skipped, retry


def _take(box: RecordBox, item: Listed, classes: dict[str, str], cfg: Config) -> Candidate:
    """The candidate for one listed record, or Skip naming what is wrong."""
    fb = cfg.feedback
    label = classes.get(item.folder)
    if label is None:
        raise Skip(f"folder {item.folder[:40]!r} is not a configured class")
    if item.json_size is not None and item.json_size > fb.max_record_bytes:
        raise Skip(
            f"record is {item.json_size} bytes (feedback.max_record_bytes {fb.max_record_bytes})"
        )
    if item.image_size is None:
        raise Skip("its image is missing")
    if not 0 < item.image_size <= fb.max_image_bytes:
        raise Skip(
            f"image is {item.image_size} bytes (feedback.max_image_bytes {fb.max_image_bytes})"
        )
    try:
        data = box.read(f"{item.rel}.json", fb.max_record_bytes)
    except FileNotFoundError:
        raise Skip("record vanished while reading") from None
    check_record(data, item, label, cfg)
    return Candidate(label, box.image_url(item.rel), f"feedback:{item.fid}", "feedback")


def load_cursor(store: Storage) -> tuple[dict[str, Any], str | None]:
    """The feedback cursor (every reader's place, by location) and its compare-and-swap token."""
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


def failure_lines(
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
