"""The release steps: the one publish path (lease, intent, commit, ledger) and what uses it."""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict, cast

from freshnet.config import Config
from freshnet.contest import DecisionDict, EvaluateResult, TrainResult
from freshnet.cycle import cache_dir, open_store
from freshnet.lease import Lease, LeaseHeld
from freshnet.redact import redact
from freshnet.space.bundle import IMAGE_SUFFIXES
from freshnet.space.ledger import Entry, Ledger, LedgerError
from freshnet.space.publish import (
    HF_PREFIX,
    PublishError,
    check_parent,
    commit_message,
    intent_mark,
    publish,
    space_head,
    wait_space,
)
from freshnet.space.republish import Release, republish_release, rollback_version
from freshnet.storage import Storage

log = logging.getLogger(__name__)


class LedgerEntry(TypedDict):
    """What the publishing steps return: space.ledger.Entry as a dict (its fields, same names)."""

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
    reason: str
    parent_commit: str
    intent: str
    extra: dict[str, Any]


def entry_dict(entry: Entry) -> LedgerEntry:
    """The entry's own attribute dict (``vars``), typed."""
    return cast(LedgerEntry, vars(entry))


def publish_step(
    cfg: Config,
    version: str,
    bundle_path: str,
    train_result: TrainResult,
    evaluation: EvaluateResult,
    decision: DecisionDict,
    snapshot_id: str,
    token: str | None = None,
) -> LedgerEntry:
    """The nightly promotion: the validated bundle through the one publish path.

    ``token`` is the HF token read at run time by the caller (else HF_TOKEN); it is never stored.
    """

    def prepare(ledger: Any, served: Any, work: Path) -> Release:
        return Release(
            version=version,
            kind="promote",
            bundle=Path(bundle_path),
            title=f"freshnet: promote {version} (holdout accuracy "
            f"{evaluation['accuracy']:.3f}, dataset {snapshot_id})",
            fields={
                "dataset": snapshot_id,
                "metrics": {
                    "holdout_accuracy": evaluation["accuracy"],
                    **train_result.get("metrics", {}),
                },
                "decision": decision,
                "model_key": train_result["model_key"],
                "model_sha256": train_result.get("model_sha256", ""),
            },
        )

    return publish_and_record(cfg, prepare, token=token, what=f"nightly promotion of {version}")


def champion_step(cfg: Config, token: str | None = None) -> LedgerEntry | None:
    """The champion, after settling a publish that a killed or failed publisher left pending.

    Healing here (not only at the next publish) means a night that keeps the champion still
    brings the ledger back in line with what the Space serves.
    """

    ledger = Ledger(open_store(cfg))
    if ledger.intent()[0] is not None:
        return reconcile_step(cfg, token)
    entry = ledger.champion()
    return entry_dict(entry) if entry else None


# ---- the one publish path: nightly promotion, rollback and manual promotion -----------------

PUBLISH_LEASE = "publish"
# A killed publisher holds the lease at most this long (a live one renews it every third of it).
PUBLISH_LEASE_TTL_S = 60.0
# How long a publisher waits for another one to finish (an HF commit of a large model is slow).
PUBLISH_LEASE_WAIT_S = 900.0


def _publish_lease(store: Storage, what: str) -> Any:
    """Take the publish lease (a conditional write in storage), waiting while another holds it."""

    deadline = time.monotonic() + PUBLISH_LEASE_WAIT_S
    waited = False
    while True:
        try:
            return Lease(store, PUBLISH_LEASE, what=what, ttl_s=PUBLISH_LEASE_TTL_S).acquire()
        except LeaseHeld as exc:
            if time.monotonic() > deadline:
                raise
            if not waited:
                log.info("waiting for the publish lease: %s", exc)
                waited = True
            time.sleep(min(1.0, PUBLISH_LEASE_TTL_S / 4))


def _release(lease: Any) -> None:
    try:
        lease.release()
    except Exception as exc:  # noqa: BLE001 - storage down: the lease expires by itself
        log.warning(
            "could not release the publish lease (it expires within %.0f s): %s: %s",
            PUBLISH_LEASE_TTL_S,
            type(exc).__name__,
            exc,
        )


def settle_intent(cfg: Config, ledger: Any, token: str | None = None) -> Any:
    """Complete or discard the publish intent a killed or failed publisher left behind.

    Call with the publish lease held. The intent is completed only when the Space's head is the
    very commit made for it (its id is in the commit title): then its ledger entry is written
    (if it was lost) and the champion pointer moves to it. Otherwise its commit never landed and
    the intent is discarded. Returns the completed entry, or None.
    """

    intent, _ = ledger.intent()
    if intent is None:
        return None
    target = cfg.space.target
    what = f"{intent.get('kind')} {intent.get('version')} (intent {intent['id']})"
    if intent.get("target") != redact(target):
        log.warning(
            "discarding the interrupted publish %s: it went to %s, this config publishes to %s",
            what,
            intent.get("target"),
            redact(target),
        )
        ledger.end_intent(intent["id"])
        return None
    entry = ledger.find_intent(intent["id"])
    if entry is None:
        head = space_head(target, token)
        if not head or intent_mark(intent["id"]) not in commit_message(target, head, token):
            log.warning(
                "discarding the interrupted publish %s: the Space's head %s is not its commit, "
                "so it never landed",
                what,
                (head or "none")[:12],
            )
            ledger.end_intent(intent["id"])
            return None
        entry = ledger.append(**intent["entry"], commit=head, intent=intent["id"])
        log.warning(
            "completed the interrupted publish %s: the Space serves its commit %s, recorded as "
            "ledger entry %d",
            what,
            head[:12],
            entry.seq,
        )
    champion = ledger.champion()
    if champion is None or champion.seq != entry.seq:
        ledger.set_champion(entry)
    ledger.end_intent(intent["id"])
    return entry


