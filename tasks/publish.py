"""Bundle and publish tasks. Publishing does not retry: the parent-commit guard makes a blind retry unsafe."""

from __future__ import annotations

import logging

from prefect import task
from prefect.events import emit_event

from freshnet import contest, release
from freshnet.config import Config
from freshnet.contest import BundleResult, DecisionDict, EvaluateResult, TrainResult
from freshnet.redact import redact
from freshnet.release import LedgerEntry
from tasks.report import publish_commit
from tasks.secrets import load_secret

log = logging.getLogger(__name__)


def hf_token(cfg: Config) -> str | None:
    """The HF token at run time, the same for every publish: the Secret block when it exists.

    hf targets only. Without the block (an embedded run, no bootstrap) it is HF_TOKEN, which
    huggingface_hub reads itself (None here).
    """
    if not cfg.space.target.startswith("hf://") or not cfg.space.hf_token_secret:
        return None
    token = load_secret(cfg.space.hf_token_secret)
    if token is None:
        log.info("no Secret block %r: the HF token comes from HF_TOKEN", cfg.space.hf_token_secret)
    return token


@task
def build_bundle(
    cfg: Config,
    version: str,
    train_result: TrainResult,
    evaluation: EvaluateResult,
    snapshot_id: str,
) -> BundleResult:
    return contest.bundle_step(cfg, version, train_result, evaluation, snapshot_id)


@task
def publish_space(
    cfg: Config,
    version: str,
    bundle_path: str,
    train_result: TrainResult,
    evaluation: EvaluateResult,
    decision: DecisionDict,
    snapshot_id: str,
) -> LedgerEntry:
    entry = release.publish_step(
        cfg,
        version,
        bundle_path,
        train_result,
        evaluation,
        decision,
        snapshot_id,
        token=hf_token(cfg),
    )
    publish_commit(cfg, entry)
    announce_promotion(cfg, entry)
    return entry


def announce_promotion(cfg: Config, entry: LedgerEntry) -> None:
    """The event the "model promoted" automation (infra/bootstrap.py) listens to."""
    # Prefect stores and shows events: a git target may carry a token.
    target = redact(cfg.space.target)
    emit_event(
        event="freshnet.model.promoted",
        resource={
            "prefect.resource.id": f"freshnet.space.{target}",
            "prefect.resource.name": target,
        },
        payload={
            "version": entry["version"],
            "commit": entry["commit"],
            "kind": entry["kind"],
            "accuracy": entry.get("metrics", {}).get("holdout_accuracy"),
        },
    )


@task
def rollback_space(cfg: Config, version: str | None) -> LedgerEntry:
    entry = release.rollback_step(cfg, version, token=hf_token(cfg))
    publish_commit(cfg, entry)
    announce_promotion(cfg, entry)
    return entry


@task
def promote_space(cfg: Config, version: str, reason: str) -> LedgerEntry:
    entry = release.promote_step(cfg, version, reason, token=hf_token(cfg))
    publish_commit(cfg, entry)
    announce_promotion(cfg, entry)
    return entry
