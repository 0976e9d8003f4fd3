"""Sources: urls files (CSV/JSONL), folder, and the duckduckgo adapter at the ddgs client boundary."""

from __future__ import annotations

import json
import random

import pytest
from ddgs.exceptions import DDGSException, RatelimitException, TimeoutException

from freshnet.config import parse_config
from freshnet.data.duckduckgo import DuckDuckGoSource
from freshnet.data.search import search
from freshnet.data.sources import Candidate, SearchReport, SourceError, read_urls_file

CLASSES = ["corgi", "samoyed"]


def _cfg(**source):
    return parse_config(
        {"classes": CLASSES, "queries": ["photo {label}", "{label} puppy"], "source": source}
    )


# ---------------------------------------------------------------- urls


def test_urls_csv_and_jsonl(tmp_path):
    csv_file = tmp_path / "u.csv"
    csv_file.write_text(
        "label,url\ncorgi,https://a.example/1.jpg\n\nsamoyed, https://b.example/2.jpg \n"
    )
    rep = search(_cfg(kind="urls", path=str(csv_file)), "1")
    assert rep.candidates == [
        Candidate("corgi", "https://a.example/1.jpg", "urls:u.csv", "urls"),
        Candidate("samoyed", "https://b.example/2.jpg", "urls:u.csv", "urls"),
    ]
    assert rep.failed_classes == []
    jl = tmp_path / "u.jsonl"
    jl.write_text(
        json.dumps({"label": "corgi", "url": "https://a.example/1.jpg", "query": "q1"}) + "\n"
    )
    rep = search(_cfg(kind="urls", path=str(jl)), "1")
    assert rep.candidates == [Candidate("corgi", "https://a.example/1.jpg", "q1", "urls")]
    assert rep.failed_classes == ["samoyed"]
    assert SearchReport.from_dict(json.loads(json.dumps(rep.to_dict()))) == rep


@pytest.mark.parametrize(
    ("name", "text", "where", "what"),
    [
        ("a.csv", "name,link\ncorgi,https://x/1.jpg\n", ":1:", "header"),
        ("b.csv", "label,url\ncorgi,https://x/1.jpg\ncorgi,\n", ":3:", "missing url"),
        ("c.csv", "label,url\npug,https://x/1.jpg\n", ":2:", "'pug' is not one of"),
        ("d.csv", "label,url\ncorgi,x/1.jpg\n", ":2:", "not an absolute URL"),
        ("e.csv", "label,url\ncorgi,https://x/1.jpg,extra\n", ":2:", "more fields"),
        (
            "f.jsonl",
            '{"label": "corgi", "url": "https://x/1.jpg"}\n{"label": "corgi"\n',
            ":2:",
            "not valid JSON",
        ),
        ("g.jsonl", '["corgi", "https://x/1.jpg"]\n', ":1:", "expected an object"),
    ],
)
def test_urls_bad_rows_name_file_and_line(tmp_path, name, text, where, what):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(SourceError) as info:
        read_urls_file(p, CLASSES)
    msg = str(info.value)
    assert msg.startswith(str(p) + where) and what in msg, msg


