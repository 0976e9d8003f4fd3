"""`freshnet serve` (issue 16): signals stop the app cleanly; a redeploy swaps apps with no gap."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from freshnet.config_sections import SpaceConfig
from freshnet.space.bundle import build_bundle
from freshnet.space.publish import publish
from tests.app_helpers import bundle_meta
from tests.fixtures_servers import free_port

REPO = Path(__file__).resolve().parents[1]

# A stand-in Space app for the signal tests (starts in well under a second): it answers HTTP on
# the port the runner gives it, and starts a child of its own, like the compile workers the real
# app's torch.compile starts. It writes its pid, its child's pid and its port for the test.
TINY_APP = """
import http.server, json, os, subprocess, sys, time
port = int(os.environ["GRADIO_SERVER_PORT"])
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(os.environ["TINY_APP_PIDS"], "a") as f:
    f.write(json.dumps({"app": os.getpid(), "child": child.pid, "port": port}) + "\\n")

class Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like uvicorn
    def do_GET(self):
        if self.path == "/slow":  # held open until the test releases it (or 20 s pass)
            end = time.monotonic() + 20
            while not os.path.exists("release") and time.monotonic() < end:
                time.sleep(0.01)
        body = b"tiny app " + os.path.basename(os.getcwd()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.do_GET()

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer((os.environ["GRADIO_SERVER_NAME"], port), Hello).serve_forever()
"""


def _git(*args: str, cwd: Path) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _tiny_space(path: Path) -> Path:
    path.mkdir()
    _git("init", "-q", "-b", "main", cwd=path)
    (path / "app.py").write_text(TINY_APP)
    _git("add", "app.py", cwd=path)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "tiny", cwd=path)
    return path


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its new parent) is not running.
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _get(url: str) -> str:
    import httpx

    return httpx.get(url, timeout=5).text


# SIGTERM (kill, systemctl, container stop) in the fast suite; Ctrl-C and hang-up in the slow one.
@pytest.mark.parametrize(
    "sig",
    [
        signal.SIGTERM,
        pytest.param(signal.SIGINT, marks=pytest.mark.slow),
        pytest.param(signal.SIGHUP, marks=pytest.mark.slow),
    ],
    ids=lambda s: s.name,
)
def test_serve_cli_stops_app_children_and_work_dir_on_signal(sig, tmp_path):
    """`freshnet serve` as a real process: the signal leaves nothing listening or running."""
    space_repo = _tiny_space(tmp_path / "space")
    config = tmp_path / "cfg.toml"
    config.write_text(
        f'classes = ["a", "b"]\nstorage = "file://{tmp_path / "store"}"\n'
        f'[space]\ntarget = "{space_repo}"\nfeedback_dir = "{tmp_path / "feedback"}"\n'
    )
    tmp, pids_file = tmp_path / "tmp", tmp_path / "pids.jsonl"
    tmp.mkdir()
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp), "TINY_APP_PIDS": str(pids_file)}
    cmd = [sys.executable, "-m", "freshnet.cli", "serve", "--config", str(config)]
    runner = subprocess.Popen(
        [*cmd, "--port", str(port), "--poll", "0.2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and runner.poll() is None:
            try:
                if _get(f"http://127.0.0.1:{port}/").startswith("tiny app"):
                    break
            except Exception:  # noqa: BLE001 - not answering yet: poll again
                pass
            time.sleep(0.1)
        assert _get(f"http://127.0.0.1:{port}/").startswith("tiny app")
        app = json.loads(pids_file.read_text().splitlines()[-1])
        assert _alive(app["app"]) and _alive(app["child"]) and _listening(app["port"])
        assert list(tmp.glob("freshnet-serve-*/*/app.py")), "no checkout in the work folder"

        runner.send_signal(sig)
        out, _ = runner.communicate(timeout=30)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.communicate()
    assert runner.returncode == 0, out[-3000:]
    assert f"{signal.Signals(sig).name}: stopping the Space app" in out
    assert not _listening(port), "the user-facing port still answers"
    assert not _listening(app["port"]), "the app's own port still answers"
    assert not _alive(app["app"]), "the app outlived `freshnet serve`"
    assert not _alive(app["child"]), "the app's child outlived `freshnet serve`"
    assert list(tmp.glob("freshnet-serve-*")) == [], "the work folder was left behind"


def test_front_routes_each_request_and_keeps_gradio_sessions_on_their_app(tmp_path):
    """After a switch, new requests (even on a kept-alive connection) reach the new app, while
    a Gradio session's result stream follows its join to the old app, which is then drained."""
    import httpx

    from freshnet.space.front import Backend, Front
    from freshnet.space.serve import _stop_proc

    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "TINY_APP_PIDS": str(tmp_path / "p")}
    apps = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "app.py").write_text(TINY_APP)
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "app.py"],
            cwd=folder,
            env={**env, "GRADIO_SERVER_PORT": str(port)},
            start_new_session=True,
        )
        apps.append(Backend(commit=name, folder=folder, port=port, proc=proc))
    a, b = apps
    front = Front("127.0.0.1", free_port())
    url = f"http://127.0.0.1:{front.port}"
    try:
        with httpx.Client(timeout=5) as c:
            assert c.get(url + "/").status_code == 503  # no app yet: a clear "starting"
            front.switch(a)
            for app in apps:
                deadline = time.monotonic() + 20
                while not _listening(app.port) and time.monotonic() < deadline:
                    time.sleep(0.05)
            assert c.get(url + "/").text == "tiny app a"
            join = {"data": [], "fn_index": 0, "session_hash": "s1"}
            assert c.post(url + "/gradio_api/queue/join", json=join).text == "tiny app a"
            assert not a.drained(), "a join whose result stream is not open yet holds its app"
            slow = threading.Thread(target=lambda: c.get(url + "/slow"))
            slow.start()
            while a.inflight == 0 and slow.is_alive():
                time.sleep(0.01)
            assert front.switch(b) is a and a.retired
            assert a.inflight == 1  # a request routed before the switch holds its app up
            # Same client, same kept-alive connection pool: routed afresh to the new app.
            assert c.get(url + "/").text == "tiny app b"
            data = url + "/gradio_api/queue/data?session_hash="
            assert c.get(data + "s1").text == "tiny app a"  # follows its join
            assert not a.drained() and slow.is_alive()  # the slow request is still open on a
            assert c.get(data + "s2").text == "tiny app b"  # an unknown session: current app
            (a.folder / "release").touch()
            slow.join(5)
            assert not slow.is_alive()
            # The client has its answer once the bytes arrive; the front counts the request done
            # when the app closes its side, a moment later (later still on a loaded machine).
            deadline = time.monotonic() + 5
            while not a.drained() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert a.drained() and a.inflight == 0 and b.inflight == 0
            # A new join of the session goes to the new app (its old stream is closed).
            assert c.post(url + "/gradio_api/queue/join", json=join).text == "tiny app b"
            assert c.get(data + "s1").text == "tiny app b"
    finally:
        front.close()
        for app in apps:
            _stop_proc(app.proc)
    assert not _listening(front.port)


