"""Search that survives DuckDuckGo blocks: the night-wide breaker, its budget and pace, the proxy.

Unit tests drive DuckDuckGoSource with a fake clock and a scripted client that raises ddgs's real
exceptions. The acceptance tests drive the real ddgs client, in real time, through the HTTP
stand-in (tests/ddg_standin.py) that blocks like the real service, and run the nightly's real
search step (storage, per-query history) and summary.
"""

from __future__ import annotations

import random
import time

import pytest
from ddgs.exceptions import DDGSException, RatelimitException

from freshnet import cycle, summary
from freshnet.config import ConfigError, parse_config
from freshnet.data.duckduckgo import DuckDuckGoSource, is_ratelimit
from freshnet.data.search_breaker import SearchBreaker
from tests.ddg_standin import DdgStandIn, point_ddgs_at
from tests.test_sources import Clock

CLASSES = ["corgi", "samoyed"]
QUERIES = ["photo {label}", "{label} puppy"]
ALL_QUERIES = ["photo corgi", "corgi puppy", "photo samoyed", "samoyed puppy"]


def _cfg(tmp_path=None, **source):
    data = {
        "classes": CLASSES,
        "queries": QUERIES,
        "source": {"kind": "duckduckgo", **source},
    }
    if tmp_path is not None:
        data["storage"] = f"file://{tmp_path}/store"
        data["space"] = {"feedback_dir": str(tmp_path / "feedback")}
    return parse_config(data)


# ---------------------------------------------------------------- fake clock, scripted client


class BlockingDDGS:
    """Pages of ``per_page`` URLs per query; after ``after`` calls it refuses with ``error`` for
    ``block_s`` seconds of the fake clock (``block_s`` None: for ever)."""

    def __init__(self, clock, after=None, block_s=None, error=None, per_page=3, pages=2):
        self.clock = clock
        self.after = after
        self.block_s = block_s
        self.error = error or RatelimitException("429 Ratelimit")
        self.per_page = per_page
        self.pages = pages
        self.block: tuple[float, float] | None = None
        self.served = 0
        self.calls: list[tuple[float, str, int, bool]] = []  # (time, query, page, refused)
        self.empty_queries: set[str] = set()

    def blocked(self, t):
        return self.block is not None and self.block[0] <= t < self.block[1]

    def images(self, query, **kw):
        t, page = self.clock(), kw["page"]
        if self.block is None and self.after is not None and self.served >= self.after:
            end = float("inf") if self.block_s is None else t + self.block_s
            self.block = (t, end)
        refused = self.blocked(t)
        self.calls.append((t, query, page, refused))
        if refused:
            raise self.error
        self.served += 1
        if query in self.empty_queries or page > self.pages:
            raise DDGSException("No results found.")
        return [
            {"image": f"https://img.example/{query.replace(' ', '-')}/{page}/{i}.jpg"}
            for i in range(self.per_page)
        ]


def _source(fake, clock, history=None, **source):
    opts = {"max_results": 6, "max_pages": 3, "search_spread_s": 0, **source}
    return DuckDuckGoSource(
        _cfg(**opts),
        ddgs_factory=lambda: fake,
        sleep=clock.sleep,
        clock=clock,
        rng=random.Random(0),
        history=history,
    )


def _per_query(report):
    out: dict[str, int] = {}
    for c in report.candidates:
        out[c.query] = out.get(c.query, 0) + 1
    return out


def test_ratelimit_pauses_all_search_and_resumes_the_same_page():
    clock = Clock()
    fake = BlockingDDGS(clock, after=3, block_s=800)  # 4th call: "corgi puppy" page 2
    rep = _source(fake, clock).search()

    assert _per_query(rep) == dict.fromkeys(ALL_QUERIES, 6), rep.failures
    assert rep.failures == [] and rep.gave_up is None
    assert [(e["event"], e["query"], e["page"]) for e in rep.events] == [
        ("pause", "corgi puppy", 2),
        ("resume", "corgi puppy", 2),
    ]
    assert rep.events[0]["seconds"] == 900 and "Ratelimit" in rep.events[0]["reason"]
    # One confirming retry, then nothing at all (no query) until the cool-down is over.
    start, end = fake.block
    assert sum(1 for t, *_ in fake.calls if start <= t < end) == 2
    assert all(t >= start + 900 for t, *_ in fake.calls[5:])
    assert fake.calls[5][1:3] == ("corgi puppy", 2)  # resumed where it stopped


