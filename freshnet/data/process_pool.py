"""Worker process pools that start without re-running the parent's main module.

A forkserver (or spawn) worker first imports the parent's ``__main__`` under the name
``__mp_main__``, so that functions defined there can be unpickled. In a Prefect flow run the main
module is ``prefect.engine`` (``python -m prefect.engine``): every worker spent 1-2 s importing
Prefect before its first job, which is why pools paid off only for large batches. freshnet's
workers run functions of freshnet modules, never of ``__main__``, so the pools here start their
workers with the main module hidden from multiprocessing's preparation data.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_HIDING = threading.Lock()  # one hider at a time: each restores what it hid


@contextmanager
def main_module_hidden() -> Iterator[None]:
    """While inside, processes started by multiprocessing do not import ``__main__``.

    multiprocessing decides from ``__main__.__spec__`` (``python -m``) and ``__main__.__file__``
    (a script) whether a new process imports the main module; both are put back on exit.
    """
    with _HIDING:
        main = sys.modules["__main__"]
        spec = getattr(main, "__spec__", None)
        had_file = hasattr(main, "__file__")
        file = getattr(main, "__file__", None)
        main.__spec__ = None
        if had_file:
            del main.__file__
        try:
            yield
        finally:
            main.__spec__ = spec
            if had_file:
                main.__file__ = file


def _ready() -> bool:
    return True


def start_process_pool(workers: int, preload: str) -> cf.ProcessPoolExecutor:
    """A forkserver pool of ``workers`` processes, all started now, none importing ``__main__``.

    forkserver, not fork: callers run threads (Prefect, torch, an event loop). The server imports
    ``preload`` (the module whose functions the workers run) once and forks every worker from it.
    The executor would start its workers lazily, at submit time; starting them here, with the
    main module hidden, keeps the hiding to this one call. Nothing waits for them: a worker that
    dies breaks the pool, and its caller sees BrokenProcessPool at its first job, as before.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([preload])
    pool = cf.ProcessPoolExecutor(workers, mp_context=ctx)
    with main_module_hidden():
        # Each submit finds no idle worker and starts one (synchronously, in submit): ``workers``
        # submits start them all.
        for _ in range(workers):
            pool.submit(_ready)
    return pool
