"""The night-wide search breaker and budget: pacing, cool-downs after a block, and giving up."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from freshnet.config import Config

log = logging.getLogger(__name__)

DDG_PAGE_SIZE = 100  # DuckDuckGo's i.js answers ~100 images per page


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