def test_empty_first_page_of_a_query_that_had_results_is_a_block():
    clock = Clock()
    fake = BlockingDDGS(clock, after=1, block_s=600, error=DDGSException("No results found."))
    history = {q: {"results": 6, "night": "2026-12-01"} for q in ALL_QUERIES}
    rep = _source(fake, clock, history=history, max_results=3, max_pages=1).search()
    assert _per_query(rep) == dict.fromkeys(ALL_QUERIES, 3)
    assert [e["event"] for e in rep.events] == ["pause", "resume"]
    assert rep.events[0]["query"] == "corgi puppy"
    assert "had results on an earlier night" in rep.events[0]["reason"]


def test_empty_query_without_history_is_no_block_and_a_lasting_empty_pauses_once():
    clock = Clock()
    fake = BlockingDDGS(clock)  # never blocks
    fake.empty_queries = {"photo corgi", "corgi puppy"}
    # "photo corgi" had results before (one pause, then its emptiness is believed);
    # "corgi puppy" never had any (an empty answer, retried with backoff, no pause).
    history = {"photo corgi": {"results": 5}}
    rep = _source(fake, clock, history=history, max_results=3, max_retries=2).search()
    assert [(e["event"], e["query"]) for e in rep.events] == [
        ("pause", "photo corgi"),
        ("resume", "photo corgi"),
    ]
    reasons = {f["query"]: f["reason"] for f in rep.failures}
    assert set(reasons) == {"photo corgi", "corgi puppy"}
    assert all("No results found" in r for r in reasons.values())
    assert _per_query(rep) == {"photo samoyed": 3, "samoyed puppy": 3}


def test_block_outlasting_the_budget_gives_up_loudly():
    clock = Clock()
    fake = BlockingDDGS(clock, after=1)  # blocked for ever from the 2nd call
    rep = _source(fake, clock, search_budget_s=1000).search()

    assert [e["event"] for e in rep.events] == ["pause", "resume", "give_up"]
    assert "outlast the search budget" in rep.gave_up
    assert _per_query(rep) == {"photo corgi": 3}  # what it had is kept
    reasons = {f["query"]: f["reason"] for f in rep.failures}
    assert reasons["corgi puppy"].startswith("not searched: search gave up")
    assert set(reasons) == {"corgi puppy", "photo samoyed", "samoyed puppy"}
    assert clock.t <= 1000 and len(fake.calls) <= 5

    # The night's summary: a yield problem (so the night ends Degraded) and the events.
    searched = {
        "failures": rep.failures,
        "failed_classes": rep.failed_classes,
        "search_events": rep.events,
        "search_gave_up": rep.gave_up,
    }
    s = summary.start(_cfg(), "2026-12-03", searched, {"counts": {}}, {}, {"id": "x", "counts": {}})
    assert any(p.startswith("search gave up:") for p in s["yield_problems"])
    assert summary.ending(summary.stop(s, "nothing new")).startswith("degraded night")
    text = summary.format_summary(s)
    assert "paused 1x" in text and "GAVE UP" in text and "'photo corgi' page 2" in text


def test_a_give_up_is_a_yield_problem_even_when_no_search_failed():
    # The last page of the last query is blocked past the budget: every query has results, so
    # no search failed (max_failed_searches is not reached), yet the night must not read as a
    # quiet success.
    clock = Clock()
    fake = BlockingDDGS(clock, after=7)  # the last query's page 2
    rep = _source(fake, clock, search_budget_s=100, cooldown_s=200).search()
    assert rep.failures == [] and rep.gave_up and len(rep.candidates) == 21
    searched = {"failures": [], "failed_classes": [], "search_gave_up": rep.gave_up}
    s = summary.start(_cfg(), "n", searched, {"counts": {}}, {}, {"id": "x", "counts": {}})
    assert s["yield_problems"] == [f"search gave up: {rep.gave_up}"]


def test_call_budget_stops_the_night():
    clock = Clock()
    fake = BlockingDDGS(clock)
    rep = _source(fake, clock, search_budget_calls=3).search()
    assert len(fake.calls) == 3 and rep.gave_up == "search budget of 3 calls spent"
    assert [e["event"] for e in rep.events] == ["give_up"]


