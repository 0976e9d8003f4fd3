"""Where candidate image URLs come from: duckduckgo (ddgs), urls (CSV/JSONL), folder, demo;
the app's corrections (feedback) are read by freshnet/data/feedback.py."""

from __future__ import annotations

import csv
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
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


def search(
    cfg: Config,
    night: str,
    *,
    ddgs_factory: Callable[[], Any] | None = None,
    history: Mapping[str, dict[str, Any]] | None = None,
) -> SearchReport:
    """Candidates for every class of ``cfg`` on ``night``, from the web-like cfg.source.kind.

    ``history`` is what earlier nights found per query (load_search_history): an empty first
    page of a query that had results is taken for a block, not for an empty result.

    The nightly calls freshnet.data.feedback.search_all, which adds the app's corrections (and
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
        report = DuckDuckGoSource(cfg, ddgs_factory=ddgs_factory, history=history).search()
    else:
        raise SourceError(
            f"source.kind {kind!r} is not a search source "
            "(allowed: demo, urls, folder, duckduckgo, feedback)"
        )
    return report


def _finish(
    cfg: Config, candidates: list[Candidate], failures: list[dict[str, Any]]
) -> SearchReport:
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
    return _finish(cfg, candidates, failures)


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
    return _finish(cfg, read_urls_file(cfg.source.path, cfg.classes), [])


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
    return _finish(cfg, candidates, failures)


# ---------------------------------------------------------------- duckduckgo

HISTORY_KEY = "search/history.json"
DDG_PAGE_SIZE = 100  # DuckDuckGo's i.js answers ~100 images per page


class ImageSearchClient(Protocol):
    def images(self, query: str, **kwargs: Any) -> list[dict[str, Any]]: ...


def _default_ddgs_factory(timeout: int, proxy: str | None) -> Callable[[], ImageSearchClient]:
    def make() -> ImageSearchClient:
        from ddgs import DDGS

        # proxy None: ddgs falls back to the DDGS_PROXY environment variable itself.
        return DDGS(proxy=proxy, timeout=timeout)

    return make


def load_search_history(store: Any) -> dict[str, dict[str, Any]]:
    """What earlier nights found per query ({} before the first DuckDuckGo night)."""
    if not store.exists(HISTORY_KEY):
        return {}
    data = json.loads(store.get(HISTORY_KEY))
    return data if isinstance(data, dict) else {}


def save_search_history(store: Any, report: SearchReport, night: str) -> None:
    """Remember tonight's queries that had results; a query without keeps its earlier entry."""
    if not report.history:
        return
    merged = load_search_history(store)
    for query, seen in report.history.items():
        merged[query] = {**seen, "night": night}
    store.put(HISTORY_KEY, json.dumps(merged, indent=1, sort_keys=True).encode())


def is_ratelimit(exc: BaseException) -> bool:
    """A ddgs error that says the service refused us (not merely that it found nothing).

    ddgs 9 folds a 403/429 on the results into "No results found."; what it still tells apart is
    RatelimitException and the token page answered without a token (DuckDuckGo's 202 anomaly page).
    """
    from ddgs.exceptions import RatelimitException

    if isinstance(exc, RatelimitException):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("ratelimit", "rate limit", "vqd", " 202", " 403", " 429"))


