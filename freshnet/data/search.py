"""The night's search: the configured source's candidates, plus the app's corrections."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from freshnet.config import Config
from freshnet.data import feedback
from freshnet.data.duckduckgo import DuckDuckGoSource
from freshnet.data.sources import (
    SearchReport,
    SourceError,
    search_demo,
    search_folder,
    search_urls,
)


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

    The nightly calls search_all, which adds the app's corrections (and handles
    source.kind = "feedback").
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


def search_all(
    cfg: Config, night: str, feedback_token: str | None = None, **source_options: Any
) -> SearchReport:
    """Tonight's candidates: the main source's, plus the app's corrections waiting for review.

    Corrections join every night, whatever the main source; with source.kind = "feedback" they
    are the only source. ``feedback_token``: for space.feedback_repo (see ``search``).
    """
    if cfg.source.kind == "feedback":
        return feedback.search(cfg, night, required=True, token=feedback_token)
    report = search(cfg, night, **source_options)
    extra = feedback.search(cfg, night, token=feedback_token)
    report.candidates.extend(extra.candidates)
    report.failures.extend(extra.failures)
    return report
