"""One place that hides credentials carried inside URLs (``scheme://user:TOKEN@host/...``).

Every path that shows a URL to a person or stores it (logs, artifacts, ledger, errors, deployment
parameters, webhooks, ``config check``) goes through :func:`redact` so a token in a git remote
never leaves the process that needs it.
"""

from __future__ import annotations

import logging
import re

# scheme://userinfo@ where userinfo is anything up to the last "@" before the host part.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s\"']+)@")
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


class RedactingFilter(logging.Filter):
    """A logging filter that redacts URL credentials in the formatted message."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's problem, not ours
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
