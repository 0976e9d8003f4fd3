"""The champion pointer, the append-only promotion history and the publish intent.

Entries are ``ledger/entries/<seq:06d>.json``, each written once with put_if_absent, so two writers
can never overwrite each other: the loser of a sequence number takes the next one. The champion
pointer names the entry whose commit the Space serves: the publish path (release.publish_and_record,
under the publish lease) moves it to the entry it just pushed, by compare-and-swap.

The intent pointer holds the one publish in flight: written before the Space commit, cleared once
the entry and the champion pointer are written. A publish killed in between leaves it behind, and
the next publish completes it (its commit is the Space's head) or discards it (it never landed).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from freshnet.history import format_last_night
from freshnet.redact import redact
from freshnet.storage import NotFound, Storage

log = logging.getLogger(__name__)

ENTRIES = "ledger/entries/"
POINTER = "champion"
INTENT = "publish-intent"
KINDS = ("promote", "rollback", "manual")


class LedgerError(RuntimeError):
    """The ledger cannot do what was asked (unknown version, nothing to roll back, ...)."""


@dataclass
class Entry:
    seq: int
    version: str
    kind: str  # promote | rollback | manual
    dataset: str
    metrics: dict[str, Any]
    decision: dict[str, Any]
    commit: str
    time: str
    model_key: str
    model_sha256: str
    target: str
    reason: str = ""
    parent_commit: str = ""  # the Space head this commit was built on
    intent: str = ""  # the publish intent that made the commit (its id is in the commit message)
    extra: dict[str, Any] = field(default_factory=dict[str, Any])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entry:
        known = {f.name for f in fields(cls)}
        extra = {k: v for k, v in d.items() if k not in known}
        entry = cls(**{k: v for k, v in d.items() if k in known})
        entry.extra = {**entry.extra, **extra}
        return entry

    @property
    def accuracy(self) -> float | None:
        acc = (self.metrics or {}).get("holdout_accuracy")
        return float(acc) if isinstance(acc, int | float) else None


def _key(seq: int) -> str:
    return f"{ENTRIES}{seq:06d}.json"


class Ledger:
    def __init__(self, store: Storage):
        self.store = store

    def _seqs(self) -> list[int]:
        out = []
        for key in self.store.list(ENTRIES):
            name = key[len(ENTRIES) :]
            if name.endswith(".json") and name[:-5].isdigit():
                out.append(int(name[:-5]))
        return sorted(out)

    def get(self, seq: int) -> Entry:
        try:
            return Entry.from_dict(json.loads(self.store.get(_key(seq))))
        except NotFound:
            raise LedgerError(f"ledger entry {seq} not found ({_key(seq)})") from None

    def history(self) -> list[Entry]:
        """Every entry, oldest first."""
        return [self.get(s) for s in self._seqs()]

    def champion(self) -> Entry | None:
        data, _ = self.store.read_pointer(POINTER)
        if data is None:
            return None
        return self.get(int(json.loads(data)["seq"]))

    def _newest(self, match: Callable[[Entry], bool]) -> Entry | None:
        for seq in reversed(self._seqs()):
            entry = self.get(seq)
            if match(entry):
                return entry
        return None

    def find(self, version: str) -> Entry | None:
        """The newest entry that published ``version``."""
        return self._newest(lambda e: e.version == version)

    def find_commit(self, commit: str) -> Entry | None:
        """The newest entry that published Space commit ``commit``."""
        return self._newest(lambda e: e.commit == commit)

    def find_intent(self, intent_id: str) -> Entry | None:
        """The entry a publish intent produced (at most one), newest first."""
        return self._newest(lambda e: e.intent == intent_id)

    def append(self, **fields_: Any) -> Entry:
        """Append an entry (after the Space commit succeeded); the champion pointer is not moved."""
        kind = fields_.get("kind", "promote")
        if kind not in KINDS:
            raise LedgerError(f"ledger entry kind must be one of {KINDS}, got {kind!r}")
        for required in ("version", "commit"):
            if not fields_.get(required):
                raise LedgerError(f"ledger entry needs a non-empty {required!r}")
        fields_.setdefault("time", datetime.now(UTC).isoformat(timespec="seconds"))
        for name, default in (
            ("dataset", ""),
            ("metrics", {}),
            ("decision", {}),
            ("model_key", ""),
            ("model_sha256", ""),
            ("target", ""),
        ):
            fields_.setdefault(name, default)
        fields_["kind"] = kind
        # Stored and shown, so never with the credentials a git remote URL may carry.
        fields_["target"] = redact(fields_["target"] or "")
        seqs = self._seqs()
        seq = (seqs[-1] if seqs else 0) + 1
        while True:
            entry = Entry.from_dict({**fields_, "seq": seq})
            body = json.dumps(entry.to_dict(), indent=1, sort_keys=True, default=str).encode()
            if self.store.put_if_absent(_key(seq), body):
                break
            seq += 1  # another writer took this number: the next one is ours to try
        log.info(
            "ledger: %s %s as entry %d (commit %s)", kind, entry.version, seq, entry.commit[:12]
        )
        return entry

    def set_champion(self, entry: Entry) -> None:
        """Point the champion at ``entry``: the version the Space serves now.

        Not "the highest seq": the pointer follows the last push, which the caller (holding the
        publish lease) knows. Compare-and-swap still keeps a concurrent write from tearing it.
        """
        value = json.dumps(
            {"seq": entry.seq, "version": entry.version, "commit": entry.commit}
        ).encode()
        for attempt in range(1000):
            _, token = self.store.read_pointer(POINTER)
            if self.store.swap_pointer(POINTER, value, token):
                return
            time.sleep(min(0.001 * attempt, 0.05))
        raise LedgerError(f"could not move the champion pointer to entry {entry.seq}")

    def record(self, **fields_: Any) -> Entry:
        """Append an entry and make it the champion (callers that hold the publish lease)."""
        entry = self.append(**fields_)
        self.set_champion(entry)
        return entry

    # ---- the publish intent ---------------------------------------------------------------

    def intent(self) -> tuple[dict[str, Any] | None, str | None]:
        """The pending publish intent (None when none) and the pointer's version token."""
        data, token = self.store.read_pointer(INTENT)
        intent = json.loads(data) if data else None
        return (intent if intent and intent.get("id") else None), token

    def begin_intent(self, intent: dict[str, Any], expected: str | None) -> None:
        """Record ``intent`` before the Space commit; ``expected`` is the token intent() gave."""
        body = json.dumps(intent, sort_keys=True, default=str).encode()
        if not self.store.swap_pointer(INTENT, body, expected):
            raise LedgerError(
                "the publish intent changed under this publisher (another publisher without the "
                "publish lease?); nothing was published"
            )

    def end_intent(self, intent_id: str) -> None:
        """Clear the intent ``intent_id`` (a newer intent is left alone)."""
        for _ in range(100):
            current, token = self.intent()
            if current is None or current["id"] != intent_id:
                return
            done = json.dumps({"id": None, "done": intent_id}).encode()
            if self.store.swap_pointer(INTENT, done, token):
                return
        raise LedgerError(f"could not clear the publish intent {intent_id}")


