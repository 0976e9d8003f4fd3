"""The Space app's predict vs fastai's learn.predict, and the served app under 8 concurrent clients.

Same model, same images, same process and thread settings; calls interleave so machine noise hits
both sides alike. Then 200 requests from 8 gradio_client clients against `python app.py`.
No arguments, no network. FRESHNET_BENCH_MODEL=path/model.pkl reuses a model instead of training
the small flower model the tests use (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("FRESHNET_SHARED_DATA", REPO.parent / "shared" / "data"))
N_SINGLE = 60  # images timed one by one on each side
N_REQUESTS = 200
N_CLIENTS = 8


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    import torch

    from freshnet.config_sections import SpaceConfig
    from freshnet.space.bundle import build_bundle
    from tests.app_helpers import ServedApp, bundle_meta
    from tests.model_helpers import split_flowers, train_flower_model

    flowers = {
        d.name: sorted(d.glob("*.jpg"))
        for d in sorted((SHARED / "photos" / "flowers").iterdir())
        if d.is_dir()
    }
    examples = sorted((SHARED / "examples").glob("*.jpg"))
    work = Path(tempfile.mkdtemp(prefix="freshnet-bench-"))
    model = Path(
        os.environ.get("FRESHNET_BENCH_MODEL") or train_flower_model(flowers, work / "model")
    )
    _, holdout = split_flowers(flowers)
    images = examples + [p for ps in holdout.values() for p in ps[:12]]
    images = images[:N_SINGLE]

    sys.path.insert(0, str(REPO / "app"))
    import app

    # The served app runs cores/concurrency torch threads per request (1 on 2 cores); both sides
    # get the same setting here, which also keeps a shared, noisy machine from thrashing.
    torch.set_num_threads(int(os.environ.get("FRESHNET_TORCH_THREADS", "1")))
    started = time.perf_counter()
    clf = app.Classifier(model)  # the app's default: compiled in the background
    clf.fast_ready.wait(900)
    compile_s = time.perf_counter() - started
    eager = app.Classifier(model, compile=False)  # FRESHNET_COMPILE=0
    learn = clf.learn  # as exported: the app predicts with its own channels-last copy
    ours: list[float] = []
    ours_eager: list[float] = []
    base: list[float] = []
    max_diff = max_diff_eager = 0.0
    with learn.no_bar():
        for path in images[:5]:  # warm-up every path
            learn.predict(path)
            clf.probabilities(path)
            eager.probabilities(path)
        for i, path in enumerate(images):
            # Rotate which side goes first so none always gets the warmer cache.
            sides = ["ours", "eager", "base"]
            for side in sides[i % 3 :] + sides[: i % 3]:
                t = time.perf_counter()
                if side == "ours":
                    p_ours = clf.probabilities(path)
                    ours.append((time.perf_counter() - t) * 1000)
                elif side == "eager":
                    p_eager = eager.probabilities(path)
                    ours_eager.append((time.perf_counter() - t) * 1000)
                else:
                    _, _, p_base = learn.predict(path)
                    base.append((time.perf_counter() - t) * 1000)
            max_diff = max(max_diff, float((torch.tensor(p_ours) - p_base).abs().max()))
            max_diff_eager = max(
                max_diff_eager, float((torch.tensor(p_eager) - p_base).abs().max())
            )

    bundle = build_bundle(model, bundle_meta("bench"), examples, work / "bundle", SpaceConfig())
    errors: list[str] = []
    served: list[float] = []
    lock = threading.Lock()
    counter = iter(range(N_REQUESTS))
    with ServedApp(bundle, work) as served_app:
        from gradio_client import Client, handle_file

        def client_loop() -> None:
            client = Client(served_app.url, verbose=False)
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                path = images[i % len(images)]
                t = time.perf_counter()
                try:
                    result = client.predict(handle_file(str(path)), api_name="/predict")
                    if result.get("label") not in clf.vocab:
                        raise ValueError(f"unexpected result {result}")
                except Exception as exc:  # noqa: BLE001 - every failure counts, whatever it is
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    served.append((time.perf_counter() - t) * 1000)

        started = time.perf_counter()
        threads = [threading.Thread(target=client_loop) for _ in range(N_CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started

    p50o, p50b = statistics.median(ours), statistics.median(base)
    p95o, p95b = pct(ours, 0.95), pct(base, 0.95)
    print(
        f"app predict vs learn.predict: {len(images)} images, torch threads {torch.get_num_threads()}"
    )
    print(f"{'':<22}{'app (ours)':>12}{'learn.predict':>15}{'ratio':>8}")
    print(f"{'p50 ms':<22}{p50o:>12.1f}{p50b:>15.1f}{p50o / p50b:>8.2f}")
    print(f"{'p95 ms':<22}{p95o:>12.1f}{p95b:>15.1f}{p95o / p95b:>8.2f}")
    p50e = statistics.median(ours_eager)
    print(f"{'p50 ms, eager':<22}{p50e:>12.1f}{p50b:>15.1f}{p50e / p50b:>8.2f}")
    print(
        f"compiled model: {'ready' if clf.fast is not None else 'NOT used'} after {compile_s:.1f} s"
    )
    print(f"max |p_ours - p_fastai| = {max_diff:.2e}; eager: {max_diff_eager:.2e}")
    print(
        f"served: {N_REQUESTS} requests from {N_CLIENTS} clients in {wall:.1f} s, "
        f"{len(errors)} errors, p50 {statistics.median(served) if served else float('nan'):.0f} ms, "
        f"p95 {pct(served, 0.95) if served else float('nan'):.0f} ms"
    )
    for e in errors[:5]:
        print("  error:", e)
    figures = [
        {
            "benchmark": "predict_p50",
            "unit": "ms",
            "ours": round(p50o, 2),
            "baseline": round(p50b, 2),
            "goal": "ours/baseline <= 0.5",
        },
        {
            "benchmark": "predict_p95",
            "unit": "ms",
            "ours": round(p95o, 2),
            "baseline": round(p95b, 2),
            "goal": "ours/baseline <= 0.5",
        },
        {
            "benchmark": "predict_p50_eager",
            "unit": "ms",
            "ours": round(p50e, 2),
            "baseline": round(p50b, 2),
            "goal": "FRESHNET_COMPILE=0; for reference",
        },
        {
            "benchmark": "predict_max_abs_diff",
            "unit": "probability",
            "ours": max_diff,
            "baseline": None,
            "goal": "ours <= 1e-4",
        },
        {
            "benchmark": "concurrent_errors",
            "unit": "requests",
            "ours": len(errors),
            "baseline": None,
            "goal": "ours == 0",
        },
        {
            "benchmark": "concurrent_wall",
            "unit": "s",
            "ours": round(wall, 2),
            "baseline": None,
            "goal": f"{N_REQUESTS} requests, {N_CLIENTS} clients",
        },
    ]
    for fig in figures:
        print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
