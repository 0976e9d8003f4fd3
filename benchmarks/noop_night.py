"""noop_night: wall time of a nightly run with nothing new, in served mode, against a running server.

Starts the served stack on 127.0.0.1 (Prefect server, moto S3, a cpu and a gpu process worker,
bootstrap, `prefect deploy --all`; see tests/served_stack.py), runs night 1 of the demo source so
a champion exists (training sized small: it only has to exist), then times night 2 with a config
whose `min_new_images` no night can reach: search, download, curate and snapshot all run for
real over S3, training is skipped. Goal: < 60 s. There is no baseline to compare against.
Also timed (table only): the same no-op night rerun, where search and download come from cache.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.served_stack import FAST_TRAIN_ENV, ServedStack  # noqa: E402

NOOP_CONFIG = "configs/bench-noop.toml"


def explain(stack: ServedStack, nights: list[dict]) -> str:
    """Which nightly run started each train run, and what each night decided (for a failure)."""
    assert stack.api is not None
    lines = []
    for night in nights:
        st = night["state"] or {}
        lines.append(f"nightly {night['name']} {night['id']}: {st.get('type')} {st.get('message')}")
        for t in stack.api.task_runs(night["id"]):
            tst = t.get("state") or {}
            lines.append(f"  task {t['name']}: {tst.get('type')} {tst.get('message') or ''}")
    for run in stack.api.flow_runs("train"):
        st = run["state"] or {}
        lines.append(
            f"train {run['name']} created {run['created']} version "
            f"{run['parameters'].get('version')} parent task {run['parent_task_run_id']} "
            f"runs {run.get('run_count')}: {st.get('type')} {st.get('message')}"
        )
    store = stack.direct_storage()
    for key in store.list("decisions/"):
        if key.endswith(".json"):
            d = json.loads(store.get(key))["decision"]
            lines.append(f"{key}: promote={d.get('promote')} {d.get('reasons')}")
    lines.append(f"ledger: {stack.ledger()}")
    return "\n".join(lines)


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="freshnet-noop-"))
    stack = ServedStack(root, FAST_TRAIN_ENV)
    rows: list[tuple[str, float, str]] = []
    try:
        t0 = time.monotonic()
        stack.start()
        rows.append(("start served stack", time.monotonic() - t0, ""))
        # A config only the cpu worker's checkout has: the demo, but training needs 10^9 new images.
        demo = (root / "cpu" / "project" / "configs" / "demo.toml").read_text()
        (root / "cpu" / "project" / NOOP_CONFIG).write_text(
            demo.replace("[dataset]", "[dataset]\nmin_new_images = 1000000000", 1)
        )

        t0 = time.monotonic()
        first = stack.run_nightly("1")
        rows.append(("night 1 (trains, champion)", time.monotonic() - t0, first["state"]["type"]))
        if first["state"]["type"] != "COMPLETED":
            print(stack.diagnostics(), file=sys.stderr)
            raise SystemExit(f"night 1 did not complete: {first['state'].get('message')}")

        t0 = time.monotonic()
        noop = stack.run_nightly("2", config=NOOP_CONFIG)
        noop_s = time.monotonic() - t0
        rows.append(("night 2, nothing new", noop_s, noop["state"]["type"]))

        t0 = time.monotonic()
        again = stack.run_nightly("2", config=NOOP_CONFIG)
        rows.append(("night 2 again (cached)", time.monotonic() - t0, again["state"]["type"]))
        trains = len(stack.api.flow_runs("train")) if stack.api else -1
        if noop["state"]["type"] != "COMPLETED" or trains != 1:
            print(stack.diagnostics(), file=sys.stderr)
            print(explain(stack, [first, noop, again]), file=sys.stderr)
            raise SystemExit(f"no-op night failed or trained (train runs: {trains})")
    finally:
        stack.stop()

    print(f"{'step':<30} {'wall s':>8}  state")
    for name, secs, st in rows:
        print(f"{name:<30} {secs:8.1f}  {st}")
    print(f"noop night: {noop_s:.1f} s (goal < 60 s); stack timings {stack.timings}")
    print(
        json.dumps(
            {
                "benchmark": "noop_night",
                "unit": "s",
                "ours": round(noop_s, 1),
                "baseline": None,
                "goal": "ours < 60",
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
