"""Local Space runner: serve the Space repo's HEAD with `python app.py`, redeploy on each new commit.

The local stand-in for Hugging Face's automatic rebuilds (`freshnet serve`, `make app`).

Zero-gap redeploys: the runner owns the user-facing port through a small HTTP front (a
forwarder in a thread of this process) and runs each app on an internal port. A new commit
starts next to the serving one; once it answers a real prediction, the front sends new requests
to it and the old app is stopped after its last request (a drain); how the front routes is in
freshnet.space.front.

With ``front=False`` the app binds the user port itself; the old app must then stop before the
new one can bind, and each deploy logs how long the port was unanswered (the gap).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from freshnet.space.front import Backend, Front, ServeError
from freshnet.space.publish import HfPublisher, PublishError, _git, publisher_for, space_head

log = logging.getLogger(__name__)


class SpaceRunner:
    """Serves the Space repo's HEAD on a fixed port and follows it, one commit at a time."""

    def __init__(
        self,
        target: str,
        port: int = 7860,
        host: str = "127.0.0.1",
        work_dir: Path | None = None,
        poll_s: float = 2.0,
        start_timeout_s: float = 300.0,
        feedback_dir: str | None = None,
        python: str = sys.executable,
        front: bool = True,
        drain_s: float = 30.0,
    ):
        if isinstance(publisher_for(target), HfPublisher):
            raise ServeError(
                f"{target} is served by Hugging Face itself; serve a git repo or local path"
            )
        self.target = target
        self.host = host
        self.poll_s = poll_s
        self.start_timeout_s = start_timeout_s
        self.feedback_dir = feedback_dir
        self.python = python
        self.drain_s = drain_s
        self.port = port
        self._want_front = front
        self.front: Front | None = None  # bound when serving starts (run or deploy)
        self._own_work = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="freshnet-serve-"))
        self.commit: str | None = None
        self.backend: Backend | None = None
        self.deploys: list[dict[str, Any]] = []  # timings of each deploy (also logged)
        self._starting: Backend | None = None
        self._stop = threading.Event()
        self._closed = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.backend.proc if self.backend else None

    def checkout(self, commit: str) -> Path:
        """The Space's files at ``commit`` in their own folder (kept, so a restart is instant)."""
        dest = self.work_dir / commit[:12]
        if (dest / "app.py").exists():
            return dest
        tmp = self.work_dir / f".{commit[:12]}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        remote = publisher_for(self.target).remote  # type: ignore[union-attr]
        _git("clone", "-q", "--no-checkout", remote, str(tmp))
        _git("checkout", "-q", commit, cwd=tmp)
        shutil.rmtree(tmp / ".git", ignore_errors=True)
        tmp.rename(dest)
        return dest

    def _spawn(self, folder: Path, commit: str, port: int) -> Backend:
        env = {
            **os.environ,
            "GRADIO_SERVER_PORT": str(port),
            "GRADIO_SERVER_NAME": "127.0.0.1" if self._want_front else self.host,
            "GRADIO_ANALYTICS_ENABLED": "False",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        if self.feedback_dir:
            fd = self.feedback_dir
            # s3://bucket/prefix is passed as-is; a folder as an absolute path (the app's cwd differs).
            env["FRESHNET_FEEDBACK"] = fd if fd.startswith("s3://") else str(Path(fd).resolve())
        log_file = open(folder.parent / f"{folder.name}.log", "ab")  # the app child owns it
        # Its own process group: stopping the app also stops whatever it started (compile
        # workers), and a Ctrl-C in the terminal reaches the runner only, which stops it in order.
        proc = subprocess.Popen(
            [self.python, "app.py"],
            cwd=folder,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        return Backend(commit=commit, folder=folder, port=port, proc=proc)

    def _wait_ready(self, b: Backend) -> str:
        """Wait until the app answers a real prediction (an example image through /predict);
        returns how readiness was checked. Raises ServeError (the app is stopped) on failure."""
        url = f"http://127.0.0.1:{b.port}/"
        deadline = time.monotonic() + self.start_timeout_s
        examples = sorted(
            p for p in (b.folder / "examples").glob("*") if p.suffix.lower() in (".jpg", ".png")
        )
        last = ""
        while time.monotonic() < deadline and not self._stop.is_set():
            if b.proc.poll() is not None:
                tail = (b.folder.parent / f"{b.folder.name}.log").read_text(errors="replace")
                raise ServeError(
                    f"the Space at {b.folder.name} exited with {b.proc.returncode}:\n{tail[-1500:]}"
                )
            if _answers(url):
                if not examples:
                    return "http"  # not a freshnet app: an answering page is all we can check
                try:
                    _predict(url, examples[0])
                    return "predict"
                except Exception as exc:  # noqa: BLE001 - still warming up, or a broken build: retry until due
                    last = f" (last prediction: {type(exc).__name__}: {exc})"
            time.sleep(0.3)
        _stop_proc(b.proc)
        if self._stop.is_set():
            raise ServeError(f"stopped while {b.folder.name} was starting")
        raise ServeError(
            f"the Space at {b.folder.name} did not answer on {url} "
            f"in {self.start_timeout_s:.0f} s{last}"
        )

    def _ensure_front(self) -> None:
        if self._want_front and self.front is None:
            self.front = Front(self.host, self.port)
            self.port = self.front.port

    def deploy(self, commit: str) -> None:
        """Check out ``commit`` and start it next to the serving app; switch once it answers."""
        self._ensure_front()
        t0 = time.monotonic()
        folder = self.checkout(commit)
        checkout_s = time.monotonic() - t0
        old = self.backend
        record: dict[str, Any] = {"commit": commit[:12], "checkout_s": round(checkout_s, 2)}
        if self.front is None and old is not None:
            # The app binds the user port itself: the old one must go first (a gap).
            _stop_proc(old.proc)
            self.backend = None
        gap_from = time.monotonic()
        port = _free_port() if self.front else self.port
        t1 = time.monotonic()
        self._starting = b = self._spawn(folder, commit, port)
        try:
            check = self._wait_ready(b)
        except ServeError:
            self.commit = commit  # do not retry the same broken commit every poll
            record["failed"] = True
            self.deploys.append(record)
            if self.front is None and old is not None and not self._stop.is_set():
                log.info("restarting the previous commit %s", old.commit[:12])
                self.backend = self._spawn(old.folder, old.commit, self.port)
                self._wait_ready(self.backend)
            raise
        finally:
            self._starting = None
        record.update(start_s=round(time.monotonic() - t1, 2), ready_check=check)
        self.backend, self.commit = b, commit
        if self.front is not None:
            self.front.switch(b)
            record["gap_s"] = 0.0
            if old is not None:
                record.update(previous=old.commit[:12], **self._drain(old))
        else:
            record["gap_s"] = round(time.monotonic() - gap_from, 2) if old is not None else None
        record["total_s"] = round(time.monotonic() - t0, 2)
        self.deploys.append(record)
        log.info(
            "serving Space commit %s at %s: %s",
            commit[:12],
            self.url,
            ", ".join(f"{k}={v}" for k, v in record.items() if k != "commit"),
        )

    def _drain(self, old: Backend) -> dict[str, Any]:
        """Stop ``old`` once the requests and Gradio sessions it holds are done (at most drain_s)."""
        t = time.monotonic()
        deadline = t + self.drain_s
        while not old.drained() and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(0.05)
        cut = old.inflight
        _stop_proc(old.proc)
        self.front.forget(old)  # type: ignore[union-attr]
        if cut:
            log.warning("stopped %s with %d request(s) still open", old.commit[:12], cut)
        return {"drain_s": round(time.monotonic() - t, 2), "cut_requests": cut}

    def poll_once(self) -> bool:
        """Deploy the repo's HEAD if it changed; True when a deploy happened."""
        try:
            head = space_head(self.target)
        except PublishError as exc:
            log.warning("cannot read the Space repo: %s", exc)
            return False
        if head is None or head == self.commit:
            return False
        try:
            self.deploy(head)
        except (ServeError, PublishError) as exc:
            if self._stop.is_set():
                return False
            log.warning("could not deploy %s: %s", head[:12], exc)
            return False
        return True

    def run(self) -> None:
        """Serve until stop(), polling for new commits every poll_s seconds; always cleans up."""
        try:
            self._ensure_front()  # a port in use fails here, at once
            while not self._stop.is_set():
                self.poll_once()
                if self.commit is None and not self._stop.is_set():
                    log.info("waiting for a first commit in %s", self.target)
                self._stop.wait(self.poll_s)
        finally:
            self.close()

    def stop(self) -> None:
        """Ask run() to return (safe from a signal handler or another thread)."""
        self._stop.set()

    def close(self) -> None:
        """Stop every app this runner started, the front, and remove its own work folder."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for b in (self._starting, self.backend):
            if b is not None:
                _stop_proc(b.proc)
        self.backend = None
        if self.front is not None:
            self.front.close()
        if self._own_work:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def _predict(url: str, image: Path) -> None:
    from gradio_client import Client, handle_file

    # A timeout: a hung app must not hang the runner (Gradio's stream heartbeat is 15 s).
    Client(url, verbose=False, httpx_kwargs={"timeout": 30}).predict(
        handle_file(str(image)), api_name="/predict"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            answered: bool = resp.status < 500
            return answered
    except (urllib.error.URLError, OSError):
        return False


def _stop_proc(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """SIGTERM the app's whole process group (it leads its own, see _spawn); SIGKILL whatever
    is left after ``timeout_s``, children included."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 2  # the app's own children exit right after it, or are killed
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None or _group_alive(proc.pid):
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs (zombies do not count: where nothing
    reaps orphans, as in many containers, they stay in the group until the container ends)."""
    proc_fs = Path("/proc")
    if not (proc_fs / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for stat in proc_fs.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def serve(
    target: str,
    port: int = 7860,
    host: str = "127.0.0.1",
    poll_s: float = 2.0,
    work_dir: Path | None = None,
    feedback_dir: str | None = ".freshnet/feedback",
    front: bool = True,
) -> None:
    """`freshnet serve`: run the Space from its repo and redeploy on every new commit (blocks).

    SIGTERM, SIGINT and SIGHUP all stop the app (its whole process group) and remove the work
    folder. Corrections from the app's "wrong label?" box land in ``feedback_dir`` (pass
    cfg.space.feedback_dir), outside the checkouts, so they survive redeploys.
    """
    runner = SpaceRunner(
        target,
        port=port,
        host=host,
        poll_s=poll_s,
        work_dir=work_dir,
        feedback_dir=feedback_dir,
        front=front,
    )

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: stopping the Space app", signal.Signals(signum).name)
        runner.stop()

    # A handler for all three (not KeyboardInterrupt): cleanup runs however the runner is
    # stopped, and a second signal during cleanup cannot interrupt it halfway.
    previous = {}
    if threading.current_thread() is threading.main_thread():  # Python allows no other
        previous = {
            s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
    try:
        runner.run()
    finally:
        runner.close()
        for s, h in previous.items():
            signal.signal(s, h)
