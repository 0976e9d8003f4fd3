"""freshnet's own log lines in the run's logs in the Prefect API (and so in the UI).

Prefect sends only its own loggers to the API. Its mechanism for others is the setting
PREFECT_LOGGING_EXTRA_LOGGERS: at import, Prefect gives each named logger the handlers of its
`prefect.extra` logger (the APILogHandler). That setting is read once per process from the
environment of whoever starts it (a worker's flow-run process, `freshnet run`), so a project
cannot rely on it. Every flow therefore does the same thing itself, in its own process, for the
duration of its run: the loggers below get Prefect's handler, and INFO lines pass (the root
logger Prefect configures passes only warnings).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from freshnet.redact import install_log_redaction

# The core, the flows and the tasks: every logger freshnet creates with getLogger(__name__).
RUN_LOGGERS = ("freshnet", "flows", "tasks")


@contextmanager
def run_logs() -> Iterator[None]:
    """Send RUN_LOGGERS' records to the current run's logs in the Prefect API while inside.

    Log redaction (freshnet.redact) is installed first. Nested uses (the train subflow inside
    the nightly flow) leave the outer one in place; on exit only what was added here is removed,
    so a logger outside any run does not warn that it has no run to log to.
    """
    # A worker runs each flow in a fresh process: URL credentials (a git Space target may carry
    # a token) are redacted from every record before any of them reaches the API.
    install_log_redaction()
    handlers = logging.getLogger("prefect.extra").handlers
    added: list[tuple[logging.Logger, logging.Handler]] = []
    levels: list[tuple[logging.Logger, int]] = []
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        for handler in handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
                added.append((logger, handler))
        if logger.getEffectiveLevel() > logging.INFO:
            levels.append((logger, logger.level))
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, handler in added:
            logger.removeHandler(handler)
        for logger, level in levels:
            logger.setLevel(level)
