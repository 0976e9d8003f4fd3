"""Rollback and manual promote: the release (bundle + ledger fields) of an earlier or trained version."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freshnet.config import Config
from freshnet.redact import redact
from freshnet.space.bundle import IMAGE_SUFFIXES, build_bundle
from freshnet.space.ledger import Entry, Ledger, LedgerError
from freshnet.space.publish import bundle_inputs_from_space
from freshnet.storage import NotFound, Storage, sha256_file

log = logging.getLogger(__name__)


@dataclass
class Release:
    """A bundle ready to push and what its ledger entry will say (the publish path records it)."""

    version: str
    kind: str  # promote | rollback | manual
    bundle: Path
    title: str  # the commit title; the publish path appends the intent mark
    fields: dict[str, Any]  # dataset, metrics, decision, model_key, model_sha256, reason


def rollback_version(history: list[Entry], served: Entry | None, version: str | None) -> str:
    """The version a rollback restores: ``version``, or the one before what the Space serves.

    ``served`` is the ledger entry whose commit is the Space's head (not the newest entry).
    """
    if not history:
        raise LedgerError("nothing to roll back: no model has been published yet")
    if served is None:
        raise LedgerError(
            "nothing to roll back from: the Space serves a commit no ledger entry names"
        )
    if version is None:
        earlier = [e for e in history if e.seq < served.seq and e.version != served.version]
        if not earlier:
            raise LedgerError(
                f"nothing to roll back to: {served.version} is the only version published"
            )
        return earlier[-1].version
    if not any(e.version == version for e in history):
        known = ", ".join(dict.fromkeys(e.version for e in history))
        raise LedgerError(f"version {version!r} was never published; published versions: {known}")
    if version == served.version:
        raise LedgerError(
            f"{version} is already what the Space serves (commit {served.commit[:12]})"
        )
    return version


def republish_release(
    cfg: Config,
    store: Storage,
    ledger: Ledger,
    version: str,
    kind: str,
    reason: str,
    served: Entry | None,
    work_dir: Path,
    token: str | None = None,
) -> Release:
    """The bundle of an earlier or trained ``version`` (models/<version>/model.pkl), rebuilt.

    The model comes from storage and must match the sha256 the ledger recorded; metadata and
    examples come from the Space commit that served it before, when it can still be read.
    """
    earlier = ledger.find(version)
    target = cfg.space.target
    model_key = (
        earlier.model_key if earlier and earlier.model_key else f"models/{version}/model.pkl"
    )
    try:
        model_path = store.get_to_file(model_key, work_dir / "model.pkl")
    except NotFound:
        raise LedgerError(
            f"model of {version} is not in storage ({redact(store.url(model_key))})"
        ) from None
    digest = sha256_file(model_path)
    if earlier and earlier.model_sha256 and digest != earlier.model_sha256:
        raise LedgerError(
            f"model of {version} in storage has sha256 {digest[:12]}, the ledger recorded "
            f"{earlier.model_sha256[:12]}: refusing to publish a different model"
        )
    meta: dict[str, Any] = {}
    examples: list[Path] = []
    # The ledger stores targets redacted: an old bundle is read from this config's target when
    # it is the same Space (its credentials are here), else from the recorded one.
    source = next(
        (
            (target if redact(e.target) == redact(target) else e.target, e.commit)
            for e in (earlier, served)
            if e is not None and e.commit
        ),
        None,
    )
    if source:
        try:
            meta, examples = bundle_inputs_from_space(source[0], source[1], work_dir / "old", token)
        except Exception as exc:  # noqa: BLE001 - the old bundle is a convenience, the model matters
            log.warning(
                "could not read the bundle of %s from the Space: %s",
                source[1][:12],
                redact(str(exc)),
            )
    if not earlier or meta.get("version") != version:
        meta = {
            "version": version,
            "date": datetime_now(),
            "holdout_accuracy": _eval_accuracy(store, version),
            "classes": meta.get("classes"),
        }
    if not examples and cfg.space.examples_dir:
        examples = sorted(
            p for p in Path(cfg.space.examples_dir).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES
        )
    meta = {k: v for k, v in meta.items() if k not in ("examples", "model_sha256")}
    meta["published_as"] = kind
    bundle = build_bundle(model_path, meta, examples, work_dir / "bundle", cfg.space)
    return Release(
        version=version,
        kind=kind,
        bundle=bundle,
        title=f"freshnet: {kind} to {version}" + (f" ({reason})" if reason else ""),
        fields={
            "dataset": (earlier.dataset if earlier else meta.get("dataset")) or "",
            "metrics": earlier.metrics
            if earlier
            else {"holdout_accuracy": meta.get("holdout_accuracy")},
            "decision": earlier.decision if earlier else {},
            "model_key": model_key,
            "model_sha256": digest,
            "reason": reason,
        },
    )


def datetime_now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y-%m-%d")


def _eval_accuracy(store: Storage, version: str) -> float | None:
    keys = [k for k in store.list(f"evals/{version}/") if k.endswith(".json")]
    if not keys:
        return None
    try:
        return float(json.loads(store.get(keys[-1]))["accuracy"])
    except (KeyError, ValueError, TypeError):
        return None
