"""The safe concurrent downloader: async httpx with bounded concurrency, caps and an SSRF guard.

Every fetch ends as ``Fetched(status="ok", data=...)`` or one reason code:
``bad_url``, ``blocked_address``, ``timeout``, ``too_large``, ``http_4xx``, ``http_5xx``,
``http_other``, ``too_many_redirects``, ``truncated``, ``decode_error`` (broken content encoding),
``connection_error``.

Which addresses may be reached is decided in the connection layer by url_guard.GuardedBackend,
for every connection including each redirect hop; proxies from the environment are ignored so
nothing can route around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpcore
import httpx

from freshnet.config_sections import DownloadConfig
from freshnet.data.url_guard import (
    BlockedAddress,
    GuardedBackend,
    ResolveFailed,
    normalize_url,
    parse_networks,
)

if TYPE_CHECKING:
    import ssl

log = logging.getLogger(__name__)

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024


@dataclass
class Fetched:
    url: str  # the normalized URL asked for
    status: str  # "ok" or a reason code
    detail: str = ""
    data: bytes | None = None
    final_url: str = ""
    content_type: str = ""
    seconds: float = 0.0


def _make_client(
    cfg: DownloadConfig, ssl_context: ssl.SSLContext, backend: GuardedBackend
) -> httpx.AsyncClient:
    """A client whose pool serves one origin: per-origin pools avoid httpcore's O(connections)
    scans per request and the churn of one shared pool evicting other hosts' idle connections."""
    transport = httpx.AsyncHTTPTransport(verify=ssl_context, trust_env=False, retries=0)
    # httpx has no public hook for the network backend; the pool it builds is replaced by one
    # with the same settings plus the guard (checked by the SSRF tests).
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context,
        max_connections=cfg.per_host,
        max_keepalive_connections=cfg.per_host,
        keepalive_expiry=5.0,
        http1=True,
        http2=False,
        network_backend=backend,
    )
    timeout = httpx.Timeout(
        connect=cfg.connect_timeout_s,
        read=cfg.read_timeout_s,
        write=cfg.read_timeout_s,
        pool=cfg.total_timeout_s,
    )
    return httpx.AsyncClient(
        transport=transport,
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
        headers={
            "User-Agent": cfg.user_agent,
            "Accept-Encoding": "gzip, deflate",
            "Accept": "image/*,*/*;q=0.5",
        },
    )


class _TooLarge(Exception):
    pass


class _BadEncoding(Exception):
    pass


async def _read_capped(resp: httpx.Response, max_bytes: int) -> bytes:
    """Read the body, decoding gzip/deflate ourselves so the cap applies to decoded bytes as they grow."""
    encoding = resp.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        decoder = None
    elif encoding in ("gzip", "x-gzip", "deflate"):
        decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)  # auto-detect gzip or zlib header
    else:
        raise _BadEncoding(f"unsupported Content-Encoding {encoding!r}")
    buf = bytearray()
    raw_total = 0
    async for chunk in resp.aiter_raw(_CHUNK):
        raw_total += len(chunk)
        if raw_total > max_bytes:
            raise _TooLarge(f"body over {max_bytes} bytes")
        if decoder is None:
            buf += chunk
        else:
            data = chunk
            while data:
                try:
                    # max_length bounds each step: a gzip bomb never inflates past the cap.
                    out = decoder.decompress(data, max_bytes + 1 - len(buf))
                except zlib.error as exc:
                    raise _BadEncoding(f"broken {encoding} body: {exc}") from None
                buf += out
                if len(buf) > max_bytes:
                    raise _TooLarge(f"decoded body over {max_bytes} bytes ({encoding})")
                data = decoder.unconsumed_tail
        if len(buf) > max_bytes:
            raise _TooLarge(f"body over {max_bytes} bytes")
    if decoder is not None:
        buf += decoder.flush()
        if len(buf) > max_bytes:
            raise _TooLarge(f"decoded body over {max_bytes} bytes ({encoding})")
    return bytes(buf)


