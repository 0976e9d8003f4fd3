"""A local stand-in for the image-search endpoints the installed ddgs (9.x) calls.

Real HTTP on 127.0.0.1 (threaded http.server). ``ddgs.DDGS().images`` uses two engines:
  duckduckgo  GET  /            the vqd token page (ddgs reads ``vqd="..."`` out of the HTML)
              GET  /i.js        JSON {"results": [...], "next": "i.js?...&s=100"}; page k is ``s``
  bing        GET  /images/async  HTML tiles (``a.iusc[@m]`` JSON with ``murl``); ``first``/``count``
With backend "auto" ddgs tries them in random order and stops at the first that answers (both are
provider "bing"), so during a DuckDuckGo block Bing may answer instead.

Blocking: ``block_after`` served DuckDuckGo searches, DuckDuckGo refuses everything for
``block_s`` seconds, as the real service does: mode "ratelimit" answers the token page with
HTTP 202 and the anomaly page (no vqd: ddgs raises "Could not extract vqd") and i.js with 403;
mode "403" serves the token but refuses i.js with 403 (ddgs: "No results found."); mode "empty"
answers i.js with 200 and no results (ddgs: "No results found."). After the block the counter
starts again, so a long night is blocked again after another ``block_after`` searches.
``block_bing`` blocks Bing the same way (403) at the same time.

The stand-in also works as a plain-HTTP forward proxy (an absolute URL in the request line), so
a test can check that ddgs really went through a configured proxy (``proxied`` counts those).

``point_ddgs_at(monkeypatch, url)`` points the engines' ``search_url`` class attributes at the
stand-in; ddgs fetches the vqd token from a hard-coded https://duckduckgo.com, so that one
method is replaced by the same two lines against the stand-in (real HTTP, ddgs's own parser).
"""

from __future__ import annotations

import html
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

DDG_PAGE = 100  # the real i.js answers ~100 results per page and pages with s=100, 200, ...

RATELIMIT_HTML = (
    "<!DOCTYPE html><html><head><title>DuckDuckGo</title></head><body>"
    "<div class='anomaly-modal__title'>Unfortunately, bots use DuckDuckGo too.</div>"
    "<p>Please complete the following challenge to confirm this search was made by a human.</p>"
    "<p>If this error persists, please let us know: error-lite@duckduckgo.com</p></body></html>"
)


@dataclass
class Hit:
    at: float  # time.monotonic()
    engine: str  # "vqd", "duckduckgo", "bing"
    query: str
    offset: int
    status: int
    results: int


@dataclass
class DdgStandIn:
    results_per_query: int = 150  # DuckDuckGo corpus size of every query (pages of DDG_PAGE)
    bing_results_per_query: int = 60
    block_after: int | None = None  # served DuckDuckGo searches before a block
    block_s: float = 0.0
    block_mode: str = "ratelimit"  # "ratelimit", "403", "empty"
    block_bing: bool = False
    empty_queries: set[str] = field(default_factory=set)  # queries with no results at all
    hits: list[Hit] = field(default_factory=list)
    proxied: int = 0

    def __post_init__(self) -> None:
        if self.block_mode not in ("ratelimit", "403", "empty"):
            raise ValueError(f"block_mode {self.block_mode!r}: allowed ratelimit, 403, empty")
        self.lock = threading.Lock()
        self._served = 0  # DuckDuckGo searches served since the last block
        self._blocked_until = 0.0
        self.blocks: list[tuple[float, float]] = []  # (start, end) monotonic
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=lambda: self.server.serve_forever(poll_interval=0.05), daemon=True
        )

    def __enter__(self) -> DdgStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------ corpus

    @staticmethod
    def image_url(engine: str, query: str, i: int) -> str:
        slug = "-".join(query.split())
        return f"https://img-{engine}.example/{slug}/{i}.jpg"

    def expected_urls(self, query: str, engine: str = "duckduckgo") -> list[str]:
        if query in self.empty_queries:
            return []
        n = self.results_per_query if engine == "duckduckgo" else self.bing_results_per_query
        return [self.image_url(engine, query, i) for i in range(n)]

    def calls(self, engine: str = "duckduckgo") -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.engine == engine]

    # ------------------------------------------------------------ blocking

    def block_from_now(self, after: int, seconds: float, mode: str = "ratelimit") -> None:
        """Block for ``seconds`` after ``after`` more DuckDuckGo searches."""
        if mode not in ("ratelimit", "403", "empty"):
            raise ValueError(f"block mode {mode!r}: allowed ratelimit, 403, empty")
        with self.lock:
            self.block_after, self.block_s, self.block_mode = after, seconds, mode
            self._served = 0

    def blocked(self, now: float) -> bool:
        with self.lock:
            return now < self._blocked_until

    def _admit(self, now: float) -> bool:
        """Whether a DuckDuckGo search is served now; starts a block after block_after of them."""
        with self.lock:
            if now < self._blocked_until:
                return False
            if self.block_after is not None and self._served >= self.block_after:
                self._served = 0
                self._blocked_until = now + self.block_s
                self.blocks.append((now, self._blocked_until))
                return False
            self._served += 1
            return True

    # ------------------------------------------------------------ HTTP

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        # http.server builds a handler per request and passes it no state: a subclass per
        # stand-in carries this one.
        return type("Handler", (_DdgHandler,), {"stand": self})


