"""Bundle and publish tasks. Publishing does not retry: the parent-commit guard makes a blind retry unsafe."""

from __future__ import annotations

from prefect import task

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
    return entry


@task
def rollback_space(cfg: Config, version: str | None) -> dict:
    from freshnet import space

    entry = vars(space.rollback(cfg, version))
    publish_commit(cfg, entry)
    return entry