class Downloader:
    """Fetch many URLs concurrently under one global and one per-host limit. Use as async context."""

    def __init__(self, cfg: DownloadConfig):
        self.cfg = cfg
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._active: dict[str, int] = {}
        self._backend: GuardedBackend | None = None
        self._ssl: ssl.SSLContext | None = None
        self._global: asyncio.Semaphore | None = None
        self._hosts: dict[str, asyncio.Semaphore] = {}

    async def __aenter__(self) -> Downloader:
        self._backend = GuardedBackend(parse_networks(self.cfg.allow_private))
        self._ssl = httpx.create_ssl_context()
        self._global = asyncio.Semaphore(self.cfg.concurrency)
        return self

    async def __aexit__(self, *exc: object) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()

    @contextlib.asynccontextmanager
    async def _client_for(self, url: httpx.URL) -> AsyncIterator[httpx.AsyncClient]:
        origin = f"{url.scheme}://{url.netloc.decode('ascii')}"
        client = self._clients.get(origin)
        if client is None:
            assert self._backend is not None and self._ssl is not None  # set by __aenter__
            client = self._clients[origin] = _make_client(self.cfg, self._ssl, self._backend)
        self._active[origin] = self._active.get(origin, 0) + 1
        try:
            yield client
        finally:
            self._active[origin] -= 1
            # Bound open sockets when a night touches thousands of hosts: drop idle origins.
            if self._active[origin] == 0 and len(self._clients) > self.cfg.concurrency:
                del self._active[origin]
                if self._clients.pop(origin, None) is not None:
                    await client.aclose()

    def _host_sem(self, host: str) -> asyncio.Semaphore:
        sem = self._hosts.get(host)
        if sem is None:
            sem = self._hosts[host] = asyncio.Semaphore(self.cfg.per_host)
        return sem

    async def fetch(self, url: str) -> Fetched:
        """Fetch one URL (normalized first); never raises for network or content problems."""
        assert self._global is not None, "use `async with Downloader(cfg)`"
        start = time.monotonic()
        try:
            url = normalize_url(url)
        except ValueError as exc:
            return Fetched(url, "bad_url", str(exc))
        if url.startswith("file://"):
            return Fetched(url, "bad_url", "file:// URLs are only read for the folder source")
        async with self._global:
            result = await self._fetch(url)
        result.seconds = time.monotonic() - start
        return result

    async def _fetch(self, url: str) -> Fetched:
        current = url
        seen = {url}
        # The total budget counts time on the network only, not time queued for a host slot.
        budget = self.cfg.total_timeout_s
        for _hop in range(self.cfg.max_redirects + 1):
            host = httpx.URL(current).host
            try:
                async with self._host_sem(host):
                    hop_start = time.monotonic()
                    async with asyncio.timeout(budget):
                        hop = await self._hop(url, current)
                    budget -= time.monotonic() - hop_start
            except TimeoutError:
                return Fetched(
                    url,
                    "timeout",
                    f"not complete within total_timeout_s={self.cfg.total_timeout_s}",
                    final_url=current,
                )
            if isinstance(hop, Fetched):
                return hop
            if hop in seen:
                return Fetched(
                    url, "too_many_redirects", f"redirect loop at {hop}", final_url=current
                )
            seen.add(hop)
            current = hop
        return Fetched(
            url,
            "too_many_redirects",
            f"more than {self.cfg.max_redirects} redirects",
            final_url=current,
        )

    async def _hop(self, url: str, current: str) -> Fetched | str:
        """One request: the final Fetched, or the next URL when redirected."""
        try:
            async with (
                self._client_for(httpx.URL(current)) as client,
                client.stream("GET", current) as resp,
            ):
                if resp.status_code in REDIRECT_CODES:
                    return _redirect_target(url, current, resp)
                return await self._body(url, current, resp)
        except (
            BlockedAddress,
            _TooLarge,
            _BadEncoding,
            ResolveFailed,
            httpx.HTTPError,
            OSError,
        ) as exc:
            return _failure(url, current, exc)

    async def _body(self, url: str, current: str, resp: httpx.Response) -> Fetched:
        """A non-redirect response: its status class, or the body read up to max_bytes."""
        code = resp.status_code
        if 400 <= code < 500:
            return Fetched(url, "http_4xx", f"HTTP {code}", final_url=current)
        if code >= 500:
            return Fetched(url, "http_5xx", f"HTTP {code}", final_url=current)
        if not 200 <= code < 300:
            return Fetched(url, "http_other", f"HTTP {code}", final_url=current)
        declared = resp.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.cfg.max_bytes:
            return Fetched(
                url,
                "too_large",
                f"Content-Length {declared} > max_bytes {self.cfg.max_bytes}",
                final_url=current,
            )
        data = await _read_capped(resp, self.cfg.max_bytes)
        return Fetched(
            url,
            "ok",
            data=data,
            final_url=current,
            content_type=resp.headers.get("content-type", ""),
        )


def _redirect_target(url: str, current: str, resp: httpx.Response) -> Fetched | str:
    """Where a redirect points (normalised), or why it is refused."""
    code = resp.status_code
    location = resp.headers.get("location")
    if not location:
        return Fetched(url, "http_other", f"HTTP {code} without Location", final_url=current)
    try:
        nxt = normalize_url(str(resp.url.join(location)))
    except ValueError as exc:
        return Fetched(url, "bad_url", f"redirect from {current}: {exc}", final_url=current)
    if nxt.startswith("file://"):
        return Fetched(url, "bad_url", f"redirect to {nxt} refused", final_url=current)
    return nxt


def _failure(url: str, current: str, exc: BaseException) -> Fetched:
    """The outcome status for an exception raised while fetching ``current``."""
    # Order matters: the httpx subclasses before httpx.HTTPError, everything before OSError.
    if isinstance(exc, BlockedAddress):
        return Fetched(url, "blocked_address", str(exc), final_url=current)
    if isinstance(exc, _TooLarge):
        return Fetched(url, "too_large", str(exc), final_url=current)
    if isinstance(exc, _BadEncoding):
        return Fetched(url, "decode_error", str(exc), final_url=current)
    if isinstance(exc, ResolveFailed):
        return Fetched(url, "connection_error", str(exc), final_url=current)
    if isinstance(exc, httpx.TimeoutException):
        return Fetched(url, "timeout", f"{type(exc).__name__} at {current}", final_url=current)
    if isinstance(exc, httpx.RemoteProtocolError):
        text = str(exc).lower()
        reason = "truncated" if "incomplete" in text or "closed" in text else "connection_error"
        return Fetched(url, reason, f"{current}: {exc}", final_url=current)
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return Fetched(url, "bad_url", f"{current}: {exc}", final_url=current)
    if isinstance(exc, httpx.HTTPError):
        return Fetched(
            url, "connection_error", f"{current}: {type(exc).__name__}: {exc}", final_url=current
        )
    return Fetched(url, "connection_error", f"{current}: {exc}", final_url=current)


async def fetch_all(urls: list[str], cfg: DownloadConfig) -> list[Fetched]:
    """Fetch a small list of URLs (bytes kept in memory); ingest streams instead."""
    async with Downloader(cfg) as dl:
        return list(await asyncio.gather(*(dl.fetch(u) for u in urls)))


def download(urls: list[str], cfg: DownloadConfig) -> list[Fetched]:
    """Synchronous wrapper of fetch_all for scripts and tests."""
    return asyncio.run(fetch_all(urls, cfg))