class _DdgHandler(BaseHTTPRequestHandler):
    """DuckDuckGo's token page and image API and Bing's image page, served by the stand-in."""

    stand: DdgStandIn  # set per stand-in by its _handler()

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: str, ctype: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _hit(self, engine: str, query: str, offset: int, status: int, n: int) -> None:
        with self.stand.lock:
            self.stand.hits.append(Hit(time.monotonic(), engine, query, offset, status, n))

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.scheme:  # a forward-proxy request line: GET http://host/path HTTP/1.1
            with self.stand.lock:
                self.stand.proxied += 1
        params = {k: v[0] for k, v in parse_qs(parts.query).items()}
        query = params.get("q", "")
        if parts.path in ("/", ""):
            self._vqd(query)
        elif parts.path == "/i.js":
            self._ijs(query, params)
        elif parts.path == "/images/async":
            self._bing(query, params)
        else:
            self._send(404, "not found", "text/plain")

    def _vqd(self, query: str) -> None:
        now = time.monotonic()
        if self.stand.block_mode == "ratelimit" and self.stand.blocked(now):
            self._hit("vqd", query, 0, 202, 0)
            self._send(202, RATELIMIT_HTML, "text/html")
            return
        token = f"4-{abs(hash(query)) % 10**12}"
        self._hit("vqd", query, 0, 200, 0)
        self._send(
            200,
            f'<html><head><script>vqd="{token}";</script></head><body></body></html>',
            "text/html",
        )

    def _ijs(self, query: str, params: dict[str, str]) -> None:
        offset = int(params.get("s", "0") or 0)
        if not params.get("vqd"):
            self._hit("duckduckgo", query, offset, 403, 0)
            self._send(403, "", "text/html")
            return
        if not self.stand._admit(time.monotonic()):
            if self.stand.block_mode == "empty":
                self._hit("duckduckgo", query, offset, 200, 0)
                body = {"ads": None, "query": query, "results": [], "next": None}
                self._send(200, json.dumps(body), "application/json")
            else:
                self._hit("duckduckgo", query, offset, 403, 0)
                self._send(403, RATELIMIT_HTML, "text/html")
            return
        urls = self.stand.expected_urls(query)
        page = urls[offset : offset + DDG_PAGE]
        results = [
            {
                "title": f"{query} {offset + i}",
                "image": u,
                "thumbnail": f"https://tse.example/th?id={offset + i}",
                "url": f"https://page.example/{offset + i}",
                "height": 600,
                "width": 800,
                "source": "Bing",
            }
            for i, u in enumerate(page)
        ]
        body: dict = {"ads": None, "query": query, "results": results, "vqd": {}}
        if offset + DDG_PAGE < len(urls):
            nxt = {k: v for k, v in params.items() if k != "vqd"}
            nxt["s"] = str(offset + DDG_PAGE)
            body["next"] = "i.js?" + urlencode(nxt)
        self._hit("duckduckgo", query, offset, 200, len(results))
        self._send(200, json.dumps(body), "application/json")

    def _bing(self, query: str, params: dict[str, str]) -> None:
        first = int(params.get("first", "1") or 1)
        count = int(params.get("count", "35") or 35)
        if self.stand.block_bing and self.stand.blocked(time.monotonic()):
            self._hit("bing", query, first, 403, 0)
            self._send(403, "", "text/html")
            return
        urls = self.stand.expected_urls(query, "bing")[first - 1 : first - 1 + count]
        tiles = []
        for i, u in enumerate(urls):
            m = json.dumps({"murl": u, "turl": f"https://tse.example/b{i}", "t": query})
            tiles.append(
                "<div><div class='imgpt'>"
                f"<a class='iusc' m='{html.escape(m, quote=True)}' href='#'>x</a></div>"
                "<div class='infopt'><div class='lnkw'><a>page.example</a></div></div>"
                "</div>"
            )
        self._hit("bing", query, first, 200, len(urls))
        self._send(200, "<html><body>" + "".join(tiles) + "</body></html>", "text/html")


def point_ddgs_at(monkeypatch, url: str) -> None:
    """Send the real ddgs image engines to the stand-in at ``url`` (pytest monkeypatch)."""
    from ddgs.engines.bing_images import BingImages
    from ddgs.engines.duckduckgo_images import DuckduckgoImages
    from ddgs.utils import _extract_vqd

    monkeypatch.setattr(DuckduckgoImages, "search_url", f"{url}/i.js")
    monkeypatch.setattr(BingImages, "search_url", f"{url}/images/async")

    def _get_vqd(self, query: str) -> str:  # ddgs's own two lines, with the stand-in's address
        resp = self.http_client.request("GET", f"{url}/", params={"q": query})
        return _extract_vqd(resp.content, query)

    monkeypatch.setattr(DuckduckgoImages, "_get_vqd", _get_vqd)