def test_calls_are_spread_over_the_night_but_retries_keep_their_backoff():
    clock = Clock()
    fake = BlockingDDGS(clock, per_page=6, pages=1)
    # 4 queries x 1 expected page over 80 s: 20 s between calls (pause_s=1 is the floor).
    src = _source(fake, clock, search_spread_s=80)
    assert src.breaker.pace_s == 20
    src.search()
    times = [t for t, *_ in fake.calls]
    assert times == [0, 20, 40, 60]

    clock2 = Clock()
    fake2 = BlockingDDGS(clock2, after=0, block_s=3, error=DDGSException("timed out"))
    _source(fake2, clock2, search_spread_s=80, backoff_s=2).search_query("corgi", "photo corgi")
    # The timeout retry waits its 2-3 s backoff, not the 20 s spread.
    assert 2 <= fake2.calls[1][0] <= 3


def test_ratelimit_signals():
    assert is_ratelimit(RatelimitException("x"))
    assert is_ratelimit(DDGSException("_extract_vqd() query='a' Could not extract vqd."))
    assert not is_ratelimit(DDGSException("No results found."))
    assert not is_ratelimit(DDGSException("timed out"))


def test_breaker_pace_floor_and_config_errors():
    assert SearchBreaker(_cfg(pause_s=3, search_spread_s=0)).pace_s == 3
    with pytest.raises(ConfigError, match="search_spread_s"):
        _cfg(search_spread_s=5000, search_budget_s=100)
    with pytest.raises(ConfigError, match="source.proxy.*DDGS_PROXY"):
        _cfg(proxy="http://user:secret@proxy.example:3128")
    with pytest.raises(ConfigError, match="source.proxy"):
        _cfg(proxy="proxy.example:3128")
    assert _cfg(proxy="socks5://127.0.0.1:1080").source.proxy == "socks5://127.0.0.1:1080"


# ---------------------------------------------------------------- real ddgs, HTTP stand-in


def _night(tmp_path, night, **source):
    """The nightly's search step and summary (no downloads: the image hosts are not real)."""
    cfg = _cfg(tmp_path, ddgs_backend="duckduckgo", **source)
    searched = cycle.search_step(cfg, night)
    report = cycle.get_json(cycle.open_store(cfg), searched["key"])
    s = summary.start(cfg, night, searched, {"counts": {}}, {}, {"id": "x", "counts": {}})
    return searched, report, s


def _urls_by_query(report):
    out: dict[str, set[str]] = {}
    for c in report["candidates"]:
        out.setdefault(c["query"], set()).add(c["url"])
    return out


@pytest.mark.parametrize("via", ["config", "env"])
def test_proxy_setting_reaches_ddgs(tmp_path, monkeypatch, via):
    with DdgStandIn(results_per_query=30) as stand:
        # The engines point at a host that does not resolve: only the proxy can answer.
        point_ddgs_at(monkeypatch, "http://ddg.invalid")
        if via == "env":
            monkeypatch.setenv("DDGS_PROXY", stand.url)
            cfg = _cfg(ddgs_backend="duckduckgo", max_results=30, search_spread_s=0, pause_s=0)
        else:
            monkeypatch.delenv("DDGS_PROXY", raising=False)
            cfg = _cfg(
                ddgs_backend="duckduckgo",
                max_results=30,
                search_spread_s=0,
                pause_s=0,
                proxy=stand.url,
            )
        found, reason = DuckDuckGoSource(cfg).search_query("corgi", "photo corgi")
    assert reason is None
    assert [c.url for c in found] == stand.expected_urls("photo corgi")
    assert stand.proxied >= 2  # the token page and i.js both went through it


def test_auto_backend_during_a_duckduckgo_block_gets_bing_pages(monkeypatch):
    # Measured behaviour (README): with "auto", ddgs asks its image engines in random order and
    # stops at the first that answers; during a DuckDuckGo block Bing answers every call, 35
    # results a page, and the breaker never trips. Both blocked: the breaker trips as usual.
    monkeypatch.delenv("DDGS_PROXY", raising=False)
    opts = {"ddgs_backend": "auto", "max_results": 35, "search_spread_s": 0, "pause_s": 0}
    with DdgStandIn(bing_results_per_query=35) as stand:
        point_ddgs_at(monkeypatch, stand.url)
        stand.block_from_now(after=0, seconds=600)
        rep = DuckDuckGoSource(_cfg(**opts)).search()
    assert rep.events == [] and rep.failures == []
    assert _per_query(rep) == dict.fromkeys(ALL_QUERIES, 35)
    assert all(c.url.startswith("https://img-bing.example/") for c in rep.candidates)
    assert all(h.status == 200 for h in stand.calls("bing"))
    assert all(h.status != 200 for h in stand.calls("duckduckgo"))  # refused searches


