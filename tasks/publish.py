"""Bundle and publish tasks. Publishing does not retry: the parent-commit guard makes a blind retry unsafe."""

from __future__ import annotations

from prefect import task
from prefect.events import emit_event

from freshnet import cycle
from freshnet.config import Config
from tasks.report import publish_commit


def hf_token(cfg: Config) -> str | None:
    """The HF token at run time: a Prefect Secret block when configured, else HF_TOKEN (or none)."""
    if not cfg.space.hf_token_secret:
        return None  # huggingface_hub reads HF_TOKEN itself
    from prefect.blocks.system import Secret

    return Secret.load(cfg.space.hf_token_secret).get()


@task
def build_bundle(
    cfg: Config, version: str, train_result: dict, evaluation: dict, snapshot_id: str
) -> dict:
    return cycle.bundle_step(cfg, version, train_result, evaluation, snapshot_id)


@task
def publish_space(
    cfg: Config,
    version: str,
    bundle_path: str,
    train_result: dict,
    evaluation: dict,
    decision: dict,
    snapshot_id: str,
) -> dict:
    entry = cycle.publish_step(
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


def announce_promotion(cfg: Config, entry: dict) -> None:
    """The event the "model promoted" automation (infra/bootstrap.py) listens to."""
    emit_event(
        event="freshnet.model.promoted",
        resource={
            "prefect.resource.id": f"freshnet.space.{cfg.space.target}",
            "prefect.resource.name": cfg.space.target,
        },
        payload={
            "version": entry["version"],
            "commit": entry["commit"],
            "kind": entry["kind"],
            "accuracy": entry.get("metrics", {}).get("holdout_accuracy"),
        },
    )


@task
def rollback_space(cfg: Config, version: str | None) -> dict:
    from freshnet import space

    entry = vars(space.rollback(cfg, version))
    publish_commit(cfg, entry)
    announce_promotion(cfg, entry)
    return entry
