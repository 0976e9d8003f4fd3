"""Where candidate image URLs come from: duckduckgo (ddgs), urls (CSV/JSONL), folder, demo;
the app's corrections (feedback) are read by freshnet/feedback.py."""

from __future__ import annotations

import csv
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

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
    failures: list[dict] = field(default_factory=list)  # {"label", "query", "reason"}
    failed_classes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "candidates": [asdict(c) for c in self.candidates],
            "failures": list(self.failures),
            "failed_classes": list(self.failed_classes),
            "per_class": self.per_class(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> SearchReport:
        return cls(
            candidates=[Candidate(**c) for c in d.get("candidates", [])],
            failures=list(d.get("failures", [])),
            failed_classes=list(d.get("failed_classes", [])),
        )

    def per_class(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.candidates:
            out[c.label] = out.get(c.label, 0) + 1
        return out


def search(
    cfg: Config, night: str, *, ddgs_factory: Callable[[], Any] | None = None
) -> SearchReport:
    """Candidates for every class of ``cfg`` on ``night``, from the web-like cfg.source.kind.

    The nightly calls freshnet.feedback.search_all, which adds the app's corrections (and
    handles source.kind = "feedback"): feedback builds on this module, not the other way round.
    """
    kind = cfg.source.kind
    if kind == "demo":
        report = search_demo(cfg, night)
    elif kind == "urls":
        report = search_urls(cfg)
    elif kind == "folder":
        report = search_folder(cfg)
    elif kind == "duckduckgo":
        report = DuckDuckGoSource(cfg, ddgs_factory=ddgs_factory).search()
    else:
        raise SourceError(
            f"source.kind {kind!r} is not a search source "
            "(allowed: demo, urls, folder, duckduckgo, feedback)"
        )
    return report


def _finish(cfg: Config, candidates: list[Candidate], failures: list[dict]) -> SearchReport:
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

    from freshnet.demo import ensure_server

    base = ensure_server(cfg)
    candidates: list[Candidate] = []
    failures: list[dict] = []
    with httpx.Client(trust_env=False, timeout=30.0) as client:
        for label in cfg.classes:
            for template in cfg.queries:
                query = template.format(label=label)
                params = {
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
    return _finish(cfg, candidates, failures)


# ---------------------------------------------------------------- urls file


def read_urls_file(path: str | Path, classes: list[str] | None = None) -> list[Candidate]:
    """Rows of a CSV (header label,url[,query]) or JSONL ({"label","url"}) file; bad rows raise SourceError."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: urls file not found")
    text = path.read_text(encoding="utf-8-sig")
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
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
    else:
        reader = csv.DictReader(text.splitlines())
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        if "label" not in header or "url" not in header:
            raise SourceError(
                f"{path}:1: CSV header must name the columns label,url (got {reader.fieldnames})"
            )
        reader.fieldnames = header
        for lineno, row in enumerate(reader, start=2):
            if None in row:
                raise SourceError(f"{path}:{lineno}: more fields than the header names")
            if not any((v or "").strip() for v in row.values()):
                continue
            rows.append((lineno, row))
    out = []
    for lineno, row in rows:
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
        out.append(Candidate(label, url, query, "urls"))
    return out


def search_urls(cfg: Config) -> SearchReport:
    assert cfg.source.path
    return _finish(cfg, read_urls_file(cfg.source.path, cfg.classes), [])


# ---------------------------------------------------------------- folder


def search_folder(cfg: Config) -> SearchReport:
    """<root>/<label>/* files as file:// candidates (ingest reads them locally)."""
    assert cfg.source.path
    root = Path(cfg.source.path).expanduser().resolve()
    if not root.is_dir():
        raise SourceError(f"{root}: folder source root is not a directory")
    candidates: list[Candidate] = []
    failures: list[dict] = []
    for label in cfg.classes:
        folder = root / label
        if not folder.is_dir():
            failures.append({"label": label, "query": str(folder), "reason": "folder missing"})
            continue
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            failures.append({"label": label, "query": str(folder), "reason": "folder empty"})
        candidates.extend(Candidate(label, p.as_uri(), f"folder:{label}", "folder") for p in files)
    return _finish(cfg, candidates, failures)


# ---------------------------------------------------------------- duckduckgo


class ImageSearchClient(Protocol):
    def images(self, query: str, **kwargs: Any) -> list[dict[str, Any]]: ...


def _default_ddgs_factory(timeout: int) -> Callable[[], ImageSearchClient]:
    def make() -> ImageSearchClient:
        from ddgs import DDGS

        return DDGS(timeout=timeout)

    return make


class DuckDuckGoSource:
    """Image search through ddgs: paced calls, backoff with jitter, bounded retries, paging.

    ddgs reports a 403/429 rate limit as a plain ``DDGSException("No results found.")``, the same as
    a truly empty result, so that is retried with backoff too; a query still failing is recorded
    and the run goes on.
    """

    def __init__(
        self,
        cfg: Config,
        ddgs_factory: Callable[[], ImageSearchClient] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ):
        self.cfg = cfg
        self.src = cfg.source
        self.factory = ddgs_factory or _default_ddgs_factory(int(max(1, self.src.ddgs_timeout_s)))
        self.sleep = sleep
        self.clock = clock
        self.rng = rng or random.Random()
        self._client: ImageSearchClient | None = None
        self._last_call: float | None = None
        self.calls = 0

    def _pace(self) -> None:
        if self._last_call is not None:
            wait = self.src.pause_s - (self.clock() - self._last_call)
            if wait > 0:
                self.sleep(wait)

    def _kwargs(self, page: int) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "region": self.src.region,
            "safesearch": self.src.safesearch,
            "max_results": self.src.max_results,
            "page": page,
            "backend": self.src.ddgs_backend,
        }
        for name in ("license_image", "size", "type_image", "layout", "color"):
            value = getattr(self.src, name, None)
            if value:
                kw[name] = value
        return kw

    def _call(self, query: str, page: int) -> list[dict[str, Any]]:
        """One page with retries; raises the last ddgs error when retries are exhausted."""
        from ddgs.exceptions import DDGSException

        attempt = 0
        while True:
            self._pace()
            if self._client is None:
                self._client = self.factory()
            self._last_call = self.clock()
            self.calls += 1
            try:
                return list(self._client.images(query, **self._kwargs(page)) or [])
            except DDGSException as exc:
                if attempt >= self.src.max_retries:
                    raise
                # Rate limits, timeouts and "No results found." (maybe a hidden 403/429) all back off.
                delay = min(self.src.backoff_max_s, self.src.backoff_s * 2**attempt)
                delay *= 1 + self.rng.uniform(0, 0.5)
                log.info(
                    "ddgs %s for %r page %d; retry %d in %.1fs",
                    type(exc).__name__,
                    query,
                    page,
                    attempt + 1,
                    delay,
                )
                self.sleep(delay)
                attempt += 1

    def search_query(self, label: str, query: str) -> tuple[list[Candidate], str | None]:
        """Candidates for one query, and the failure reason when it produced none."""
        from ddgs.exceptions import DDGSException

        urls: list[str] = []
        seen: set[str] = set()
        reason: str | None = None
        for page in range(1, self.src.max_pages + 1):
            try:
                results = self._call(query, page)
            except DDGSException as exc:
                if page == 1:
                    reason = f"{type(exc).__name__}: {exc} (after {self.src.max_retries} retries)"
                break  # a later page failing just ends the paging
            except Exception as exc:  # noqa: BLE001 - a broken client must not end the night
                reason = f"{type(exc).__name__}: {exc}"
                self._client = None
                break
            new = 0
            for r in results:
                url = r.get("image") if isinstance(r, dict) else None
                if (
                    isinstance(url, str)
                    and url.startswith(("http://", "https://"))
                    and url not in seen
                ):
                    seen.add(url)
                    urls.append(url)
                    new += 1
            if len(urls) >= self.src.max_results or new == 0:
                break
        urls = urls[: self.src.max_results]
        if not urls and reason is None:
            reason = "no results"
        return [Candidate(label, u, query, "duckduckgo") for u in urls], reason

    def search(self) -> SearchReport:
        candidates: list[Candidate] = []
        failures: list[dict] = []
        for label in self.cfg.classes:
            for template in self.cfg.queries:
                query = template.format(label=label)
                found, reason = self.search_query(label, query)
                if reason:
                    log.warning("query %r failed: %s", query, reason)
                    failures.append({"label": label, "query": query, "reason": reason})
                candidates.extend(found)
        return _finish(self.cfg, candidates, failures)
