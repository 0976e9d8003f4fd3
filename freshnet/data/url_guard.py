"""Which URLs and addresses may be fetched: URL normalisation and the SSRF guard.

The SSRF guard lives in the connection layer (a wrapped httpcore network backend): every TCP
connection, including each redirect hop, resolves the host itself, refuses the connection if any
resolved address is not allowed, and connects to the address it checked, so neither a redirect
nor a second DNS answer can bypass it. Proxies from the environment are ignored for the same
reason (download.py builds its clients with ``trust_env=False``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

import httpcore
import httpx

# httpcore's socket option type (httpcore._backends.base.SOCKET_OPTION, not exported).
SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class BlockedAddress(Exception):
    """The target resolves to an address the config does not allow (SSRF guard)."""


class ResolveFailed(Exception):
    """The host name did not resolve."""


def normalize_url(url: str) -> str:
    """Canonical form used for de-duplication: lower-case scheme/host, no default port, no fragment
    or credentials; raises ValueError for anything that is not an absolute http(s) or file URL."""
    text = url.strip()
    try:
        u = httpx.URL(text)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"invalid URL {url!r}: {exc}") from None
    scheme = u.scheme.lower()
    if scheme == "file":
        if not u.path.startswith("/"):
            raise ValueError(f"file URL must be absolute: {url!r}")
        return f"file://{u.raw_path.decode('ascii')}"
    if scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL scheme {u.scheme!r} in {url!r} (http and https only)")
    host = u.raw_host.decode("ascii").lower().rstrip(".")
    if not host:
        raise ValueError(f"URL has no host: {url!r}")
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    default = {"http": 80, "https": 443}[scheme]
    port = f":{u.port}" if u.port not in (None, default) else ""
    path = u.raw_path.decode("ascii") or "/"
    return f"{scheme}://{host}{port}{path}"


def parse_networks(cidrs: Iterable[str]) -> list[IPNetwork]:
    """Parse allow_private CIDRs; a clear error names the bad entry."""
    nets = []
    for c in cidrs:
        try:
            nets.append(ipaddress.ip_network(c, strict=False))
        except ValueError as exc:
            raise ValueError(f"download.allow_private: invalid network {c!r}: {exc}") from None
    return nets


def address_problem(ip: IPAddress, allowed: list[IPNetwork]) -> str | None:
    """Why connecting to ``ip`` is refused, or None when it is fine."""
    if any(ip.version == n.version and ip in n for n in allowed):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"IPv4-mapped IPv6 address {ip}"
        if ip.sixtofour is not None or ip.teredo is not None:
            return f"tunnelled IPv6 address {ip}"
    for attr, what in (
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_unspecified", "unspecified"),
        ("is_reserved", "reserved"),
        ("is_private", "private"),
    ):
        if getattr(ip, attr):
            return f"{what} address {ip}"
    if not ip.is_global:
        return f"non-global address {ip}"
    return None


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolve, check every address, then connect to the checked address (no second lookup)."""

    def __init__(self, allowed: list[IPNetwork], inner: httpcore.AsyncNetworkBackend | None = None):
        self.allowed = allowed
        self.inner = inner or httpcore.AnyIOBackend()

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
            return [ip]
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ResolveFailed(f"cannot resolve {host!r}: {exc}") from None
        out: list[IPAddress] = []
        for info in infos:
            ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            if ip not in out:
                out.append(ip)
        if not out:
            raise ResolveFailed(f"no address for {host!r}")
        return out

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        ips = await self.resolve(host, port)
        # Refuse when ANY answer is disallowed: a hostile resolver may mix public and private.
        for ip in ips:
            problem = address_problem(ip, self.allowed)
            if problem:
                raise BlockedAddress(f"{host}: {problem}")
        return await self.inner.connect_tcp(
            str(ips[0]),
            port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise BlockedAddress("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)
