"""A main module for tests/test_process_pool.py, run as ``python -m tests.mp_main_probe``.

Imported again as ``__mp_main__`` by a worker process that imports the parent's main module, it
appends a line to the file named by MP_MAIN_PROBE: the test counts those lines.
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__mp_main__":
    with open(os.environ["MP_MAIN_PROBE"], "a") as f:
        f.write(f"{os.getpid()}\n")


def _pairs() -> list:
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for _ in range(8):
        a = rng.integers(0, 255, (64, 64), dtype=np.uint8)
        b = rng.integers(0, 255, (64, 64), dtype=np.uint8)
        hw = np.array([64, 64])
        out += [(a, hw, a, hw), (a, hw, b, hw)]
    return out


def main(how: str) -> None:
    import concurrent.futures as cf
    import multiprocessing

    from freshnet.data import copies

    pairs = _pairs()
    if how == "plain":  # what the pools did before: a forkserver pool, main module visible
        ctx = multiprocessing.get_context("forkserver")
        with cf.ProcessPoolExecutor(2, mp_context=ctx) as pool:
            scores = [s for part in pool.map(copies._score_chunk, [pairs], [0.77]) for s in part]
    else:
        scores = copies.score_pairs(pairs, 0.77, workers=2, per_worker=1)
    one = copies._score_chunk(pairs, 0.77)
    print(
        json.dumps(
            {"same": scores == one, "spec": getattr(sys.modules["__main__"].__spec__, "name", None)}
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
