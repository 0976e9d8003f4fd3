"""Credentials read at run time from Prefect Secret blocks (never parameters: those are stored
with the run)."""

from __future__ import annotations


def load_secret(name: str) -> str | None:
    """The Secret block ``name``'s value, or None when no such block exists (other errors raise)."""
    from prefect.blocks.system import Secret
    from prefect.exceptions import ObjectNotFound

    try:
        return Secret.load(name).get()
    except ValueError as exc:
        if not isinstance(exc.__cause__, ObjectNotFound):
            raise
        return None
