"""The served deployment on one machine, for tests and benchmarks: every part a real process.

A Prefect server (own PREFECT_HOME, loopback), moto's S3 server behind a TCP proxy that can fail
on cue, and two process workers (`cpu`, `gpu`), each with its own working directory, its own copy
of the project (as if on another machine), its own PREFECT_HOME and cache. Bootstrap and
`prefect --no-prompt deploy --all` run through their real command lines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from tests.fixtures_servers import (
    S3_TEST_ENV,
    MotoServer,
    PrefectServer,
    PrefectWorker,
    TcpProxy,
)

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
BUCKET = "freshnet-served"
# Deliberately recognisable: tests grep every log and artifact for it.
HF_TOKEN = "hf_servedTEST_9f3b2c1a7e5d4c3b2a1f0e9d"

# Training sized for plumbing tests (one short epoch at 64 px) and a policy that always promotes
# (floor 0, any change allowed), so every trained night goes through publish.
FAST_TRAIN_ENV = {
    "FRESHNET_TRAIN__EPOCHS": "1",
    "FRESHNET_TRAIN__FREEZE_EPOCHS": "0",
    "FRESHNET_TRAIN__IMAGE_SIZE": "64",
    "FRESHNET_TRAIN__BATCH_SIZE": "16",
    "FRESHNET_POLICY__ACCURACY_FLOOR": "0.0",
    "FRESHNET_POLICY__MIN_IMPROVEMENT": "-1.0",
    "FRESHNET_POLICY__MAX_RECALL_DROP": "1.0",
    "FRESHNET_POLICY__CANARY_LATENCY_S": "60",
    "FRESHNET_PREFECT__TRAIN_TIMEOUT_S": "900",
}
# Plus a small dataset: three classes, few images per query.
TEST_CONFIG_ENV = {
    **FAST_TRAIN_ENV,
    "FRESHNET_CLASSES": '["circle", "square", "triangle"]',
    "FRESHNET_SOURCE__DEMO_PER_QUERY": "16",
    "FRESHNET_DATASET__MIN_TRAIN_PER_CLASS": "8",
    "FRESHNET_DATASET__MIN_HOLDOUT_PER_CLASS": "2",
}


def copy_project(dest: Path) -> Path:
    """Copy the working tree (tracked + untracked, not ignored) — a checkout on another machine."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    for rel in filter(None, out.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


