"""The runner's HTTP front: the user-facing port, forwarding each request to the current app (Backend).

The front is HTTP-aware only as far as routing needs: one request per upstream connection, and
Gradio's session affinity (a `queue/join` and the `queue/data` stream that delivers its result
must reach the same app). Everything after the request head (bodies, SSE streams, websocket
upgrades) is piped as bytes. It runs an asyncio loop in a thread of the runner's process.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# A Gradio session's join whose result stream has not been opened yet keeps its app alive this
# long (the client opens the stream right after the join answers).
PENDING_JOIN_S = 10.0
MAX_HEAD_BYTES = 64 * 1024
MAX_JOIN_BODY = 1024 * 1024  # join bodies are small JSON; bigger ones are not parsed for affinity
_SESSION_IN_BODY = re.compile(rb'"session_hash"\s*:\s*"([^"]{1,200})"')
_SESSION_IN_QUERY = re.compile(rb"(?:^|&)session_hash=([^&]{1,200})")
_HOP_HEADERS = {b"connection", b"keep-alive", b"proxy-connection"}


class ServeError(RuntimeError):
    """The Space could not be checked out or did not start."""


@dataclass(eq=False)
class Backend:
    """One running checkout of the Space (`python app.py` on an internal port)."""

    commit: str
    folder: Path
    port: int
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    retired: bool = False  # no new sessions; stopped once drained
    inflight: int = 0  # requests the front has routed here that have not finished
    pending: dict[bytes, float] = field(default_factory=dict)  # session -> join deadline
    streams: dict[bytes, int] = field(default_factory=dict)  # session -> open queue/data streams

    def drained(self) -> bool:
        now = time.monotonic()
        return self.inflight == 0 and all(t < now for t in self.pending.values())


class Front:
    """The user-facing port: forwards each HTTP request to the current backend (see module doc)."""

    def __init__(self, host: str, port: int):
        # Bound here, in the caller's thread, so a port in use fails `serve` at once.
        try:
            self.sock = socket.create_server((host, port))
        except OSError as exc:
            raise ServeError(
                f"cannot listen on {host}:{port} ({exc.strerror}): "
                "pass --port or set space.serve_port"
            ) from None
        self.host, self.port = host, self.sock.getsockname()[1]
        self.current: Backend | None = None
        self.sessions: dict[bytes, Backend] = {}  # Gradio session -> app of its latest join
        self.requests = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="freshnet-front", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(
                self._handle, sock=self.sock, limit=MAX_HEAD_BYTES
            )
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def switch(self, backend: Backend | None) -> Backend | None:
        """New requests go to ``backend`` from now on; returns the one they went to before."""
        with self._lock:
            old, self.current = self.current, backend
            if old is not None:
                old.retired = True
            return old

    def forget(self, backend: Backend) -> None:
        with self._lock:
            for key in [k for k, b in self.sessions.items() if b is backend]:
                del self.sessions[key]

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self.sock.close()

    # ---------------------------------------------------------------- routing

    def _route(self, session: bytes | None, kind: str) -> Backend | None:
        """The app for one request; counts it in flight there (under the lock, so a drain that
        starts right after the switch still sees it)."""
        with self._lock:
            cur = self.current
            chosen = cur
            known = self.sessions.get(session) if session else None
            alive = known is not None and known.proc.poll() is None
            if kind == "join":
                # A join rides an already open result stream (the client opens one per session).
                if alive and known is not None and session and known.streams.get(session):
                    chosen = known
                if chosen is not None and session:
                    self.sessions[session] = chosen
                    if len(chosen.pending) > 1000:  # joins whose stream never came
                        now = time.monotonic()
                        chosen.pending = {k: t for k, t in chosen.pending.items() if t > now}
                    chosen.pending[session] = time.monotonic() + PENDING_JOIN_S
            elif alive and kind != "heartbeat":
                chosen = known  # the result stream, cancel... of that session
            if chosen is None:
                return None
            # A page's heartbeat stream stays open as long as the page: it follows the current
            # app and does not hold a retired one up.
            chosen.inflight += kind != "heartbeat"
            if kind == "data" and session:
                chosen.pending.pop(session, None)
                chosen.streams[session] = chosen.streams.get(session, 0) + 1
            self.requests += 1
            return chosen

    def _done(self, backend: Backend, session: bytes | None, kind: str) -> None:
        with self._lock:
            backend.inflight -= kind != "heartbeat"
            if kind == "data" and session:
                left = backend.streams.get(session, 1) - 1
                if left > 0:
                    backend.streams[session] = left
                else:
                    backend.streams.pop(session, None)

    # ---------------------------------------------------------------- connections

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._forward(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except Exception:  # one broken connection must never take the front down
            log.exception("front: request failed")
        finally:
            writer.close()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            writer.write(_plain(400, "bad request line"))
            return
        method, target = parts[0], parts[1]
        headers = [ln.split(b":", 1) for ln in lines[1:] if b":" in ln]
        names = {n.strip().lower(): v.strip() for n, v in headers}
        path, _, query = target.partition(b"?")
        upgrade = b"upgrade" in names
        body = b""
        session: bytes | None = None
        kind = "other"
        if path.endswith(b"/queue/join") and method == b"POST":
            kind = "join"
            length = names.get(b"content-length", b"")
            if length.isdigit() and int(length) <= MAX_JOIN_BODY:
                body = await reader.readexactly(int(length))
                m = _SESSION_IN_BODY.search(body)
                session = m.group(1) if m else None
        else:
            m = _SESSION_IN_QUERY.search(query)
            session = m.group(1) if m else None
            if path.endswith(b"/queue/data"):
                kind = "data"
            elif b"/heartbeat/" in path:
                kind = "heartbeat"
        backend = self._route(session, kind)
        if backend is None:
            writer.write(_plain(503, "the Space is starting; try again in a few seconds"))
            await writer.drain()
            return
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", backend.port)
            except OSError:
                writer.write(_plain(502, f"the Space app on port {backend.port} is not answering"))
                await writer.drain()
                return
            # One request per upstream connection: the next request on the client's connection
            # is routed afresh (a keep-alive client must not stay pinned to a retired app).
            kept = [(n, v) for n, v in headers if upgrade or n.strip().lower() not in _HOP_HEADERS]
            out = [lines[0]] + [n + b":" + v for n, v in kept]
            if not upgrade:
                out.append(b"Connection: close")
            up_writer.write(b"\r\n".join(out) + b"\r\n\r\n" + body)
            try:
                await _pipe_both(reader, writer, up_reader, up_writer)
            finally:
                up_writer.close()
        finally:
            self._done(backend, session, kind)


async def _pipe_both(
    c_reader: asyncio.StreamReader,
    c_writer: asyncio.StreamWriter,
    u_reader: asyncio.StreamReader,
    u_writer: asyncio.StreamWriter,
) -> None:
    """Bytes both ways until the app closes (its answer is complete) or the client goes away."""

    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()

    async def answer() -> None:
        # The client may not reuse its connection: its next request must be routed afresh.
        head = await u_reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        status = lines[0].split(b" ")[1:2]
        if not (status and status[0].startswith(b"1")):  # 101 upgrades stay a tunnel
            kept = [
                ln for ln in lines[1:] if ln.split(b":", 1)[0].strip().lower() not in _HOP_HEADERS
            ]
            head = b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n"
        c_writer.write(head)
        await copy(u_reader, c_writer)

    down = asyncio.ensure_future(answer())
    up = asyncio.ensure_future(copy(c_reader, u_writer))
    try:
        # The answer ends when the app closes; a client that goes away (EOF) is passed on as a disconnect: Gradio cancels its events.
        await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (down, up):
            task.cancel()
        await asyncio.gather(down, up, return_exceptions=True)


def _plain(status: int, text: str) -> bytes:
    reason = {400: "Bad Request", 502: "Bad Gateway", 503: "Service Unavailable"}[status]
    body = text.encode() + b"\n"
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 2\r\nConnection: close\r\n\r\n"
    ).encode() + body