def test_direct_mode_redeploys_on_the_same_port_and_reports_the_gap(tmp_path, caplog, monkeypatch):
    """front=False: the app binds the user port, so a redeploy has a gap; it is measured."""
    from freshnet.space.serve import SpaceRunner

    repo = _tiny_space(tmp_path / "space")
    monkeypatch.setenv("TINY_APP_PIDS", str(tmp_path / "pids.jsonl"))
    port = free_port()
    runner = SpaceRunner(str(repo), port=port, work_dir=tmp_path / "work", poll_s=0.1, front=False)
    thread = threading.Thread(target=runner.run, daemon=True)
    caplog.set_level("INFO", logger="freshnet.space.serve")
    try:
        thread.start()
        deadline = time.monotonic() + 20
        while len(runner.deploys) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        first = runner.commit
        assert _get(runner.url) == f"tiny app {first[:12]}"
        (repo / "app.py").write_text(TINY_APP + "\n# v2\n")
        _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "v2", cwd=repo)
        while len(runner.deploys) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner.commit != first and _get(runner.url) == f"tiny app {runner.commit[:12]}"
    finally:
        runner.stop()
        thread.join(30)
    gap = runner.deploys[-1]["gap_s"]
    assert gap > 0 and runner.deploys[0]["gap_s"] is None  # no gap on the first start
    assert f"gap_s={gap}" in caplog.text
    assert runner.port == port and not _listening(port)


