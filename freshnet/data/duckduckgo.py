"""DuckDuckGo image search through ddgs: retries, paging, and what earlier nights found."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from freshnet.config import Config
from freshnet.data.search_breaker import SearchBreaker
from freshnet.data.sources import Candidate, SearchReport, finish_report

log = logging.getLogger(__name__)

HISTORY_KEY = "search/history.json"


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
        report = finish_report(self.cfg, candidates, failures)
        report.events = list(b.events)
        report.gave_up = b.gave_up
        report.history = history
        return report