def _publish_locked(
    cfg: Config, ledger: Any, lease: Any, prepare: Any, work: Path, token: str | None
) -> tuple[Any, Path]:
    t0 = time.perf_counter()
    target = cfg.space.target
    settle_intent(cfg, ledger, token)
    champion = ledger.champion()
    same = champion is not None and redact(champion.target) == redact(target)
    expected = champion.commit if same else None
    head = space_head(target, token)
    check_parent(target, head, expected)  # SpaceMoved before any work when it moved
    served = champion if same and head == expected else (ledger.find_commit(head) if head else None)
    release = prepare(ledger, served, work)
    intent_id = uuid.uuid4().hex[:16]
    fields = {
        "version": release.version,
        "kind": release.kind,
        **release.fields,
        "target": redact(target),
        "parent_commit": head or "",
    }
    _, current = ledger.intent()
    ledger.begin_intent(
        {
            "id": intent_id,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "version": release.version,
            "kind": release.kind,
            "target": redact(target),
            "expected_parent": head,
            "model_sha256": release.fields.get("model_sha256", ""),
            "entry": fields,
        },
        current,
    )
    if lease.lost:
        ledger.end_intent(intent_id)
        raise PublishError(f"lost the publish lease before pushing {release.version}")
    title = f"{release.title} {intent_mark(intent_id)}"
    try:
        commit = publish(release.bundle, target, title, head, token=token)
    except Exception as exc:
        # The commit may have landed although the call failed (a time-out after the Hub took
        # it): settle the intent now, so the ledger names it, or drop the intent.
        try:
            entry = settle_intent(cfg, ledger, token)
        except Exception as again:  # noqa: BLE001 - the next publish settles it
            log.warning(
                "publish of %s failed (%s); settling it failed too: %s", intent_id, exc, again
            )
            raise exc from None
        if entry is None or entry.intent != intent_id:
            raise
        log.warning(
            "the Space took commit %s although publishing reported %s: recorded it",
            entry.commit[:12],
            exc,
        )
    else:
        entry = ledger.append(**fields, commit=commit, intent=intent_id)
        ledger.set_champion(entry)
        ledger.end_intent(intent_id)
    log.info(
        "published %s (%s) as %s in %.1fs",
        entry.version,
        entry.kind,
        entry.commit[:12],
        time.perf_counter() - t0,
    )
    return entry, release.bundle


def publish_and_record(
    cfg: Config, prepare: Any, token: str | None = None, what: str = "a publish"
) -> LedgerEntry:
    """The one publish path: nightly promotion, rollback and manual promotion all come here.

    Under the publish lease: settle a lost intent, check the Space's head is the champion's
    commit, ``prepare(ledger, served_entry, work_dir)`` a Release, write the intent, push
    one commit (its title carries the intent id), append the ledger entry, point the champion at
    it, clear the intent. A publisher killed anywhere leaves state the next one settles exactly.
    Then, outside the lease, the Space must come up (``space.wait_running``, hf targets).
    """

    store = open_store(cfg)
    ledger = Ledger(store)
    target = cfg.space.target
    with tempfile.TemporaryDirectory(prefix="freshnet-publish-", dir=cache_dir(cfg)) as tmp:
        lease = _publish_lease(store, what)
        try:
            entry, bundle = _publish_locked(cfg, ledger, lease, prepare, Path(tmp), token)
        finally:
            _release(lease)
        if cfg.space.wait_running and target.startswith(HF_PREFIX):
            # The commit is live and recorded; a Space that fails to start is a loud failure
            # (rollback is one command), not a silent success.
            examples = sorted(
                p
                for p in (Path(bundle) / "examples").glob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES
            )
            wait_space(
                target,
                cfg.space.wait_timeout_s,
                token=token,
                canary=examples[0] if examples else None,
            )
    return entry_dict(entry)


def rollback_step(cfg: Config, version: str | None = None, token: str | None = None) -> LedgerEntry:
    """Publish an earlier version again: ``version``, or the one before what the Space serves."""

    def prepare(ledger: Any, served: Any, work: Path) -> Release:
        chosen = rollback_version(ledger.history(), served, version)
        return republish_release(
            cfg,
            ledger.store,
            ledger,
            chosen,
            "rollback",
            f"rollback from {served.version}",
            served,
            work,
            token,
        )

    return publish_and_record(
        cfg, prepare, token=token, what=f"rollback to {version or 'the previous version'}"
    )


def promote_step(cfg: Config, version: str, reason: str, token: str | None = None) -> LedgerEntry:
    """Publish any trained version by hand (models/<version>/model.pkl), recording the reason."""

    if not reason or not reason.strip():
        raise LedgerError("a manual promotion needs a reason (--reason TEXT)")

    def prepare(ledger: Any, served: Any, work: Path) -> Release:
        return republish_release(
            cfg, ledger.store, ledger, version, "manual", reason.strip(), served, work, token
        )

    return publish_and_record(cfg, prepare, token=token, what=f"manual promotion of {version}")


def reconcile_step(cfg: Config, token: str | None = None) -> LedgerEntry | None:
    """Settle a lost publish intent now (under the lease) and return the champion."""

    store = open_store(cfg)
    ledger = Ledger(store)
    lease = _publish_lease(store, "reconcile")
    try:
        settle_intent(cfg, ledger, token)
    finally:
        _release(lease)
    entry = ledger.champion()
    return entry_dict(entry) if entry else None
