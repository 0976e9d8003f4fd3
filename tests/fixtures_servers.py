"""Fixtures that start real servers on 127.0.0.1: moto's S3 API server (a subprocess) and a TCP proxy.

Registered for every test by ``pytest_plugins`` in tests/conftest.py.
Every process started here is killed in teardown, also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}

__all__ = [
    "PrefectServer",
    "PrefectWorker",
    "MotoServer",
    "TcpProxy",
    "descendants",
    "free_port",
    "kill_tree",
    "moto_server",
    "s3_env",
    "s3_uri",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Linux /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: parse after the last ')'.
        fields = text[text.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_tree(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process, its group and every descendant (Prefect puts flow runs in their own
    sessions, so the group alone is not enough), then SIGKILL whatever is left."""
    family = descendants(proc.pid)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    _signal_all(family, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 3
    while any(_alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    family += descendants(proc.pid) if proc.poll() is None else []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    _signal_all([p for p in family if _alive(p)], signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


class MotoServer:
    """moto's S3 server as a subprocess (tests/moto_server.py) on a free loopback port."""

    def __init__(self, log_path: Path | None = None):
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> MotoServer:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "moto_server.py"), "--port", str(self.port or 0)],
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith(b"MOTO_READY"):
                    self.port = int(line.split()[1])
                    # Keep draining stdout so the server never blocks on a full pipe.
                    threading.Thread(target=self.proc.stdout.read, daemon=True).start()
                    return self
            if self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"moto server did not start (last line {line!r}; log {self.log_path})")

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc)


class TcpProxy:
    """A loopback TCP forwarder that can be taken down and up again (simulates a network outage).

    Stopping it closes the listener and all live connections, so clients see "connection refused"
    or a reset — what a dead S3 endpoint looks like — while the server behind keeps its data.
    """

    def __init__(self, target_port: int, port: int | None = None):
        self.target_port = target_port
        self.port = port or free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._trip: bytes | None = None
        self.tripped = False

    def fail_on(self, pattern: bytes) -> None:
        """Go down (like stop()) the moment a client sends bytes containing ``pattern``; the
        request is not forwarded. E.g. ``b"/ledger/"``: S3 dies just as the ledger is written."""
        self.tripped = False
        self._trip = pattern

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()
        return self

    def stop(self) -> None:
        with self._lock:
            ls, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if ls is not None:
            with contextlib.suppress(OSError):
                ls.shutdown(socket.SHUT_RDWR)
            ls.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not ls:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b, inspect in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, inspect), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, inspect: bool) -> None:
        try:
            while data := src.recv(65536):
                if inspect and self._trip is not None and self._trip in data:
                    self._trip = None
                    self.tripped = True
                    self.stop()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """Environment for a Prefect process isolated in ``home`` (own profile, database, results)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_PROFILES_PATH=str(home / "profiles.toml"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


class PrefectServer:
    """``prefect server start`` on a free loopback port with its own PREFECT_HOME (SQLite)."""

    def __init__(self, home: Path, port: int | None = None, ui: bool = False):
        self.home = home
        self.port = port or free_port()
        self.ui = ui  # serve the web UI too (the browser test); off elsewhere: it costs start time
        self.proc: subprocess.Popen | None = None
        self.log_path = home / "server.log"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self) -> dict[str, str]:
        """Environment for clients (CLI, workers, tests) of this server."""
        return prefect_env(self.home, self.api_url)

    def start(self, timeout: float = 180.0) -> PrefectServer:
        import urllib.request

        self.home.mkdir(parents=True, exist_ok=True)
        env = prefect_env(self.home)
        if self.ui:
            env["PREFECT_SERVER_UI_ENABLED"] = "true"
            # Else the UI asks for the API at the default port 4200, not at --port.
            env["PREFECT_UI_API_URL"] = self.api_url
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("prefect")),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--ui" if self.ui else "--no-ui",
                "--analytics-off",
            ],
            env=env,
            stdout=open(self.log_path, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"prefect server did not start on {self.api_url}:\n{tail}")

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc, timeout=20)


class PrefectWorker:
    """``prefect worker start --pool POOL`` as its own process group, in its own directory."""

    def __init__(
        self,
        server: PrefectServer,
        pool: str,
        workdir: Path,
        env: dict[str, str],
        limit: int | None = 1,
    ):
        self.server = server
        self.limit = limit
        self.pool = pool
        self.workdir = workdir
        self.extra_env = env
        self.name = f"{pool}-worker-{uuid.uuid4().hex[:6]}"
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"worker-{pool}.log"

    def start(self) -> PrefectWorker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**self.server.env(), **self.extra_env}
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("prefect")),
                "worker",
                "start",
                "--pool",
                self.pool,
                "--type",
                "process",
                "--name",
                self.name,
                *(["--limit", str(self.limit)] if self.limit else []),
            ],
            cwd=self.workdir,
            env=env,
            stdout=open(self.log_path, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def kill(self) -> None:
        """SIGKILL the worker and every flow run it started, at once (a machine dying)."""
        if self.proc is not None and self.proc.poll() is None:
            family = descendants(self.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            _signal_all(family, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc, timeout=20)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto S3 server per test session; each test gets its own bucket (``s3_uri``)."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment pointing boto3 (and freshnet) at the moto server, with dummy credentials."""
    env = {**S3_TEST_ENV, "FRESHNET_S3_ENDPOINT_URL": moto_server.endpoint_url}
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3_uri(s3_env: dict[str, str]) -> str:
    """A fresh, empty bucket on the moto server, as ``s3://bucket/prefix``."""
    from freshnet.storage_s3 import S3Storage

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    S3Storage(bucket).ensure_bucket()
    return f"s3://{bucket}/freshnet"
