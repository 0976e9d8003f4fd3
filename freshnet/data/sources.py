"""What every source yields (Candidate, SearchReport) and the local sources: demo, urls, folder.

DuckDuckGo lives in freshnet/data/duckduckgo.py, the app's corrections in
freshnet/data/feedback.py; freshnet/data/search.py picks the configured source for the night.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from freshnet.config import Config

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


class SourceError(ValueError):
    """A source input (urls file, folder) is invalid; the message names the file and line."""


@dataclass(frozen=True)
class Candidate:
    label: str
    url: str
    query: str
    source: str


@dataclass
class SearchReport:
    candidates: list[Candidate]
    failures: list[dict[str, Any]] = field(default_factory=list)  # {"label", "query", "reason"}
    failed_classes: list[str] = field(default_factory=list)
    # The search breaker's pauses, resumes and give-up (SearchBreaker), in order.
    events: list[dict[str, Any]] = field(default_factory=list)
    gave_up: str | None = None  # why the night's search stopped early, when it did
    # Per query with results tonight: {"results": n} (the next nights' history).
    history: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidates": [asdict(c) for c in self.candidates],
            "failures": list(self.failures),
            "failed_classes": list(self.failed_classes),
            "per_class": self.per_class(),
            "events": list(self.events),
            "gave_up": self.gave_up,
            "history": dict(self.history),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchReport:
        return cls(
            candidates=[Candidate(**c) for c in d.get("candidates", [])],
            failures=list(d.get("failures", [])),
            failed_classes=list(d.get("failed_classes", [])),
            events=list(d.get("events", [])),
            gave_up=d.get("gave_up"),
            history=dict(d.get("history", {})),
        )

    def per_class(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.candidates:
            out[c.label] = out.get(c.label, 0) + 1
        return out


def finish_report(
    cfg: Config, candidates: list[Candidate], failures: list[dict[str, Any]]
) -> SearchReport:
    """The report of a source: each class without a candidate is a failed class, with a reason."""
    found = {c.label for c in candidates}
    failed = [label for label in cfg.classes if label not in found]
    for label in failed:
        if not any(f["label"] == label for f in failures):
            failures.append({"label": label, "query": "", "reason": "no candidates for this class"})
    if failed:
        log.warning("classes without any candidate: %s", ", ".join(failed))
    return SearchReport(candidates, failures, failed)


# ---------------------------------------------------------------- demo


def search_demo(cfg: Config, night: str) -> SearchReport:
    """Ask the local image web (started on demand) for each class and query."""
    import httpx

    from freshnet.data.demo import ensure_server

    base = ensure_server(cfg)
    candidates: list[Candidate] = []
    failures: list[dict[str, Any]] = []
    with httpx.Client(trust_env=False, timeout=30.0) as client:
        for label in cfg.classes:
            for template in cfg.queries:
                query = template.format(label=label)
                params: dict[str, str | int] = {
                    "q": query,
                    "night": str(night),
                    "n": cfg.source.demo_per_query,
                    "label": label,
                }
                try:
                    resp = client.get(f"{base}/search", params=params)
                    resp.raise_for_status()
                    urls = resp.json()
                except (httpx.HTTPError, ValueError) as exc:
                    failures.append(
                        {"label": label, "query": query, "reason": f"demo search failed: {exc}"}
                    )
                    continue
                if not urls:
                    failures.append({"label": label, "query": query, "reason": "no results"})
                candidates.extend(Candidate(label, u, query, "demo") for u in urls)
    return finish_report(cfg, candidates, failures)


# ---------------------------------------------------------------- urls file


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank JSONL line; a line that is no JSON object raises."""
    rows: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise SourceError(
                f"{path}:{lineno}: expected an object with label and url, got {type(obj).__name__}"
            )
        rows.append((lineno, obj))
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) per non-blank CSV row; header names are matched case-insensitively."""
    reader = csv.DictReader(text.splitlines())
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    if "label" not in header or "url" not in header:
        raise SourceError(
            f"{path}:1: CSV header must name the columns label,url (got {reader.fieldnames})"
        )
    reader.fieldnames = header
    rows: list[tuple[int, dict[str, Any]]] = []
    for lineno, row in enumerate(reader, start=2):
        if None in row:
            raise SourceError(f"{path}:{lineno}: more fields than the header names")
        if not any((v or "").strip() for v in row.values()):
            continue
        rows.append((lineno, row))
    return rows


def _url_candidate(
    path: Path, lineno: int, row: dict[str, Any], classes: list[str] | None
) -> Candidate:
    """One row as a Candidate; the error names the file, the line and what is wrong."""
    label = str(row.get("label") or "").strip()
    url = str(row.get("url") or "").strip()
    if not label:
        raise SourceError(f"{path}:{lineno}: missing label")
    if not url:
        raise SourceError(f"{path}:{lineno}: missing url")
    if "://" not in url:
        raise SourceError(f"{path}:{lineno}: url {url!r} is not an absolute URL")
    if classes is not None and label not in classes:
        raise SourceError(
            f"{path}:{lineno}: label {label!r} is not one of the configured classes {classes}"
        )
    query = str(row.get("query") or f"urls:{path.name}")
    return Candidate(label, url, query, "urls")


def read_urls_file(path: str | Path, classes: list[str] | None = None) -> list[Candidate]:
    """Rows of a CSV (header label,url[,query]) or JSONL ({"label","url"}) file; bad rows raise SourceError."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: urls file not found")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = _jsonl_rows(path, text)
    else:
        rows = _csv_rows(path, text)
    return [_url_candidate(path, lineno, row, classes) for lineno, row in rows]


def search_urls(cfg: Config) -> SearchReport:
    assert cfg.source.path
    return finish_report(cfg, read_urls_file(cfg.source.path, cfg.classes), [])


# ---------------------------------------------------------------- folder


def search_folder(cfg: Config) -> SearchReport:
    """<root>/<label>/* files as file:// candidates (ingest reads them locally)."""
    assert cfg.source.path
    root = Path(cfg.source.path).expanduser().resolve()
    if not root.is_dir():
        raise SourceError(f"{root}: folder source root is not a directory")
    candidates: list[Candidate] = []
    failures: list[dict[str, Any]] = []
    for label in cfg.classes:
        folder = root / label
        if not folder.is_dir():
            failures.append({"label": label, "query": str(folder), "reason": "folder missing"})
            continue
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            failures.append({"label": label, "query": str(folder), "reason": "folder empty"})
        candidates.extend(Candidate(label, p.as_uri(), f"folder:{label}", "folder") for p in files)
    return finish_report(cfg, candidates, failures)
