"""Local Space runner: serve the Space repo's HEAD with `python app.py`, redeploy on each new commit.

The local stand-in for Hugging Face's automatic rebuilds (`freshnet serve`, `make app`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from freshnet.space import HfPublisher, PublishError, _git, publisher_for, space_head

log = logging.getLogger(__name__)


class ServeError(RuntimeError):
    """The Space could not be checked out or did not start."""


class SpaceRunner:
    """Runs one checkout of the Space at a time on a fixed port and follows the repo's HEAD."""

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
    ):
        if isinstance(publisher_for(target), HfPublisher):
            raise ServeError(
                f"{target} is served by Hugging Face itself; serve a git repo or local path"
            )
        self.target = target
        self.port = port
        self.host = host
        self.poll_s = poll_s
        self.start_timeout_s = start_timeout_s
        self.feedback_dir = feedback_dir
        self.python = python
        self._own_work = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="freshnet-serve-"))
        self.commit: str | None = None
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

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

    def _start(self, folder: Path) -> subprocess.Popen:
        env = {
            **os.environ,
            "GRADIO_SERVER_PORT": str(self.port),
            "GRADIO_SERVER_NAME": self.host,
            "GRADIO_ANALYTICS_ENABLED": "False",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        if self.feedback_dir:
            fd = self.feedback_dir
            # s3://bucket/prefix is passed as-is; a folder as an absolute path (the app's cwd differs).
            env["FRESHNET_FEEDBACK"] = fd if fd.startswith("s3://") else str(Path(fd).resolve())
        log_file = open(folder.parent / f"{folder.name}.log", "ab")  # noqa: SIM115 (child owns it)
        proc = subprocess.Popen(
            [self.python, "app.py"], cwd=folder, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
        log_file.close()
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (folder.parent / f"{folder.name}.log").read_text(errors="replace")[-1500:]
                raise ServeError(
                    f"the Space at {folder.name} exited with {proc.returncode}:\n{tail}"
                )
            if _answers(self.url):
                return proc
            time.sleep(0.3)
        _terminate(proc)
        raise ServeError(
            f"the Space at {folder.name} did not answer on {self.url} in {self.start_timeout_s:.0f} s"
        )

    def deploy(self, commit: str) -> None:
        """Check out ``commit`` first (the old app keeps serving meanwhile), then swap processes."""
        folder = self.checkout(commit)
        previous, old_proc = self.commit, self.proc
        if old_proc is not None:
            _terminate(old_proc)
            self.proc = None
        try:
            self.proc = self._start(folder)
            self.commit = commit
            log.info("serving Space commit %s at %s", commit[:12], self.url)
        except ServeError:
            log.exception("commit %s failed to start", commit[:12])
            self.commit = commit  # do not retry the same broken commit every poll
            if previous is not None:
                log.info("restarting the previous commit %s", previous[:12])
                self.proc = self._start(self.checkout(previous))
            raise

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
            log.warning("could not deploy %s: %s", head[:12], exc)
            return False
        return True

    def run(self) -> None:
        """Serve until stop() (or Ctrl-C), polling for new commits every poll_s seconds."""
        try:
            while not self._stop.is_set():
                self.poll_once()
                if self.commit is None:
                    log.info("waiting for a first commit in %s", self.target)
                self._stop.wait(self.poll_s)
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self.proc is not None:
            _terminate(self.proc)
            self.proc = None
        if self._own_work:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status < 500
    except (urllib.error.URLError, OSError):
        return False


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(
    target: str,
    port: int = 7860,
    host: str = "127.0.0.1",
    poll_s: float = 2.0,
    work_dir: Path | None = None,
    feedback_dir: str | None = ".freshnet/feedback",
) -> None:
    """`freshnet serve`: run the Space from its repo and redeploy on every new commit (blocks).

    Corrections from the app's "wrong label?" box land in ``feedback_dir`` (pass
    cfg.space.feedback_dir), outside the checkouts, so they survive redeploys.
    """
    runner = SpaceRunner(
        target, port=port, host=host, poll_s=poll_s, work_dir=work_dir, feedback_dir=feedback_dir
    )
    try:
        runner.run()
    except KeyboardInterrupt:
        runner.close()