def test_a_port_in_use_is_a_clear_error(tmp_path):
    from freshnet.space.front import ServeError
    from freshnet.space.serve import SpaceRunner

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        runner = SpaceRunner(str(_tiny_space(tmp_path / "space")), port=port)
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{port} .*--port"):
            runner.run()
    assert not runner.work_dir.exists()


@pytest.mark.slow
def test_redeploy_under_polling_load_fails_no_request(space_model, example_photos, tmp_path):
    """A client predicting every 100 ms through a redeploy (v1 -> v2) sees no failed request."""
    from gradio_client import Client, handle_file

    from freshnet.space.serve import SpaceRunner

    target = str(tmp_path / "space")
    cfg = SpaceConfig(target=target)

    def publish_version(version: str, parent: str | None) -> str:
        bundle = build_bundle(
            space_model, bundle_meta(version), example_photos[:1], tmp_path / version, cfg
        )
        return publish(bundle, target, version, parent)

    c1 = publish_version("v1", None)
    runner = SpaceRunner(target, port=free_port(), work_dir=tmp_path / "work", poll_s=0.5)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    results: list[tuple[float, str, str | None]] = []  # (time, version or "", error)
    try:
        deadline = time.monotonic() + 240
        while runner.commit != c1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert runner.commit == c1 and runner.deploys[-1]["ready_check"] == "predict"
        v1_proc = runner.proc
        client = Client(runner.url, verbose=False, httpx_kwargs={"timeout": 60})
        photo = handle_file(str(example_photos[1]))
        stop_polling = threading.Event()

        def poll() -> None:
            while not stop_polling.is_set():
                t = time.monotonic()
                try:
                    label = client.predict(photo, api_name="/predict")["label"]
                    assert label in bundle_meta("x")["classes"]
                    version = client.predict(api_name="/metadata")["version"]
                    results.append((t, version, None))
                except Exception as exc:  # noqa: BLE001 - every failure counts; the test reports them
                    results.append((t, "", f"{type(exc).__name__}: {exc}"))
                stop_polling.wait(max(0.0, 0.1 - (time.monotonic() - t)))

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        while len(results) < 5 and time.monotonic() < deadline:  # the client is polling v1
            time.sleep(0.1)
        c2 = publish_version("v2", c1)
        published = time.monotonic()
        while runner.commit != c2 and time.monotonic() - published < 180:
            time.sleep(0.2)
        assert runner.commit == c2, "runner did not deploy v2"
        switched = time.monotonic()
        # Keep polling while the old app drains and stops.
        while v1_proc.poll() is None and time.monotonic() - switched < 40:
            time.sleep(0.2)
        time.sleep(1)
        stop_polling.set()
        poller.join(60)
    finally:
        runner.stop()
        thread.join(60)

    failed = [r for r in results if r[2]]
    versions = [r[1] for r in results if not r[2]]
    deploy = runner.deploys[-1]
    first_v2 = next((t for t, v, _ in results if v == "v2"), None)
    print(
        f"\nredeploy: {len(results)} polls, {len(failed)} failed; "
        f"v2 answered {first_v2 - published:.1f} s after the push; deploy {deploy}"
        if first_v2
        else f"\nredeploy: no v2 answer; {len(results)} polls, {len(failed)} failed"
    )
    assert failed == [], failed[:5]
    assert "v1" in versions and versions[-1] == "v2"
    # Once the switch happened no request reached v1 again (no flapping between apps).
    assert versions == sorted(versions), versions
    assert deploy["gap_s"] == 0.0 and deploy["previous"] == c1[:12]
    assert deploy["ready_check"] == "predict" and deploy["cut_requests"] == 0
    assert v1_proc.poll() is not None, "the old app was not stopped after the switch"
    assert runner.proc is None and not _listening(runner.port)
