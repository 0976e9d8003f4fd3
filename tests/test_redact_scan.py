"""A git Space target that carries a token never shows the token anywhere (issue 13, defect 6).

A real git smart-HTTP server on 127.0.0.1 (``git http-backend`` behind basic auth) is the Space.
One real embedded night publishes to ``http://alice:TOKEN@127.0.0.1:PORT/space.git`` against a
real Prefect server; ``config check``, ``status`` and a manual promote with a wrong token (an
error that quotes the URL, a failed flow, the failure webhook) run too. Then every place a person
or a later run can read is scanned for both tokens: the Prefect API (logs, artifacts, flow run
parameters and states, events), every file under the test's root (storage: ledger, decisions,
history, nights; Prefect's home and database; the work folder), the CLI outputs and the webhook.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.fixtures_servers import PrefectServer
from tests.served_stack import Inbox

REPO = Path(__file__).resolve().parents[1]
NIGHT = "2026-12-02"
USER = "alice"
TOKEN = "ghp_SCANTOKEN_5d1e9c"
WRONG = "ghp_WRONGTOKEN_77aa01"


class GitHttpServer:
    """``git http-backend`` as CGI behind HTTP basic auth (user alice, password TOKEN)."""

    def __init__(self, root: Path):
        self.root = root
        self.authorized: list[str] = []  # paths served with the right Authorization header
        self.refused = 0  # requests with wrong credentials
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def _handle(self) -> None:
                expected = "Basic " + base64.b64encode(f"{USER}:{TOKEN}".encode()).decode()
                given = self.headers.get("Authorization")
                if given != expected:
                    server.refused += given is not None  # credentials sent, and wrong
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="space"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                server.authorized.append(self.path)
                path, _, query = self.path.partition("?")
                body = self._body()
                env = {
                    "PATH": os.environ["PATH"],
                    "GIT_PROJECT_ROOT": str(server.root),
                    "GIT_HTTP_EXPORT_ALL": "1",
                    "PATH_INFO": path,
                    "QUERY_STRING": query,
                    "REQUEST_METHOD": self.command,
                    "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                    "CONTENT_LENGTH": str(len(body)),
                    "REMOTE_USER": USER,
                    "REMOTE_ADDR": "127.0.0.1",
                }
                if self.headers.get("Content-Encoding"):
                    env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
                if self.headers.get("Git-Protocol"):
                    env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
                out = subprocess.run(
                    ["git", "http-backend"], input=body, env=env, capture_output=True, timeout=60
                ).stdout
                head, _, payload = out.partition(b"\r\n\r\n")
                if not _:
                    head, _, payload = out.partition(b"\n\n")
                status, headers = 200, []
                for line in head.decode("latin-1").splitlines():
                    name, _, value = line.partition(":")
                    if name.lower() == "status":
                        status = int(value.split()[0])
                    elif name:
                        headers.append((name, value.strip()))
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                # git sends a pack over http.postBuffer (1 MiB) in chunks.
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()  # the blank line after the last chunk
                return b"".join(chunks)

            do_GET = do_POST = _handle

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, token: str) -> str:
        return f"http://{USER}:{token}@127.0.0.1:{self.port}/space.git"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _post(url: str, body: dict) -> list | dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "freshnet.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    root = tmp_path_factory.mktemp("redact-scan")
    repos = root / "git"
    bare = repos / "space.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    subprocess.run(["git", "config", "http.receivepack", "true"], cwd=bare, check=True)
    git = GitHttpServer(repos)
    inbox = Inbox()
    server = PrefectServer(root / "prefect").start()
    try:
        work = root / "work"
        work.mkdir()
        config = REPO / "configs" / "demo.toml"
        env = {
            **server.env(),
            "FRESHNET_STORAGE": f"file://{root / 'store'}",
            "FRESHNET_SPACE__TARGET": git.url(TOKEN),
            "FRESHNET_CACHE": str(root / "cache"),
            "FRESHNET_WEBHOOK_URL": inbox.url,
            # The redaction is under test, not the model: a small, quick night that promotes.
            "FRESHNET_SOURCE__DEMO_PER_QUERY": "16",
            "FRESHNET_DATASET__MIN_TRAIN_PER_CLASS": "10",
            "FRESHNET_DATASET__MIN_HOLDOUT_PER_CLASS": "3",
            "FRESHNET_TRAIN__IMAGE_SIZE": "64",
            "FRESHNET_TRAIN__EPOCHS": "1",
            "FRESHNET_POLICY__ACCURACY_FLOOR": "0",
            "FRESHNET_LABEL_CHECK__ENABLED": "false",
            "GIT_TERMINAL_PROMPT": "0",  # a wrong token must fail, not wait for a password
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        outputs: dict[str, subprocess.CompletedProcess] = {}
        outputs["check"] = _cli(["config", "check", str(config)], env, work)
        outputs["run"] = _cli(
            ["run", "--config", str(config), "--night", NIGHT, "--json", "night.json"], env, work
        )
        assert outputs["run"].returncode == 0, (
            outputs["run"].stdout[-3000:],
            outputs["run"].stderr[-5000:],
        )
        summary = json.loads((work / "night.json").read_text())
        outputs["status"] = _cli(["status", "--config", str(config)], env, work)
        # A manual promote through the credentialed URL: the promote flow's own publish,
        # ledger entry, Space link artifact and event.
        version = summary["challenger"]["version"]
        outputs["promote"] = _cli(
            ["promote", "--config", str(config), version, "--reason", "scan"], env, work
        )
        assert outputs["promote"].returncode == 0, outputs["promote"].stderr[-5000:]
        # The same version again through a wrong token: an error that quotes the URL, a failed
        # promote flow run (its state message, logs) and the failure webhook.
        wrong = {**env, "FRESHNET_SPACE__TARGET": git.url(WRONG)}
        outputs["wrong"] = _cli(
            ["promote", "--config", str(config), version, "--reason", "scan"], wrong, work
        )
        yield {
            "root": root,
            "bare": bare,
            "git": git,
            "api": server.api_url,
            "summary": summary,
            "outputs": outputs,
            "inbox": inbox,
        }
    finally:
        server.stop()
        inbox.stop()
        git.stop()


def _api_texts(api: str) -> dict[str, str]:
    """Everything the Prefect API shows about the runs, as JSON text per kind."""
    texts = {}
    for kind, body in {
        "flow_runs": {},
        "task_runs": {},
        "logs": {},
        "artifacts": {},
        "deployments": {},
        "variables": {},
    }.items():
        pages, offset = [], 0
        while True:
            page = _post(f"{api}/{kind}/filter", {**body, "limit": 200, "offset": offset})
            pages += page
            if len(page) < 200:
                break
            offset += 200
        texts[kind] = json.dumps(pages)
    # The newest events, and freshnet's own (one page each; the database scan sees them all).
    texts["events"] = json.dumps(
        [
            _post(f"{api}/events/filter", {"limit": 50}),
            _post(
                f"{api}/events/filter",
                {"filter": {"event": {"prefix": ["freshnet."]}}, "limit": 50},
            ),
        ]
    )
    return texts


@pytest.mark.slow
def test_a_token_in_the_git_target_appears_nowhere(scanned):
    out = scanned["outputs"]
    # Positive: the night really published through the credentialed URL.
    assert scanned["summary"]["outcome"] == "promoted", scanned["summary"]["outcome"]
    commit = scanned["summary"]["commit"]
    head = subprocess.run(
        ["git", "rev-parse", "refs/heads/main"],
        cwd=scanned["bare"], capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert head != commit  # the manual promote published a new commit on top of the night's
    parent = subprocess.run(
        ["git", "rev-parse", "refs/heads/main^"],
        cwd=scanned["bare"], capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert parent == commit
    assert head[:12] in out["promote"].stdout, out["promote"].stdout
    authorized = scanned["git"].authorized
    assert any("git-receive-pack" in p for p in authorized), authorized
    assert scanned["git"].refused > 0  # the wrong token was refused by the server
    # Each command ran and showed the target, masked.
    masked = f"http://***@127.0.0.1:{scanned['git'].port}/space.git"
    assert out["check"].returncode == 0, out["check"].stderr[-3000:]
    assert masked in out["check"].stdout
    assert out["status"].returncode == 0, out["status"].stderr[-3000:]
    assert out["wrong"].returncode != 0
    assert f"cannot read the Space at {masked}" in out["wrong"].stderr, out["wrong"].stderr
    assert masked in "\n".join(scanned["inbox"].messages), scanned["inbox"].messages

    places: dict[str, str] = {}
    for name, proc in out.items():
        places[f"cli {name} stdout"] = proc.stdout
        places[f"cli {name} stderr"] = proc.stderr
    places["webhook"] = "\n".join(scanned["inbox"].messages)
    api = _api_texts(scanned["api"])
    places.update({f"prefect api {k}": v for k, v in api.items()})
    for path in scanned["root"].rglob("*"):
        if not path.is_file() or scanned["bare"] in path.parents:
            continue
        places[f"file {path.relative_to(scanned['root'])}"] = path.read_bytes().decode("latin-1")
    # The scan saw what it means to scan.
    assert json.loads(api["logs"]) and json.loads(api["artifacts"])
    assert any("/ledger/" in k for k in places) and any("/nights/" in k for k in places)
    assert any(k.endswith(".db") for k in places)  # Prefect's database, everything it stored
    # Each path kept the target, masked: the Space link, the train run's parameters, the
    # failed promote's state, the ledger's target field, the promotion event.
    assert f"127.0.0.1:{scanned['git'].port}/space.git" in api["artifacts"]
    assert f'"target": "{masked}"' in api["flow_runs"]
    assert f"cannot read the Space at {masked}" in api["flow_runs"]
    assert any("/ledger/" in k and masked in v for k, v in places.items())
    assert f"freshnet.space.{masked}" in api["events"]

    leaks = sorted(
        f"{where}: ...{text[max(0, text.find(tok) - 120) : text.find(tok) + 40]!r}..."
        for where, text in places.items()
        for tok in (TOKEN, WRONG)
        if tok in text
    )
    assert not leaks, "\n".join(leaks)