def test_urls_missing_file(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        search(_cfg(kind="urls", path=str(tmp_path / "nope.csv")), "1")


# ---------------------------------------------------------------- folder


def test_folder_source(tmp_path):
    (tmp_path / "corgi").mkdir()
    (tmp_path / "corgi" / "a.jpg").write_bytes(b"x")
    (tmp_path / "corgi" / ".hidden").write_bytes(b"x")
    rep = search(_cfg(kind="folder", path=str(tmp_path)), "1")
    assert [c.url for c in rep.candidates] == [(tmp_path / "corgi" / "a.jpg").as_uri()]
    assert rep.candidates[0].source == "folder" and rep.candidates[0].label == "corgi"
    assert rep.failed_classes == ["samoyed"]
    assert rep.failures == [
        {"label": "samoyed", "query": str(tmp_path / "samoyed"), "reason": "folder missing"}
    ]


# ---------------------------------------------------------------- duckduckgo


def _result(i: int, host: str = "img.example") -> dict:
    # The shape ddgs 9.x returns for images().
    return {
        "title": f"photo {i}",
        "image": f"https://{host}/{i}.jpg",
        "thumbnail": f"https://tse.example/th?id={i}",
        "url": f"https://page.example/{i}",
        "height": 800,
        "width": 600,
        "source": "Bing",
    }


class FakeDDGS:
    """Stands in for ddgs.DDGS: scripted per (query, page) responses; raises ddgs's real exceptions."""

    def __init__(self, script):
        self.script = script
        self.calls: list[tuple[str, dict]] = []

    def images(self, query, **kwargs):
        self.calls.append((query, kwargs))
        action = self.script(query, kwargs["page"], len(self.calls))
        if isinstance(action, Exception):
            raise action
        return action


class Clock:
    def __init__(self):
        self.t = 0.0
        self.sleeps: list[float] = []

    def sleep(self, s):
        self.sleeps.append(s)
        self.t += s

    def __call__(self):
        return self.t


def _source(script, **source):
    fake = FakeDDGS(script)
    clock = Clock()
    src = DuckDuckGoSource(
        _cfg(kind="duckduckgo", **source),
        ddgs_factory=lambda: fake,
        sleep=clock.sleep,
        clock=clock,
        rng=random.Random(0),
    )
    return src, fake, clock


def test_ddgs_pages_until_enough_and_passes_filters():
    def script(query, page, n):
        if page <= 2:
            return [_result(page * 100 + i) for i in range(3)] + [_result(page * 100)]  # one repeat
        raise DDGSException("No results found.")

    src, fake, clock = _source(
        script, max_results=5, license_image="Public", type_image="photo", max_retries=1
    )
    rep = src.search()
    per_query = [c for c in rep.candidates if c.query == "photo corgi"]
    assert len(per_query) == 5 and len({c.url for c in per_query}) == 5
    assert rep.failures == [] and rep.failed_classes == []
    q, kw = fake.calls[0]
    assert (
        q == "photo corgi"
        and kw["page"] == 1
        and kw["license_image"] == "Public"
        and kw["type_image"] == "photo"
    )
    assert kw["region"] == "wt-wt" and kw["safesearch"] == "moderate"
    assert fake.calls[1][1]["page"] == 2
    # At least pause_s between any two calls.
    assert all(s >= 1.0 - 1e-9 for s in clock.sleeps)


def test_ddgs_backoff_on_ratelimit_timeout_and_hidden_403():
    errors = [
        RatelimitException("429"),
        TimeoutException("timed out"),
        DDGSException("No results found."),
    ]

    def script(query, page, n):
        if n <= 3:
            return errors[n - 1]
        return [_result(i) for i in range(3)] if page == 1 else []

    src, fake, clock = _source(script, max_results=3, pause_s=0, backoff_s=2.0, max_retries=4)
    found, reason = src.search_query("corgi", "photo corgi")
    assert reason is None and len(found) == 3
    assert len(clock.sleeps) == 3
    for k, s in enumerate(clock.sleeps):  # exponential with up to 50% jitter
        assert 2.0 * 2**k <= s <= 2.0 * 2**k * 1.5


def test_ddgs_failed_query_recorded_and_run_continues():
    def script(query, page, n):
        if "samoyed" in query:
            return DDGSException("No results found.")
        if query == "corgi puppy":
            return RuntimeError("connection reset")
        return [_result(i, host="corgi.example") for i in range(4)] if page == 1 else []

    # search_spread_s=0: only backoff here (the spread pace is tested in test_search_blocks.py).
    src, fake, clock = _source(
        script, max_results=4, max_retries=2, backoff_s=1.0, backoff_max_s=1.5, search_spread_s=0
    )
    rep = src.search()
    assert {c.query for c in rep.candidates} == {"photo corgi"}
    assert rep.failed_classes == ["samoyed"]
    reasons = {(f["label"], f["query"]): f["reason"] for f in rep.failures}
    assert "RuntimeError" in reasons[("corgi", "corgi puppy")]
    assert "No results found" in reasons[("samoyed", "photo samoyed")]
    assert "No results found" in reasons[("samoyed", "samoyed puppy")]
    # Bounded: 1 + max_retries calls per failing ddgs query, backoff capped by backoff_max_s.
    assert sum(1 for q, _ in fake.calls if "samoyed" in q) == 2 * 3
    assert max(clock.sleeps) <= 1.5 * 1.5


def test_ddgs_skips_bad_result_rows():
    rows = [_result(1), {"title": "no image"}, {"image": "data:image/png;base64,xx"}, _result(1)]
    src, fake, clock = _source(lambda q, p, n: rows if p == 1 else [], max_results=10, pause_s=0)
    found, reason = src.search_query("corgi", "photo corgi")
    assert [c.url for c in found] == ["https://img.example/1.jpg"] and reason is None