@pytest.mark.slow
def test_night_survives_a_90s_block(tmp_path, monkeypatch):
    """Acceptance: blocked for 90 s after 5 calls; every query's pages arrive within budget."""
    monkeypatch.delenv("DDGS_PROXY", raising=False)
    with DdgStandIn(results_per_query=150, block_after=5, block_s=90) as stand:
        point_ddgs_at(monkeypatch, stand.url)
        t0 = time.monotonic()
        searched, report, s = _night(
            tmp_path,
            "2026-12-03",
            max_results=150,
            max_pages=3,
            cooldown_s=90,
            search_budget_s=115,
            search_spread_s=4,  # 8 expected calls: 0.5 s apart
            pause_s=0.2,
            backoff_s=0.3,
        )
        took = time.monotonic() - t0
    got = _urls_by_query(report)
    assert got == {q: set(stand.expected_urls(q)) for q in ALL_QUERIES}  # all 2 pages of each
    assert report["failures"] == [] and report["gave_up"] is None
    assert len(stand.blocks) == 1 and 90 <= took <= 115
    pauses = [e for e in report["events"] if e["event"] == "pause"]
    resumes = [e for e in report["events"] if e["event"] == "resume"]
    assert len(pauses) == 1 and len(resumes) == 1 and resumes[0]["paused_s"] >= 89
    # Nothing was asked of DuckDuckGo during the pause after the confirming retry.
    start, end = stand.blocks[0]
    during = [h for h in stand.hits if start <= h.at < end]
    assert len(during) <= 3, during  # the refused i.js, then the retry's token page (and i.js)
    assert s["yield_problems"] == [] and s["search_events"] == report["events"]
    text = summary.format_summary(s)
    assert "paused 1x for suspected blocks" in text and "• resume at" in text
    # The next night knows these queries had results.
    history = cycle.get_json(cycle.open_store(_cfg(tmp_path)), "search/history.json")
    assert {q: v["results"] for q, v in history.items()} == dict.fromkeys(ALL_QUERIES, 150)


@pytest.mark.slow
def test_block_outlasting_the_budget_ends_the_night_degraded(tmp_path, monkeypatch):
    """Acceptance: a block longer than the budget is a loud give-up, not an empty success."""
    monkeypatch.delenv("DDGS_PROXY", raising=False)
    with DdgStandIn(results_per_query=150, block_after=2, block_s=600) as stand:
        point_ddgs_at(monkeypatch, stand.url)
        t0 = time.monotonic()
        searched, report, s = _night(
            tmp_path,
            "2026-12-03",
            max_results=150,
            cooldown_s=1,
            search_budget_s=3,
            search_spread_s=0,
            pause_s=0.1,
            backoff_s=0.2,
        )
        took = time.monotonic() - t0
    assert took < 6
    assert "outlast the search budget" in report["gave_up"]
    assert searched["search_gave_up"] == report["gave_up"]
    kinds = [e["event"] for e in report["events"]]
    assert kinds[0] == "pause" and kinds[-1] == "give_up" and kinds.count("pause") >= 1
    assert set(_urls_by_query(report)) == {"photo corgi"}  # what it got before the block is kept
    failed = {f["query"] for f in report["failures"]}
    assert failed == {"corgi puppy", "photo samoyed", "samoyed puppy"}
    assert any(p.startswith("search gave up:") for p in s["yield_problems"])
    assert summary.ending(summary.stop(s, "nothing new")).startswith("degraded night")
    assert "GAVE UP" in summary.format_summary(s)


@pytest.mark.slow
def test_empty_pages_after_good_nights_are_taken_for_a_block(tmp_path, monkeypatch):
    """A block that answers with empty pages: caught because earlier nights had results."""
    monkeypatch.delenv("DDGS_PROXY", raising=False)
    opts = {
        "max_results": 100,
        "max_pages": 1,
        "cooldown_s": 3,
        "search_budget_s": 30,
        "search_spread_s": 0,
        "pause_s": 0.1,
        "backoff_s": 0.2,
    }
    with DdgStandIn(results_per_query=100) as stand:
        point_ddgs_at(monkeypatch, stand.url)
        _night(tmp_path, "2026-12-02", **opts)  # a good night: the queries' history
        stand.block_from_now(after=2, seconds=2.5, mode="empty")
        searched, report, s = _night(tmp_path, "2026-12-03", **opts)
    got = _urls_by_query(report)
    assert got == {q: set(stand.expected_urls(q)) for q in ALL_QUERIES}
    assert [e["event"] for e in report["events"]] == ["pause", "resume"]
    assert "had results on an earlier night" in report["events"][0]["reason"]
    assert s["yield_problems"] == []
