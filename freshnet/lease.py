"""A lease in storage: one holder at a time, taken and renewed by compare-and-swap on a pointer.

Works on every storage (file and S3) because it needs only ``read_pointer``/``swap_pointer``. A
holder that dies stops renewing, and its lease expires after ``ttl_s``: nobody waits forever for
a killed process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from freshnet.storage import Storage

log = logging.getLogger(__name__)


class LeaseHeld(RuntimeError):
    """Someone else holds the lease; the message says who, since when and until when."""

    def __init__(self, name: str, holder: dict[str, Any]):
        self.holder = holder
        left = max(0.0, float(holder.get("expires", 0)) - time.time())
        super().__init__(
            f"{name} is held by {holder.get('what', '?')} (host {holder.get('host', '?')}, "
            f"pid {holder.get('pid', '?')}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('since', 0)))}); "
            f"it expires in {left:.0f} s unless its holder renews it"
        )


class Lease:
    """``with Lease(store, "night-run", what="night 2"):`` — raises LeaseHeld when taken.

    A background thread renews the lease every ``ttl_s / 3`` seconds while the block runs.
    """

    def __init__(self, store: Storage, name: str, what: str = "", ttl_s: float = 120.0):
        self.store, self.name, self.what, self.ttl_s = store, f"lease-{name}", what, ttl_s
        self.id = uuid.uuid4().hex
        self._token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _body(self, since: float) -> bytes:
        return json.dumps(
            {
                "id": self.id,
                "what": self.what,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": since,
                "expires": time.time() + self.ttl_s,
            }
        ).encode()

    def acquire(self) -> Lease:
        for _ in range(20):
            data, token = self.store.read_pointer(self.name)
            holder = json.loads(data) if data else None
            if holder and holder.get("id") and holder.get("expires", 0) > time.time():
                raise LeaseHeld(self.name, holder)
            self._since = time.time()
            if self._swap(token):
                self._thread = threading.Thread(target=self._renew, daemon=True)
                self._thread.start()
                return self
        raise LeaseHeld(self.name, {"what": "another writer (the lease kept changing)"})

    def _swap(self, expected: str | None) -> bool:
        """Write our holder record over ``expected``; keep the token only if it is still ours."""
        if not self.store.swap_pointer(self.name, self._body(self._since), expected):
            return False
        data, token = self.store.read_pointer(self.name)
        if not data or json.loads(data).get("id") != self.id:
            return False
        self._token = token
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                renewed = self._swap(self._token)
            except Exception as exc:  # noqa: BLE001 - storage hiccup: try again next tick
                log.warning("lease %s: renewal failed (%s); retrying", self.name, exc)
                continue
            if not renewed:
                self.lost = True  # someone took it after it expired: the holder was too slow
                self._token = None
                log.error("lease %s was taken over by another holder", self.name)
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._token is not None and not self.lost:
            # Released = an empty holder; only ours is replaced (a taken-over lease is left alone).
            released = json.dumps({"released": time.time()}).encode()
            self.store.swap_pointer(self.name, released, self._token)
        self._token = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