def format_status(store: Storage, limit: int = 20) -> str:
    """The champion and the newest history entries as a readable table (for `freshnet status`)."""
    ledger = Ledger(store)
    champion = ledger.champion()
    lines = []
    if champion is None:
        lines.append("champion: none yet (no model has been published)")
    else:
        acc = f"{champion.accuracy:.3f}" if champion.accuracy is not None else "n/a"
        lines += [
            f"champion: {champion.version}  (holdout accuracy {acc}, dataset {champion.dataset or 'n/a'})",
            f"  space {redact(champion.target)} @ {champion.commit[:12]}, {champion.kind} at {champion.time}",
        ]
        if champion.reason:
            lines.append(f"  reason: {champion.reason}")
        report = f"decisions/{champion.version}.md"
        if store.exists(report):
            lines.append(f"  decision report: {store.url(report)}")
    intent, _ = ledger.intent()
    if intent:
        lines.append(
            f"publish pending: {intent.get('kind')} {intent.get('version')} (intent {intent['id']}, "
            f"since {intent.get('time', '?')}): in progress, or interrupted; the next publish "
            "records it if the Space serves its commit, else discards it"
        )
    # The last night may have kept the champion or stopped: the ledger alone would not say so.
    lines += ["", *format_last_night(store)]
    history = ledger.history()
    if history:
        lines += ["", f"history ({len(history)} entries, newest first):"]
        lines.append(
            f"{'seq':>4}  {'time':<25} {'kind':<9} {'version':<20} {'acc':>6}  {'commit':<12} reason"
        )
        for e in list(reversed(history))[:limit]:
            acc = f"{e.accuracy:.3f}" if e.accuracy is not None else "   n/a"
            mark = "*" if champion and e.seq == champion.seq else " "
            lines.append(
                f"{e.seq:>4}{mark} {e.time:<25} {e.kind:<9} {e.version:<20} {acc:>6}  "
                f"{e.commit[:12]:<12} {e.reason}"
            )
    return "\n".join(lines)
