"""One place that hides credentials carried inside URLs (``scheme://user:TOKEN@host/...``).

Every path that shows a URL to a person or stores it (logs, artifacts, ledger, errors, deployment
parameters, webhooks, ``config check``) goes through :func:`redact` so a token in a git remote
never leaves the process that needs it.
"""

from __future__ import annotations

import logging
import re

# scheme://userinfo@ where userinfo runs up to the last "@" before the path: a password with an
# unescaped "@" ("user:p@ss@host") is still hidden whole. Whitespace and quotes end a URL in text.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s\"'<>]+)@")
MASK = "***"


def redact(text: str) -> str:
    """``text`` with the user-info of every URL in it replaced by ``***``."""
    if "@" not in text:
        return text
    return _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)


def redact_value(value: object) -> object:
    """Redact every string inside a JSON-like value (dicts, lists, tuples)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_value(v) for v in value)
    return value


def _redact_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a broken record is logging's problem, not ours
        return
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        # A traceback shows the exception's text, which may carry the URL: format it now,
        # redacted (formatters reuse exc_text when it is set).
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts URL credentials in the message and traceback of a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        _redact_record(record)
        return True


_installed = False


def install_log_redaction() -> None:
    """Redact URL credentials in every log record this process creates (idempotent).

    Call it where a process starts: ``freshnet`` CLI's main, and the start of every flow (a worker
    runs a flow in a fresh process). A filter on the ``freshnet`` logger would not do: logging
    applies a logger's filters only to records logged on that very logger, not to those of
    ``freshnet.cycle`` and the like propagating through it, and handlers (Prefect's API handler,
    the console) come and go. The record factory sees every record, from every logger, once.
    """
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _redact_record(record)
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
