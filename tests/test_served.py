"""Served mode end to end: Prefect server, S3 (moto), a cpu and a gpu process worker, real deploys.

Everything runs as its own process on 127.0.0.1 (see tests/served_stack.py) and is killed in
teardown. The tests share one stack and run in file order: two nights, then the faults.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.served_stack import BUCKET, HF_TOKEN, TEST_CONFIG_ENV, ServedStack

pytestmark = pytest.mark.slow

ARTIFACT_KEYS = {
    "dataset-per-class",
    "rejections-by-reason",
    "decision-report",
    "space-commit",
    "night-outcome",
    "download-progress",
    "training-progress",
}
GPU_ENV = {"FRESHNET_TRAIN__INIT": "champion"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedStack]:
    # The GPU machine sets its own override: the train flow must apply it there (the cpu
    # worker's config says train.init = imagenet; nightly passes no champion model to start from).
    s = ServedStack(tmp_path_factory.mktemp("served"), TEST_CONFIG_ENV, GPU_ENV)
    try:
        s.start()
        yield s
    finally:
        s.stop()
        print("\nserved stack timings:", s.summary_json())


def state(run: dict) -> str:
    return (run.get("state") or {}).get("type", "NONE")


def expect(run: dict, wanted: str, stack: ServedStack) -> None:
    msg = (run.get("state") or {}).get("message")
    assert state(run) == wanted, f"run {run['name']}: {state(run)} {msg}\n{stack.diagnostics()}"


def train_runs(stack: ServedStack) -> list[dict]:
    assert stack.api is not None
    return stack.api.flow_runs("train")


def test_bootstrap_is_idempotent(stack: ServedStack) -> None:
    first = stack.bootstrap_output
    assert "work pool cpu" in first and "concurrency limit gpu=1" in first
    again = stack.bootstrap()
    for line in (
        "work pool cpu",
        "work pool gpu",
        "concurrency limit gpu=1",
        "s3 bucket",
        "secret block hf-token",
    ):
        row = next(r for r in again.splitlines() if line in r)
        assert "exists" in row, again
    assert HF_TOKEN not in first + again


def test_two_nights_served(stack: ServedStack) -> None:
    assert stack.api is not None
    t0 = time.monotonic()
    night1 = stack.run_nightly("1")
    expect(night1, "COMPLETED", stack)
    stack.timings["night1_s"] = round(time.monotonic() - t0, 1)
    entries1, champion1 = stack.ledger()
    assert len(entries1) == 1 and champion1

    t0 = time.monotonic()
    night2 = stack.run_nightly("2")
    expect(night2, "COMPLETED", stack)
    stack.timings["night2_s"] = round(time.monotonic() - t0, 1)

    # Training ran as the `train` deployment, on the gpu pool, picked up by the gpu worker.
    trains = train_runs(stack)
    assert len(trains) == 2 and all(state(r) == "COMPLETED" for r in trains), trains
    gpu_log, cpu_log = stack.workers["gpu"].log(), stack.workers["cpu"].log()
    for run in trains:
        assert run["work_pool_name"] == "gpu"
        assert run["id"] in gpu_log and run["id"] not in cpu_log
        assert run["parent_task_run_id"], "train must be linked to its nightly run"
    for run in (night1, night2):
        assert run["work_pool_name"] == "cpu" and run["id"] in cpu_log
    # No path of the deploying machine is baked into a deployment: each worker enters its own
    # checkout (the deploy ran with FRESHNET_PROJECT_DIR set to the cpu worker's).
    deployed = stack.api.http.post("/deployments/filter", json={}).json()
    assert deployed and all(str(stack.root) not in json.dumps(d["pull_steps"]) for d in deployed)
    # The gpu worker's own working directory got the training images, from S3.
    assert any((stack.root / "gpu" / "cache").rglob("*.jpg"))

    # S3 holds the snapshot and both models; only URIs crossed between the workers.
    store = stack.direct_storage()
    models = [k for k in store.list("models/") if k.endswith("/model.pkl")]
    assert len(models) == 2, models
    assert any(k.endswith(".parquet") for k in store.list("snapshots/"))
    for run in trains:
        params = json.dumps(run["parameters"])
        # Models cross as storage keys, never as bytes: every mention is a models/ key.
        refs = re.findall(r'"([^"]*model\.pkl)"', params)
        assert all(r.startswith("models/") or "/models/" in r for r in refs), refs
        assert len(params) < 20_000

    # The Space got one commit per promotion and the ledger advanced with it.
    entries2, champion2 = stack.ledger()
    decisions = [json.loads(store.get(k)) for k in store.list("decisions/") if k.endswith(".json")]
    promoted = sum(1 for d in decisions if d.get("decision", d).get("promote"))
    assert len(entries2) == promoted == 2, (entries2, decisions)
    assert champion2 != champion1
    commits = stack.space_commits()
    assert len(commits) >= 2
    ls = subprocess.run(
        ["git", "ls-tree", "--name-only", "HEAD"],
        cwd=stack.space,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert "model.pkl" in ls and "app.py" in ls
    head_entry = json.loads(store.get(entries2[-1]))
    space_head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=stack.space, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert head_entry["commit"] == space_head, (head_entry, space_head)

    # The monitoring artifacts exist for the nightly runs.
    artifacts = stack.api.artifacts()
    keys = {a["key"] for a in artifacts if a.get("key")}
    assert ARTIFACT_KEYS <= keys, keys
    runs_with_artifacts = {a["flow_run_id"] for a in artifacts}
    assert night2["id"] in runs_with_artifacts
    # Progress of download (nightly run) and training (train run, gpu worker) reached 100 %.
    progress = [a for a in artifacts if a["type"] == "progress"]
    for key, run_ids in (
        ("download-progress", {night1["id"], night2["id"]}),
        ("training-progress", {r["id"] for r in trains}),
    ):
        done = {a["flow_run_id"] for a in progress if a["key"] == key and a["data"] == 100.0}
        assert run_ids <= done, (key, progress)

    # The decision report of night 2 holds its rules with their status, the paired comparison
    # and the confusion matrix (a table, and an image served from S3 by a presigned URL).
    def latest(key: str, run_id: str) -> dict:
        mine = [a for a in artifacts if a["key"] == key and a["flow_run_id"] == run_id]
        assert mine, (key, run_id, keys)
        return max(mine, key=lambda a: a["created"])

    report = latest("decision-report", night2["id"])["data"]
    reports = [a for a in artifacts if a["key"] == "decision-report"]
    assert sorted(a["flow_run_id"] for a in reports) == sorted([night1["id"], night2["id"]]), (
        "one decision report per night (the final one)"
    )
    assert report.splitlines()[0].endswith(": PROMOTE"), report[:300]
    for part in ("## Rules", "## Champion vs challenger", "## Confusion matrix", "| bundle |"):
        assert part in report, (part, report)
    assert "not run" not in report.split("| bundle |")[1].split("\n")[0], "bundle was checked"
    image = latest("confusion-matrix", night2["id"])
    assert image["type"] == "image" and "X-Amz-Signature" in image["data"], image
    # The history table (fixed key) shows both nights side by side, newest first.
    rows = latest("night-history", night2["id"])["data"]
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert [r["night"] for r in rows[:2]] == ["2", "1"], rows
    for row in rows[:2]:
        assert row["decision"].startswith("promoted") and row["space commit"], row
        assert row["challenger accuracy"] is not None, row
    assert rows[0]["champion accuracy"] is not None, "night 2 had a champion to compare"

    # Runs are named by night and by model version; each night's state says how it ended.
    assert (night1["name"], night2["name"]) == ("night-1", "night-2")
    versions = {k.split("/")[1] for k in models}
    assert {r["name"] for r in trains} == versions
    for run in (night1, night2):
        assert run["state"]["message"].startswith("promoted v"), run["state"]
        assert any(a["key"] == "night-outcome" and a["flow_run_id"] == run["id"] for a in artifacts)

    # The gpu worker's own FRESHNET_* override took effect in the train flow there.
    for version in versions:
        metrics = json.loads(store.get(f"models/{version}/train.json"))["metrics"]
        assert "no champion model given" in metrics["init_note"], metrics

    # freshnet's own log lines reached each run's logs in the Prefect API: the night's summary
    # (nightly run, cpu worker), one line per training epoch and the warnings (train run, gpu).
    # Prefect ships run logs in batches after the run's state is final: wait for the last ones.
    deadline = time.monotonic() + 60
    while True:
        logs = stack.api.logs()
        night_ids = {e["flow_run_id"] for e in logs if e["name"] == "tasks.night"}
        if {night1["id"], night2["id"]} <= night_ids or time.monotonic() > deadline:
            break
        time.sleep(1)
    for run in (night1, night2):
        mine = [e for e in logs if e["flow_run_id"] == run["id"]]
        names = {e["name"] for e in mine}
        assert {"freshnet.cycle", "tasks.night"} <= names, names
        summary = [e["message"] for e in mine if e["name"] == "tasks.night"]
        assert any("promoted v" in m and "found" in m and "decision" in m for m in summary), summary
    for run in trains:
        mine = [e for e in logs if e["flow_run_id"] == run["id"]]
        epochs = [e["message"] for e in mine if e["message"].startswith("epoch ")]
        assert len(epochs) == 1 and "valid accuracy" in epochs[0], [e["message"] for e in mine]
        warnings = [
            e["message"] for e in mine if e["level"] >= 30 and e["name"] == "freshnet.model.train"
        ]
        assert any("init=champion not used" in m for m in warnings), warnings


def test_gpu_worker_killed_mid_training(stack: ServedStack) -> None:
    """kill -9 the gpu worker while it trains: nightly fails cleanly; rerun reuses ingestion."""
    assert stack.api is not None
    entries, champion = stack.ledger()
    commits = stack.space_commits()
    known = {r["id"] for r in train_runs(stack)}

    run = stack.api.create_run("nightly/nightly", {"night": "3"})
    deadline = time.monotonic() + 600
    training = None
    while time.monotonic() < deadline and training is None:
        for r in train_runs(stack):
            if r["id"] not in known and state(r) == "RUNNING":
                training = r
        time.sleep(1)
    assert training, f"training never started\n{stack.diagnostics()}"
    # Kill only once the train run's own process is inside the trainer (it has logged from it).
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(
        e["flow_run_id"] == training["id"] and e["name"].startswith("freshnet.model.")
        for e in stack.api.logs()
    ):
        time.sleep(1)
    stack.workers["gpu"].kill()

    # The heartbeat automation marks the orphaned train run Crashed; nightly then fails.
    failed = stack.api.wait(run["id"], timeout=420)
    expect(failed, "FAILED", stack)
    assert state(stack.api.flow_run(training["id"])) == "CRASHED"
    assert stack.ledger() == (entries, champion), "champion and ledger must be unchanged"
    assert stack.space_commits() == commits
    # The failure notification reached the webhook (flow hook and/or automation).
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not any(
        failed["name"] in m for m in stack.inbox.messages
    ):
        time.sleep(2)
    assert any(failed["name"] in m for m in stack.inbox.messages), stack.inbox.messages

    # A new gpu worker comes up; the rerun completes and reuses the cached search and download.
    stack.start_worker("gpu")
    rerun = stack.run_nightly("3")
    expect(rerun, "COMPLETED", stack)
    tasks = {t["name"]: t for t in stack.api.task_runs(rerun["id"])}
    cached = {
        name.split("-")[0]: t["state"]["name"]
        for name, t in tasks.items()
        if name.startswith(("search_images", "download_images"))
    }
    assert cached == {"search_images": "Cached", "download_images": "Cached"}, cached
    # Night 3's images were curated by the killed run; the rerun must still train on them.
    retrained = [r for r in train_runs(stack) if r["id"] not in known | {training["id"]}]
    assert [state(r) for r in retrained] == ["COMPLETED"], [state(r) for r in retrained]
    entries2, _ = stack.ledger()
    if len(entries2) > len(entries):  # the rerun trained and promoted: ledger matches the Space
        newest = json.loads(stack.direct_storage().get(entries2[-1]))
        assert newest["commit"] == space_head(stack)


def space_head(stack: ServedStack) -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=stack.space, capture_output=True, text=True
    ).stdout.strip()


def test_s3_down_during_publish(stack: ServedStack) -> None:
    """S3 dies just as the ledger is written (the Space commit is made, the ledger write is lost):
    the run fails, ledger and champion are unchanged, and the next publish succeeds on top.

    The publish here is the `rollback` deployment (publish an earlier version again): the same
    Space-commit-then-ledger path as the nightly promotion, without paying for a training.
    """
    assert stack.api is not None and stack.proxy is not None
    entries, champion = stack.ledger()
    commits = stack.space_commits()
    assert len(entries) >= 2, "needs two published versions"
    # Reads of the ledger pass; the first write of a ledger object kills S3 (path-style request line).
    stack.proxy.fail_on(f"PUT /{BUCKET}/demo/ledger/".encode())
    torn = stack.api.wait(stack.api.create_run("rollback/rollback", {})["id"], timeout=600)
    assert stack.proxy.tripped, f"publish never reached the ledger write\n{stack.diagnostics()}"
    expect(torn, "FAILED", stack)
    assert stack.ledger() == (entries, champion), "ledger and champion must be unchanged"
    assert len(stack.space_commits()) == len(commits) + 1, (
        "the Space commit was made before S3 died"
    )

    torn_commit = stack.space_commits()[0]
    stack.proxy.start()  # S3 is back
    nxt = stack.api.wait(stack.api.create_run("rollback/rollback", {})["id"], timeout=600)
    expect(nxt, "COMPLETED", stack)
    entries2, champion2 = stack.ledger()
    # The next publish first records the torn one (the Space serves its commit), then its own.
    assert len(entries2) == len(entries) + 2 and champion2 != champion
    healed = json.loads(stack.direct_storage().get(entries2[-2]))
    assert healed["kind"] == "rollback" and healed["commit"] == torn_commit
    newest = json.loads(stack.direct_storage().get(entries2[-1]))
    assert newest["kind"] == "rollback" and newest["parent_commit"] == torn_commit
    assert newest["commit"] == space_head(stack), "the ledger must name what the Space serves"


def test_two_triggers_run_one_cycle(stack: ServedStack) -> None:
    """Two nightly triggers at once: deployment concurrency 1 lets exactly one cycle run."""
    assert stack.api is not None
    trains_before = len(train_runs(stack))
    runs = [stack.api.create_run("nightly/nightly", {"night": "2"}) for _ in range(2)]
    done = [stack.api.wait(r["id"], timeout=600) for r in runs]
    assert sorted(state(r) for r in done) == ["CANCELLED", "COMPLETED"], [
        (r["name"], state(r), r["state"].get("message")) for r in done
    ]
    # The cycle that ran says how it ended and why, in its state and in an artifact (a night
    # with nothing new used to end green in seconds without a word).
    ran = next(r for r in done if state(r) == "COMPLETED")
    assert ran["name"] == "night-2" and ran["state"]["message"], ran["state"]
    outcome = [
        a
        for a in stack.api.artifacts()
        if a["key"] == "night-outcome" and a["flow_run_id"] == ran["id"]
    ]
    assert outcome and ran["state"]["message"] in outcome[0]["data"], outcome
    # One cycle, so at most one training (it trains when the snapshot holds images the
    # champion's dataset lacks, e.g. from an earlier night that did not promote).
    assert len(train_runs(stack)) - trains_before <= 1


def test_retried_night_finishes_without_training_again(stack: ServedStack) -> None:
    """Storage dies as the nightly evaluates (after training); the same flow run is retried and
    completes on the first attempt's training: the night's version is deterministic."""
    assert stack.api is not None and stack.proxy is not None
    before = {r["id"] for r in train_runs(stack)}
    # The first read of an evaluation record takes S3 down (path-style request line).
    stack.proxy.fail_on(f"GET /{BUCKET}/demo/evals/".encode())
    run = stack.api.create_run("nightly/nightly", {"night": "5"})
    failed = stack.api.wait(run["id"], timeout=900)
    assert stack.proxy.tripped, f"the night never reached evaluation\n{stack.diagnostics()}"
    expect(failed, "FAILED", stack)
    trained = [r for r in train_runs(stack) if r["id"] not in before]
    assert [state(r) for r in trained] == ["COMPLETED"], trained

    stack.proxy.start()  # S3 is back; retry the same flow run, as the UI's Retry button does
    stack.api.retry(run["id"])
    done = stack.api.wait(run["id"], timeout=900)
    expect(done, "COMPLETED", stack)
    assert done["run_count"] >= 2, "the same flow run must have run again"
    again = [r for r in train_runs(stack) if r["id"] not in before]
    assert [r["id"] for r in again] == [trained[0]["id"]], "a retry must not train again"
    # Ledger and Space agree after the retried night.
    entries, _ = stack.ledger()
    newest = json.loads(stack.direct_storage().get(entries[-1]))
    assert newest["commit"] == space_head(stack)


def test_hf_token_never_leaks(stack: ServedStack) -> None:
    """The HF token (Secret block + worker env) is in no log, artifact or deployment inspect."""
    assert stack.api is not None
    prefect = str(Path(sys.executable).with_name("prefect"))
    outputs = []
    for name in ("nightly/nightly", "train/train", "rollback/rollback"):
        r = subprocess.run(
            [prefect, "deployment", "inspect", name],
            env=stack.cli_env(),
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        outputs.append(r.stdout)
    r = subprocess.run(
        [prefect, "block", "inspect", "secret/hf-token"],
        env=stack.cli_env(),
        capture_output=True,
        text=True,
    )
    outputs.append(r.stdout + r.stderr)
    logs = stack.api.logs()
    assert logs, "no logs reached the server"
    outputs += [entry["message"] for entry in logs]
    outputs += [json.dumps(a) for a in stack.api.artifacts()]
    outputs += [json.dumps(r) for r in stack.api.flow_runs()]
    outputs += [w.log() for w in stack.workers.values()]
    outputs += stack.inbox.messages
    leaks = [o[:200] for o in outputs if HF_TOKEN in o]
    assert not leaks, leaks
    print("served timings:", stack.summary_json())