class Inbox:
    """A loopback HTTP endpoint collecting JSON POSTs (plays Slack for webhook notifications)."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        inbox = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                inbox.messages.append(body.decode(errors="replace"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _RetryingClient(httpx.Client):
    """Retries 429/503 with backoff, as Prefect's own client does: a busy SQLite-backed server
    answers 503 while its database is locked (seen here under load), which is not a failure."""

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        for attempt in range(6):
            response = super().send(request, **kwargs)
            if response.status_code not in (429, 503) or attempt == 5:
                return response
            response.close()
            time.sleep(min(2**attempt, 10))
        return response


class Api:
    """The few Prefect REST calls the tests need (plain HTTP: no client settings to juggle)."""

    def __init__(self, api_url: str):
        self.http = _RetryingClient(base_url=api_url, timeout=30)

    def deployment_id(self, name: str) -> str:
        r = self.http.get(f"/deployments/name/{name}")
        r.raise_for_status()
        return r.json()["id"]

    def create_run(self, deployment: str, parameters: dict) -> dict:
        r = self.http.post(
            f"/deployments/{self.deployment_id(deployment)}/create_flow_run",
            json={"parameters": parameters},
        )
        r.raise_for_status()
        return r.json()

    def flow_run(self, run_id: str) -> dict:
        r = self.http.get(f"/flow_runs/{run_id}")
        r.raise_for_status()
        return r.json()

    def retry(self, run_id: str) -> None:
        """Retry a finished flow run in place, as the UI's Retry button does."""
        r = self.http.post(
            f"/flow_runs/{run_id}/set_state",
            json={
                "state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "retry"},
                "force": True,
            },
        )
        r.raise_for_status()

    def wait(self, run_id: str, timeout: float, until: set[str] = TERMINAL) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            run = self.flow_run(run_id)
            if run["state"] and run["state"]["type"] in until:
                return run
            if time.monotonic() > deadline:
                return run
            time.sleep(2)

    def flow_runs(self, deployment_name: str | None = None, **flow_run_filter: Any) -> list[dict]:
        body: dict[str, Any] = {"sort": "EXPECTED_START_TIME_ASC", "limit": 200}
        if deployment_name:
            body["deployments"] = {"name": {"any_": [deployment_name]}}
        if flow_run_filter:
            body["flow_runs"] = flow_run_filter
        r = self.http.post("/flow_runs/filter", json=body)
        r.raise_for_status()
        return r.json()

    def task_runs(self, flow_run_id: str) -> list[dict]:
        r = self.http.post(
            "/task_runs/filter",
            json={"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200},
        )
        r.raise_for_status()
        return r.json()

    def artifacts(self) -> list[dict]:
        r = self.http.post("/artifacts/filter", json={"limit": 200})
        r.raise_for_status()
        return r.json()

    def logs(self) -> list[dict]:
        out: list[dict] = []
        while True:
            r = self.http.post("/logs/filter", json={"limit": 200, "offset": len(out)})
            r.raise_for_status()
            page = r.json()
            out += page
            if len(page) < 200:
                return out

    def close(self) -> None:
        self.http.close()


class ServedStack:
    """Start with ``ServedStack(root).start()``; ``stop()`` kills everything (call it in finally)."""

    def __init__(
        self,
        root: Path,
        config_env: dict[str, str] | None = None,
        gpu_env: dict[str, str] | None = None,
    ):
        self.root = root
        self.config_env = config_env or {}
        # FRESHNET_* overrides of the GPU machine only (the train flow applies them on top).
        self.gpu_env = gpu_env or {}
        self.storage_uri = f"s3://{BUCKET}/demo"
        self.space = root / "space"
        self.inbox = Inbox()
        self.moto = MotoServer(root / "moto.log")
        self.proxy: TcpProxy | None = None
        self.server = PrefectServer(root / "server")
        self.workers: dict[str, PrefectWorker] = {}
        self.api: Api | None = None
        self.timings: dict[str, float] = {}

    # -- environment -------------------------------------------------------------------------

    def s3_env(self) -> dict[str, str]:
        assert self.proxy is not None
        return {**S3_TEST_ENV, "FRESHNET_S3_ENDPOINT_URL": self.proxy.url}

    def worker_env(self, pool: str) -> dict[str, str]:
        home = self.root / pool
        env = {
            **self.s3_env(),
            "PREFECT_HOME": str(home / ".prefect"),
            "FRESHNET_PROJECT_DIR": str(home / "project"),
            "FRESHNET_CACHE": str(home / "cache"),
            # Heartbeats let the bootstrap's automation mark runs of a dead worker Crashed. It waits
            # 60 s, twice the interval, so a busy but healthy training is never taken for dead.
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
            # Workers ask for scheduled runs every 10 s by default; every nightly and train run
            # waited ~5 s on average just to be picked up.
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            # Fail fast when S3 is down: the test stops it on purpose.
            "FRESHNET_S3_MAX_ATTEMPTS": "2",
            "FRESHNET_S3_TIMEOUT_S": "20",
        }
        if pool == "cpu":
            # The nightly run reads its config there: storage, Space and test-sized overrides.
            env.update(
                FRESHNET_STORAGE=self.storage_uri,
                FRESHNET_SPACE__TARGET=str(self.space),
                FRESHNET_WEBHOOK_URL=self.inbox.url,
                HF_TOKEN=HF_TOKEN,
                **self.config_env,
            )
        if pool == "gpu":
            env.update(self.gpu_env)
        return env

    def cli_env(self) -> dict[str, str]:
        return {**self.server.env(), **self.s3_env()}

    def direct_storage(self):
        """The bucket straight through moto, bypassing the proxy (works while 'S3 is down')."""
        from freshnet.storage_s3 import S3Storage

        os.environ.update(S3_TEST_ENV)
        return S3Storage(BUCKET, "demo", endpoint_url=self.moto.endpoint_url)

    # -- lifecycle ---------------------------------------------------------------------------

    def _timed(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.monotonic() - t0, 1)

    def start(self) -> ServedStack:
        t0 = time.monotonic()
        self.moto.start()
        self.proxy = TcpProxy(self.moto.port).start()
        self.server.start()
        self._timed("server_start_s", t0)
        self.api = Api(self.server.api_url)
        for pool in ("cpu", "gpu"):
            copy_project(self.root / pool / "project")
        t0 = time.monotonic()
        self.bootstrap_output = self.bootstrap()
        self._timed("bootstrap_s", t0)
        t0 = time.monotonic()
        self.deploy()
        self._timed("deploy_s", t0)
        for pool in ("cpu", "gpu"):
            self.start_worker(pool)
        return self

    def bootstrap(self) -> str:
        env = {
            **self.cli_env(),
            "HF_TOKEN": HF_TOKEN,
            "FRESHNET_NOTIFY_WEBHOOK_URL": self.inbox.url,
        }
        r = subprocess.run(
            [
                sys.executable,
                "infra/bootstrap.py",
                "--storage",
                self.storage_uri,
                "--zombie-after-s",
                "60",
            ],
            cwd=self.root / "cpu" / "project",
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if r.returncode != 0:
            raise RuntimeError(f"bootstrap failed:\n{r.stdout}\n{r.stderr[-4000:]}")
        return r.stdout + r.stderr

    def deploy(self) -> str:
        project = self.root / "cpu" / "project"
        r = subprocess.run(
            [str(Path(sys.executable).with_name("prefect")), "--no-prompt", "deploy", "--all"],
            cwd=project,
            env={**self.cli_env(), "FRESHNET_PROJECT_DIR": str(project)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        if r.returncode != 0:
            raise RuntimeError(f"prefect deploy failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
        return r.stdout

    def start_worker(self, pool: str) -> PrefectWorker:
        limit = 1 if pool == "gpu" else None
        worker = PrefectWorker(
            self.server, pool, self.root / pool, self.worker_env(pool), limit=limit
        ).start()
        self.workers[pool] = worker
        return worker

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self.server.stop()
        if self.proxy is not None:
            self.proxy.stop()
        self.moto.stop()
        self.inbox.stop()
        if self.api is not None:
            self.api.close()

    # -- driving -----------------------------------------------------------------------------

    def run_nightly(self, night: str, timeout: float = 900, **params: Any) -> dict:
        assert self.api is not None
        run = self.api.create_run("nightly/nightly", {"night": night, **params})
        return self.api.wait(run["id"], timeout)

    def diagnostics(self) -> str:
        parts = [f"--- {p} worker log ---\n{w.log()[-6000:]}" for p, w in self.workers.items()]
        return "\n".join(parts)

    def ledger(self) -> tuple[list[str], bytes | None]:
        store = self.direct_storage()
        return store.list("ledger/entries/"), store.read_pointer("champion")[0]

    def space_commits(self) -> list[str]:
        if not (self.space / ".git").exists() and not (self.space / "HEAD").exists():
            return []
        r = subprocess.run(
            ["git", "log", "--format=%H", "--all"],
            cwd=self.space,
            capture_output=True,
            text=True,
        )
        return r.stdout.split()

    def summary_json(self) -> str:
        return json.dumps(self.timings)
