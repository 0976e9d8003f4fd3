"""A night's contest: train the challenger, score it and the champion, check its bundle, decide."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict, cast

from freshnet.config import Config
from freshnet.cycle import cache_dir, get_json, new_version, open_store, predictor, put_json
from freshnet.storage import NotFound

log = logging.getLogger(__name__)


# ---- train ---------------------------------------------------------------------------------


class TrainResult(TypedDict):
    """What a training hands on (also stored as models/<version>/result.json for other machines)."""

    version: str
    snapshot: str
    model_key: str
    model_sha256: str
    metrics: dict[str, Any]  # valid_accuracy, seconds, arch, ... (snapshot_train.train_snapshot)
    noisy: list[dict[str, Any]]  # training images the new model disputes: sha256, label, ...


def train_step(
    cfg: Config,
    snapshot_id: str,
    version: str,
    init_model_key: str | None,
    on_progress: Callable[[float, int], None] | None = None,
) -> TrainResult:
    """Train ``version``; ``on_progress(epochs, total)`` follows the training."""
    from freshnet.data.quarantine import quarantine_images
    from freshnet.model import evaluate, snapshot_train

    store = open_store(cfg)
    tc = cfg.train

    def find_noise(model_path: Path, rows: Any, image_dir: Path) -> list[dict[str, Any]]:
        return evaluate.find_label_noise(
            model_path, rows, image_dir, tc.noise_confidence, tc.noise_top_loss_fraction
        )

    trained = snapshot_train.train_snapshot(
        store,
        snapshot_id,
        cfg,
        version,
        cache_dir(cfg),
        init_model_key=init_model_key,
        progress=on_progress,
        find_noise=find_noise if tc.in_sample_noise else None,
    )
    result = TrainResult(
        version=trained["version"],
        snapshot=trained["snapshot"],
        model_key=trained["model_key"],
        model_sha256=trained["model_sha256"],
        metrics=trained["metrics"],
        noisy=trained["noisy"],
    )
    noisy = result.get("noisy") or []
    if noisy:
        # Never relabel silently: suspects go to review and leave the next snapshot.
        quarantine_images(
            store, [n["sha256"] for n in noisy], "noisy_label", f"flagged by {version}"
        )
    put_json(store, f"models/{version}/result.json", result)
    return result


def load_train_result(cfg: Config, version: str) -> TrainResult:
    """What the train flow left in storage (how a result crosses machines in served mode)."""
    result: TrainResult = get_json(open_store(cfg), f"models/{version}/result.json")
    return result


def find_train_result(cfg: Config, version: str) -> TrainResult | None:
    """The finished training of ``version`` if an earlier attempt left one (it is written last)."""
    try:
        return load_train_result(cfg, version)
    except NotFound:
        return None


def night_version(cfg: Config, night: str, snapshot_id: str, init_key: str | None) -> str:
    """The model version of this night's training, the same for every attempt at it.

    A retried or rerun night with the same snapshot, training config and starting model names
    the same version, so it finds the training and evaluations an earlier attempt finished
    instead of training again (and a train run started by an earlier attempt is joined, not
    duplicated). The first attempt's time stamp makes the version; the record is written once.
    """
    part = {"snapshot": snapshot_id, "train": cfg.train.model_dump(), "init": init_key}
    tag = hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:16]
    key = f"nights/{night}/version-{tag}.json"
    store = open_store(cfg)
    store.put_if_absent(key, json.dumps({"version": new_version(), **part}, default=str).encode())
    version: str = get_json(store, key)["version"]
    log.info("night %s: model version %s (snapshot %s)", night, version, snapshot_id)
    return version


# ---- evaluate and decide --------------------------------------------------------------------


class EvaluateResult(TypedDict):
    """evaluate_step's result: model.evaluate.Evaluation as a dict (its fields, same names)."""

    version: str
    labels: list[str]
    shas: list[str]
    truth: list[str]
    predicted: list[str]
    accuracy: float
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    vocab: list[str]
    confidence: list[float]
    cached_predictions: int
    new_predictions: int


def evaluate_step(cfg: Config, model_key: str, version: str, snapshot_id: str) -> EvaluateResult:
    """Score ``version`` on the snapshot's holdout; the model predicts only the images its
    prediction cache (per version and image sha256) does not hold yet."""
    from freshnet.data.snapshot import load_manifest
    from freshnet.model import evaluate, predictions

    store = open_store(cfg)
    key = f"evals/{version}/{snapshot_id}.json"
    try:
        done: EvaluateResult = get_json(store, key)  # a model is scored once per snapshot
        return done
    except NotFound:
        pass
    manifest = load_manifest(store, snapshot_id)
    rows = evaluate.holdout_rows(manifest[manifest["split"] == "holdout"])
    scored = predictions.score(
        store, version, rows["sha256"].tolist(), predictor(cfg, store, model_key, version)
    )
    ev = evaluate.evaluation_from(version, rows, scored.probs, scored.vocab, cached=scored.cached)
    store.put(f"evals/{version}/{snapshot_id}.png", evaluate.confusion_png(ev))
    result = cast(EvaluateResult, ev.to_dict())
    put_json(store, key, result)
    return result


class DecisionDict(TypedDict):
    """model.policy.Decision as a dict (its fields, same names)."""

    promote: bool
    rules: list[dict[str, Any]]  # name, value, threshold, passed, detail, status
    summary: str
    first_run: bool
    notes: list[str]


class DecideResult(TypedDict):
    """decide_step's result (also stored as decisions/<version>.json)."""

    decision: DecisionDict
    comparison: dict[str, Any] | None  # model.evaluate.Comparison's fields; None without champion
    report_key: str
    report: str  # markdown for the Prefect UI
    confusion_key: str
    confusion_url: str | None
    confusion_table: str