class SearchBreaker:
    """The night's circuit breaker and budget, shared by every query of the night.

    A suspected block pauses all searching for source.cooldown_s, then the caller resumes the
    same query and page. Calls are paced: at least pause_s apart, and spread so the night's
    expected calls fill source.search_spread_s. When a pause would end after
    source.search_budget_s, or source.search_budget_calls are spent, it gives up for the night.
    Every pause, resume and give-up is logged and kept in ``events`` for the night's summary.
    """

    def __init__(
        self,
        cfg: Config,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        src = cfg.source
        self.src = src
        self.sleep = sleep
        self.clock = clock
        pages = min(src.max_pages, max(1, -(-src.max_results // DDG_PAGE_SIZE)))
        self.expected_calls = max(1, len(cfg.classes) * len(cfg.queries) * pages)
        self.pace_s = max(src.pause_s, src.search_spread_s / self.expected_calls)
        self.started: float | None = None
        self.last_call: float | None = None
        self.calls = 0
        self.paused_s = 0.0
        self.events: list[dict[str, Any]] = []
        self.gave_up: str | None = None

    def elapsed(self) -> float:
        return 0.0 if self.started is None else self.clock() - self.started

    def _event(self, kind: str, query: str, page: int, **extra: Any) -> None:
        self.events.append(
            {"event": kind, "at_s": round(self.elapsed(), 1), "query": query, "page": page, **extra}
        )

    def give_up(self, query: str, page: int, reason: str) -> None:
        self.gave_up = reason
        self._event("give_up", query, page, reason=reason)
        log.warning("search gave up at %r page %d: %s", query, page, reason)

    def before_call(self, query: str, page: int, *, retry: bool) -> bool:
        """Wait for the call's turn; False (after recording a give-up) when the budget is spent."""
        if self.gave_up:
            return False
        if self.started is None:
            self.started = self.clock()
        if self.calls >= self.src.search_budget_calls:
            self.give_up(
                query, page, f"search budget of {self.src.search_budget_calls} calls spent"
            )
            return False
        # A retry is spaced by its backoff; the spread pace is between distinct calls.
        gap = self.src.pause_s if retry else self.pace_s
        wait = 0.0 if self.last_call is None else gap - (self.clock() - self.last_call)
        if self.elapsed() + max(0.0, wait) > self.src.search_budget_s:
            self.give_up(query, page, f"search budget of {self.src.search_budget_s:g} s spent")
            return False
        if wait > 0:
            self.sleep(wait)
        self.last_call = self.clock()
        self.calls += 1
        return True

    def trip(self, query: str, page: int, reason: str) -> bool:
        """Pause all searching for the cool-down; False (after a give-up) when it outlasts the budget."""
        cooldown = self.src.cooldown_s
        left = self.src.search_budget_s - self.elapsed()
        if cooldown >= left:
            self.give_up(
                query,
                page,
                f"suspected DuckDuckGo block ({reason}) and a {cooldown:g} s cool-down would "
                f"outlast the search budget ({max(0.0, left):.0f} of "
                f"{self.src.search_budget_s:g} s left)",
            )
            return False
        self._event("pause", query, page, reason=reason, seconds=cooldown)
        log.warning(
            "suspected DuckDuckGo block at %r page %d (%s): pausing all searches for %g s",
            query,
            page,
            reason,
            cooldown,
        )
        t0 = self.clock()
        self.sleep(cooldown)
        paused = self.clock() - t0
        self.paused_s += paused
        self._event("resume", query, page, paused_s=round(paused, 1))
        log.info("search resumes at %r page %d after %.0f s", query, page, paused)
        self.last_call = None  # the cool-down was the gap
        return True


class DuckDuckGoSource:
    """Image search through ddgs: paced calls, backoff with jitter, bounded retries, paging, and a
    night-wide breaker (SearchBreaker) for blocks that last minutes.

    ddgs reports a 403/429 rate limit as a plain ``DDGSException("No results found.")``, the same as
    a truly empty result, so that is retried with backoff too. A call that fails twice in a row with
    a rate-limit error, or with an empty first page of a query that had results on an earlier night
    (``history``), trips the breaker: every search pauses for the cool-down and this call is tried
    again. Any other query still failing is recorded and the run goes on.
    """

    def __init__(
        self,
        cfg: Config,
        ddgs_factory: Callable[[], ImageSearchClient] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        history: Mapping[str, dict[str, Any]] | None = None,
    ):
        self.cfg = cfg
        self.src = cfg.source
        self.factory = ddgs_factory or _default_ddgs_factory(
            int(max(1, self.src.ddgs_timeout_s)), self.src.proxy
        )
        self.sleep = sleep
        self.clock = clock
        self.rng = rng or random.Random()
        self.history = dict(history or {})
        self.breaker = SearchBreaker(cfg, sleep=sleep, clock=clock)
        self._client: ImageSearchClient | None = None
        # Queries already paused for once because their first page came back empty: emptiness
        # alone is not proof, so after one cool-down an empty answer is taken as it is.
        self._empty_paused: set[str] = set()

    @property
    def calls(self) -> int:
        return self.breaker.calls

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

    def _suspect_empty(self, query: str) -> bool:
        """Whether an empty first page of ``query`` looks like a block (it had results before)."""
        if query in self._empty_paused:
            return False
        return int((self.history.get(query) or {}).get("results", 0)) > 0

    def _call(self, query: str, page: int) -> list[dict[str, Any]] | None:
        """One page with retries and the breaker; None when the night's search gave up.

        Raises the last ddgs error when retries are exhausted without a suspected block.
        """
        from ddgs.exceptions import DDGSException

        attempt = 0
        failed_before = False  # this call failed already (before a pause, too)
        while True:
            if not self.breaker.before_call(query, page, retry=attempt > 0):
                return None
            if self._client is None:
                self._client = self.factory()
            try:
                results = list(self._client.images(query, **self._kwargs(page)) or [])
                if results or page > 1 or not self._suspect_empty(query):
                    return results
                # An empty first page where earlier nights had results: a block in disguise.
                exc: DDGSException = DDGSException("No results found.")
            except DDGSException as e:
                exc = e
            by_error = is_ratelimit(exc)
            by_empty = not by_error and page == 1 and self._suspect_empty(query)
            if (by_error or by_empty) and failed_before:
                reason = f"{type(exc).__name__}: {exc}"
                if by_empty:
                    self._empty_paused.add(query)
                    reason += " on the first page of a query that had results on an earlier night"
                if not self.breaker.trip(query, page, reason):
                    return None
                attempt = 0  # a fresh start after the cool-down
                continue
            failed_before = True
            if attempt >= self.src.max_retries:
                raise exc
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
            if results is None:  # gave up: keep what this query already has
                if not urls:
                    reason = f"search gave up: {self.breaker.gave_up}"
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
        failures: list[dict[str, Any]] = []
        history: dict[str, dict[str, Any]] = {}
        for label in self.cfg.classes:
            for template in self.cfg.queries:
                query = template.format(label=label)
                if self.breaker.gave_up:
                    skipped = f"not searched: search gave up ({self.breaker.gave_up})"
                    failures.append({"label": label, "query": query, "reason": skipped})
                    continue
                found, reason = self.search_query(label, query)
                if reason:
                    log.warning("query %r failed: %s", query, reason)
                    failures.append({"label": label, "query": query, "reason": reason})
                if found:
                    history[query] = {"results": len(found)}
                candidates.extend(found)
        b = self.breaker
        if b.events or b.gave_up:
            log.info(
                "search: %d calls in %.0f s, %d pause(s) (%.0f s paused)%s",
                b.calls,
                b.elapsed(),
                sum(1 for e in b.events if e["event"] == "pause"),
                b.paused_s,
                f"; gave up: {b.gave_up}" if b.gave_up else "",
            )
        report = _finish(self.cfg, candidates, failures)
        report.events = list(b.events)
        report.gave_up = b.gave_up
        report.history = history
        return report
