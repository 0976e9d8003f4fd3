"""The safe downloader against a hostile local web: caps, timeouts, redirects, SSRF guard."""

from __future__ import annotations

import ipaddress
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from freshnet.config_sections import DownloadConfig
from freshnet.data.download import download
from freshnet.data.url_guard import address_problem, normalize_url, parse_networks
from tests.badcorpus import HOST, CorpusServer

CFG = DownloadConfig(
    allow_private=[f"{HOST}/32"],
    max_bytes=2_000_000,
    connect_timeout_s=2,
    read_timeout_s=1.0,
    total_timeout_s=1.5,
)


@pytest.fixture(scope="module")
def web():
    with CorpusServer() as srv:
        yield srv


def test_every_network_case_ends_with_its_reason(web):
    paths = [
        "/good.jpg",
        "/zero.jpg",
        "/gzip-bomb.jpg",
        "/drip.jpg",
        "/loop-a",
        "/chain-0",
        "/to-good",
        "/to-localhost",
        "/to-metadata",
        "/missing.jpg",
        "/error.jpg",
        "/lying-length.jpg",
        "/declared-huge.jpg",
    ]
    expected = {
        "/good.jpg": "ok",
        "/zero.jpg": "ok",  # an empty 200 is fetched fine; images.py calls it not_image
        "/to-good": "ok",
    }
    results = download([web.url(p) for p in paths], CFG)
    got = {p: r.status for p, r in zip(paths, results, strict=True)}
    want = {p: expected.get(p, web.cases[p][0]) for p in paths}
    assert got == want, {p: (r.status, r.detail) for p, r in zip(paths, results, strict=True)}
    by = dict(zip(paths, results, strict=True))
    assert by["/to-good"].final_url.endswith("/good2.jpg")
    assert by["/to-good"].data and by["/to-good"].data[:3] == b"\xff\xd8\xff"
    assert "127.0.0.1" in by["/to-localhost"].detail and "loopback" in by["/to-localhost"].detail
    assert (
        "169.254.169.254" in by["/to-metadata"].detail and "link-local" in by["/to-metadata"].detail
    )
    assert by["/drip.jpg"].seconds < 5


def test_private_targets_refused_unless_allowed(web):
    strict = DownloadConfig()  # public only
    res = download(
        [web.url("/good.jpg"), "http://localhost:9/x.jpg", "http://[::ffff:127.0.0.2]:9/x.jpg"],
        strict,
    )
    assert [r.status for r in res] == ["blocked_address"] * 3, [(r.status, r.detail) for r in res]
    assert "IPv4-mapped" in res[2].detail
    # The name "localhost" is resolved and refused at connect time, even though 127.0.0.2 is allowed.
    assert download(["http://localhost:9/x.jpg"], CFG)[0].status == "blocked_address"


def test_bad_urls():
    res = download(
        ["ftp://example.com/a.jpg", "not a url", "file:///etc/passwd", "http:///nohost"], CFG
    )
    assert [r.status for r in res] == ["bad_url"] * 4


class _UAHandler(BaseHTTPRequestHandler):
    seen: list[str] = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.seen.append(self.headers.get("User-Agent", ""))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


def test_user_agent_names_freshnet():
    srv = ThreadingHTTPServer((HOST, 0), _UAHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        res = download([f"http://{HOST}:{srv.server_address[1]}/x"], CFG)
        assert res[0].status == "ok" and res[0].data == b"ok"
        assert "freshnet" in _UAHandler.seen[0].lower()
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize(
    ("url", "norm"),
    [
        ("HTTP://Example.COM:80/a.jpg#frag", "http://example.com/a.jpg"),
        ("https://example.com:443", "https://example.com/"),
        ("https://user:pw@example.com/x?b=1&a=2", "https://example.com/x?b=1&a=2"),
        ("http://example.com:8080/a%20b.jpg", "http://example.com:8080/a%20b.jpg"),
        ("  http://[::1]:8000/x  ", "http://[::1]:8000/x"),
    ],
)
def test_normalize_url(url, norm):
    assert normalize_url(url) == norm


@pytest.mark.parametrize(
    ("ip", "blocked"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "non-global"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("::ffff:8.8.8.8", "IPv4-mapped"),
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
    ],
)
def test_address_policy(ip, blocked):
    problem = address_problem(ipaddress.ip_address(ip), [])
    if blocked is None:
        assert problem is None
    else:
        assert problem and blocked in problem


def test_allow_private_networks():
    nets = parse_networks(["127.0.0.1/32", "10.0.0.0/8"])
    assert address_problem(ipaddress.ip_address("127.0.0.1"), nets) is None
    assert address_problem(ipaddress.ip_address("10.9.9.9"), nets) is None
    assert address_problem(ipaddress.ip_address("127.0.0.2"), nets)
    with pytest.raises(ValueError, match="allow_private"):
        parse_networks(["nonsense"])