def decide_step(
    cfg: Config,
    challenger: EvaluateResult,
    champion: EvaluateResult | None,
    bundle_error: str | None = None,
    bundle_checked: bool = False,
) -> DecideResult:
    """Decide, and write the report (markdown + confusion PNG) next to the decision in storage.

    ``report`` is for the Prefect UI: its confusion image is a presigned URL where the storage
    can give one (a relative path shows nothing there); the stored copy links the PNG beside it.
    """
    from freshnet.model import evaluate, policy

    chal = evaluate.Evaluation.from_dict(challenger)
    champ = evaluate.Evaluation.from_dict(champion) if champion else None
    comparison = (
        evaluate.compare(champ, chal, resamples=cfg.policy.bootstrap_resamples) if champ else None
    )
    decision = policy.decide(
        chal,
        champ,
        comparison,
        cfg.policy,
        bundle_error=bundle_error,
        bundle_checked=bundle_checked,
    )
    store = open_store(cfg)
    png_key = f"decisions/{chal.version}.png"
    store.put(png_key, evaluate.confusion_png(chal))
    try:
        png_url = store.presigned_url(png_key)
    except Exception as exc:  # noqa: BLE001 - no URL only costs the image; the table remains
        log.warning("no browser URL for the confusion matrix %s: %s", png_key, exc)
        png_url = None
    stored = policy.decision_report(decision, chal, champ, comparison, f"{chal.version}.png")
    store.put(f"decisions/{chal.version}.md", stored.encode())
    report = policy.decision_report(decision, chal, champ, comparison, png_url)
    out = DecideResult(
        decision=cast(DecisionDict, decision.to_dict()),
        comparison=vars(comparison) if comparison else None,
        report_key=f"decisions/{chal.version}.md",
        report=report,
        confusion_key=png_key,
        confusion_url=png_url,
        confusion_table=policy.confusion_markdown(chal),
    )
    put_json(store, f"decisions/{chal.version}.json", out)
    log.info(
        "decision for %s: %s — %s",
        chal.version,
        "PROMOTE" if decision.promote else "KEEP CHAMPION",
        decision.summary,
    )
    return out


# ---- the bundle check ----------------------------------------------------------------------


def _examples(cfg: Config, holdout_paths: list[tuple[Path, str]]) -> list[Path]:
    if cfg.space.examples_dir and Path(cfg.space.examples_dir).is_dir():
        return sorted(Path(cfg.space.examples_dir).glob("*.jpg"))[:10]
    # One holdout image per class makes a fair example set.
    seen: dict[str, Path] = {}
    for path, label in holdout_paths:
        seen.setdefault(label, path)
    return list(seen.values())


class BundleResult(TypedDict):
    """bundle_step's result: where the bundle is and whether its clean-process check passed."""

    path: str
    ok: bool
    reason: str  # why the check failed ("ok" when it passed)
    latency_s: float  # the slowest canary prediction in the clean process
    meta: dict[str, Any]  # what the model card says: version, accuracy, classes, dataset, ...


def bundle_step(
    cfg: Config,
    version: str,
    train_result: TrainResult,
    evaluation: EvaluateResult,
    snapshot_id: str,
) -> BundleResult:
    """Build the Space bundle and check it in a clean process; returns its path and the verdict."""
    from freshnet.data.snapshot import load_manifest
    from freshnet.model import loaders
    from freshnet.space.bundle import build_bundle, validate_bundle

    store = open_store(cfg)
    model_path = cache_dir(cfg) / "models" / version / "model.pkl"
    if not model_path.exists():
        store.get_to_file(train_result["model_key"], model_path)
    manifest = load_manifest(store, snapshot_id)
    holdout = manifest[manifest["split"] == "holdout"]
    image_dir = loaders.materialize(store, holdout, cache_dir(cfg) / "images")
    truth = dict(zip(evaluation["shas"], evaluation["truth"], strict=True))
    predicted = dict(zip(evaluation["shas"], evaluation["predicted"], strict=True))
    # Canaries: the two most confident holdout images per class, expected to get the in-process
    # predictions. Confident ones only: a near-tie can flip between batched and one-by-one
    # inference (float rounding differs), which would fail a sound bundle.
    confidence = dict(zip(evaluation["shas"], evaluation.get("confidence") or [], strict=False))
    per_class: dict[str, int] = {}
    canaries: list[tuple[Path, str]] = []
    for sha in sorted(evaluation["shas"], key=lambda s: -confidence.get(s, 0.0)):
        label = truth[sha]
        if per_class.get(label, 0) < 2:
            per_class[label] = per_class.get(label, 0) + 1
            canaries.append((image_dir / f"{sha}.jpg", predicted[sha]))
    examples = _examples(cfg, [(image_dir / f"{s}.jpg", truth[s]) for s in evaluation["shas"]])
    meta = {
        "version": version,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "holdout_accuracy": evaluation["accuracy"],
        "classes": evaluation["labels"],
        "dataset": snapshot_id,
        "arch": train_result.get("metrics", {}).get("arch"),
        "title": cfg.space.title,
        "description": cfg.space.description,
        "per_class": evaluation.get("per_class"),
        "holdout_size": len(evaluation["shas"]),
    }
    out_dir = cache_dir(cfg) / "bundles" / version
    if out_dir.exists():
        shutil.rmtree(out_dir)
    bundle = build_bundle(model_path, meta, examples, out_dir, cfg.space)
    check = validate_bundle(bundle, canaries, cfg.policy.canary_latency_s)
    return BundleResult(
        path=str(bundle), ok=check.ok, reason=check.reason, latency_s=check.latency_s, meta=meta
    )
