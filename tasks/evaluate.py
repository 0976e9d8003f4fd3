"""Evaluation and decision tasks."""

from __future__ import annotations

from prefect import task

from freshnet import contest, release
from freshnet.config import Config
from freshnet.contest import DecideResult, EvaluateResult
from freshnet.release import LedgerEntry
from tasks.publish import hf_token
from tasks.report import publish_decision


@task
def evaluate_model(cfg: Config, model_key: str, version: str, snapshot_id: str) -> EvaluateResult:
    return contest.evaluate_step(cfg, model_key, version, snapshot_id)


@task
def decide_promotion(
    cfg: Config,
    challenger: EvaluateResult,
    champion: EvaluateResult | None,
    bundle_error: str | None = None,
    bundle_checked: bool = False,
    before_bundle: bool = False,
) -> DecideResult:
    """Decide; call again after the bundle check (``bundle_checked`` or ``bundle_error``) so the
    bundle rule says pass or fail instead of "not run".

    ``before_bundle``: a promotion decided before its bundle is checked is not final, so its
    report is not published (the UI would show two decision reports for one night).
    """
    result = contest.decide_step(cfg, challenger, champion, bundle_error, bundle_checked)
    if not (before_bundle and result["decision"]["promote"]):
        publish_decision(result)
    return result


@task
def read_champion(cfg: Config) -> LedgerEntry | None:
    return release.champion_step(cfg, token=hf_token(cfg))
