"""The data-side steps of a night (search … snapshot) and the storage plumbing of every step.

Every step takes the config and small JSON-able values and returns a small JSON-able dict (a
TypedDict, so its keys are checked), so the Prefect tasks around them stay a few lines and only
URIs cross machines (served mode). The later steps are in freshnet.contest and freshnet.release.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict, cast

from freshnet.config import Config
from freshnet.storage import Storage
from freshnet.storage_open import open_storage

log = logging.getLogger(__name__)


def open_store(cfg: Config) -> Storage:
    return open_storage(cfg.storage)


def cache_dir(cfg: Config) -> Path:
    """Local scratch space (materialized images, bundles); safe to delete at any time."""
    root = Path(os.environ.get("FRESHNET_CACHE", ".freshnet-cache"))
    tag = hashlib.sha256(cfg.storage.encode()).hexdigest()[:10]
    path = (root / tag).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_version(now: datetime | None = None) -> str:
    """Model versions sort by time: v20261127-020000."""
    return (now or datetime.now(UTC)).strftime("v%Y%m%d-%H%M%S")


def put_json(store: Storage, key: str, value: Any) -> str:
    store.put(key, json.dumps(value, indent=1, sort_keys=True, default=str).encode())
    return key


def get_json(store: Storage, key: str) -> Any:
    return json.loads(store.get(key))


def config_fingerprint(cfg: Config) -> str:
    """What search results depend on: the source, classes and queries (for per-night caching)."""
    part = {"source": cfg.source.model_dump(), "classes": cfg.classes, "queries": cfg.queries}
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


# ---- ingest ---------------------------------------------------------------------------------


class SearchResult(TypedDict):
    """What search_step hands on: the stored report's key and what the night's summary shows."""

    key: str
    candidates: int
    failures: list[dict[str, Any]]  # {"label", "query", "reason"}
    failed_classes: list[str]
    search_events: list[dict[str, Any]]
    search_gave_up: str | None


def search_step(cfg: Config, night: str, feedback_token: str | None = None) -> SearchResult:
    """``feedback_token``: space.feedback_repo's token read at run time (else the environment's)."""
    from freshnet.data import duckduckgo
    from freshnet.data.search import search_all

    store = open_store(cfg)
    options: dict[str, Any] = {}
    if cfg.source.kind == "duckduckgo":
        # Which queries had results on earlier nights: tonight an empty first page of one of
        # them is taken for a block (search_breaker.SearchBreaker), not for an empty result.
        options["history"] = duckduckgo.load_search_history(store)
    report = search_all(cfg, night, feedback_token=feedback_token, **options)
    data = report.to_dict()
    key = put_json(store, f"nights/{night}/search.json", data)
    duckduckgo.save_search_history(store, report, night)
    log.info("night %s: %d candidate URLs (%s)", night, len(report.candidates), key)
    return SearchResult(
        key=key,
        candidates=len(report.candidates),
        failures=report.failures,
        failed_classes=report.failed_classes,
        # The search breaker's pauses, resumes and give-up, for the night's summary.
        search_events=report.events,
        search_gave_up=report.gave_up,
    )


class IngestResult(TypedDict):
    """What ingest_step hands on: the stored outcomes' key and the counts per class and status."""

    key: str
    counts: dict[str, dict[str, int]]
    accepted: int
    rejected: int


def ingest_step(
    cfg: Config,
    night: str,
    search_key: str,
    on_progress: Callable[[int, int], None] | None = None,
) -> IngestResult:
    """Download tonight's candidates; ``on_progress(done, total)`` follows the downloads."""
    from freshnet.data import ingest, sources

    store = open_store(cfg)
    report = sources.SearchReport.from_dict(get_json(store, search_key))
    outcomes = ingest.ingest(report.candidates, cfg, store, progress=True, on_progress=on_progress)
    key = put_json(store, f"nights/{night}/ingest.json", [vars(o) for o in outcomes])
    counts = ingest.count_outcomes(outcomes)
    accepted = sum(1 for o in outcomes if o.status == "accepted")
    return IngestResult(
        key=key, counts=counts, accepted=accepted, rejected=len(outcomes) - accepted
    )


class CurateResult(TypedDict):
    """curate_step's result: the night's CurationReport as a dict (its fields, same names)."""

    night: str
    per_class: dict[str, dict[str, int]]  # new, duplicate, near_duplicate, quarantined
    new_total: int
    duplicate_total: int
    quarantined_total: int
    near_duplicate_total: int
    catalog_rows: int
    conflicts: list[dict[str, Any]]


def curate_step(cfg: Config, night: str, ingest_key: str) -> CurateResult:
    from freshnet.data import ingest
    from freshnet.data.curate import curate

    store = open_store(cfg)
    outcomes = [ingest.Outcome(**o) for o in get_json(store, ingest_key)]
    report = curate(store, outcomes, night, cfg)
    result = cast(CurateResult, report.to_dict())
    put_json(store, f"nights/{night}/curation.json", result)
    return result


class ModelRef(TypedDict):
    """A model as the label check needs it; a ledger entry (release.LedgerEntry) is one."""

    version: str
    model_key: str


def _champion_probs(cfg: Config, store: Storage, champion: ModelRef, rows: Any, judge: Any) -> Any:
    """The champion's probabilities over cfg.classes for the ``judge`` rows (NaN elsewhere).

    Only rows the champion never trained on may be judged by it; the caller passes tonight's.
    """
    import numpy as np

    from freshnet.model import predictions

    probs = np.full((len(rows), len(cfg.classes)), np.nan)
    picked = rows[judge]
    if len(picked) == 0:
        return probs
    try:
        # Through the prediction cache: a rerun night reads these back, and tonight's new
        # holdout images are then already scored when the champion is evaluated.
        scored = predictions.score(
            store,
            champion["version"],
            picked["sha256"].tolist(),
            predictor(cfg, store, champion["model_key"], champion["version"]),
        )
        p, vocab = scored.probs, scored.vocab
    except Exception as exc:  # noqa: BLE001 - the embeddings alone still judge the labels
        log.warning("label check without the champion: %s: %s", type(exc).__name__, exc)
        return probs
    col = {v: i for i, v in enumerate(vocab)}
    if set(cfg.classes) - set(col):
        log.warning("label check without the champion: its classes %s differ", vocab)
        return probs
    probs[np.flatnonzero(judge)] = p[:, [col[c] for c in cfg.classes]]
    return probs


class LabelCheckResult(TypedDict):
    """label_check_step's result: labels.LabelCheck as a dict (its fields, same names)."""

    checked: int
    issues: list[dict[str, Any]]  # sha256, label, suggested, label_p, suggested_p, ...
    notes: list[str]
    sources: dict[str, int]


def label_check_step(cfg: Config, night: str, champion: ModelRef | None = None) -> LabelCheckResult:
    """Hold back images whose label out-of-sample models dispute (status noisy_label).

    Runs after curation and before the snapshot, so neither tonight's challenger nor the holdout
    that scores both models sees them.
    """
    import numpy as np

    from freshnet.data import embed_cache, labels
    from freshnet.data.catalog import load_catalog
    from freshnet.data.quarantine import quarantine_images

    lc = cfg.label_check
    if not lc.enabled:
        off = labels.LabelCheck(0, notes=["label check off (label_check.enabled = false)"])
        return cast(LabelCheckResult, off.to_dict())
    store = open_store(cfg)
    df = load_catalog(store)
    rows = df[(df["status"] == "ok") & df["label"].isin(cfg.classes)].reset_index(drop=True)
    # Past label_check.max_rows earlier images, a per-night sample of them (tonight's all):
    # only those are loaded and refit, so a night's check does not grow with the catalog.
    picked, sampled = labels.sample_earlier(
        rows["label"].tolist(),
        rows["group"].tolist(),
        (rows["first_seen"].astype(str) == str(night)).to_numpy(),
        lc.max_rows,
        labels.night_seed(lc.seed, night),
    )
    rows = rows[picked].reset_index(drop=True)
    if sampled:
        log.info("label check: %s", sampled)
    # Curation has already cached every image's embedding: only the sampled ones are read.
    emb = embed_cache.ensure_embeddings(store, rows["sha256"].tolist(), progress=True)
    missing = int((~emb.ok).sum())
    rows, emb = rows[emb.ok].reset_index(drop=True), emb.take(np.flatnonzero(emb.ok))
    is_new = (rows["first_seen"].astype(str) == str(night)).to_numpy()
    champ = None
    if champion and lc.use_champion:
        champ = _champion_probs(cfg, store, champion, rows, is_new)
    probs, judged, sources, notes = labels.out_of_sample_probs(
        emb.emb,
        rows["label"].tolist(),
        rows["group"].tolist(),
        is_new,
        cfg.classes,
        lc.folds,
        lc.seed,
        champion=champ,
    )
    issues, more = labels.find_issues(
        rows["sha256"].tolist(),
        rows["label"].tolist(),
        probs,
        judged,
        cfg.classes,
        lc.filter_by,
        lc.max_flag_fraction,
        lc.chance_fraction,
    )
    notes += more
    if missing:
        notes.append(f"{missing} image(s) without an embedding (unreadable): not judged")
    for note in notes:
        log.warning("label check: %s", note)
    if sampled:
        notes.append(sampled)
    check = labels.LabelCheck(int(judged.sum()), issues, notes, sources)
    if issues:
        held = quarantine_images(
            store,
            [i["sha256"] for i in issues],
            "noisy_label",
            {
                i["sha256"]: f"label check night {night}: looks like {i['suggested']} "
                f"(p={i['suggested_p']:.2f}; p({i['label']})={i['label_p']:.2f})"
                for i in issues
            },
        )
        log.warning(
            "label check: %d of %d image(s) look mislabeled; %d held for review "
            "(`freshnet quarantine list`)",
            len(issues),
            check.checked,
            held,
        )
    result = cast(LabelCheckResult, check.to_dict())
    put_json(store, f"nights/{night}/labels.json", result)
    return result


class SnapshotResult(TypedDict):
    """What snapshot_step hands on: the snapshot, its quality-gate problems, and what is new."""

    id: str
    key: str
    counts: dict[str, dict[str, int]]  # label -> {"train": n, "holdout": n}
    rows: int
    problems: list[str]  # the quality gate's: the night stops when there are any
    new_since: int | None  # images not in the champion's snapshot (None: no champion)


def snapshot_step(cfg: Config, since: str | None = None) -> SnapshotResult:
    """Snapshot and gate; ``new_since`` counts images not in snapshot ``since`` (the champion's).

    "Nothing new" is measured against the champion's dataset, not tonight's curation: a night
    that failed after curating must still train on its images when it is rerun.
    """
    from freshnet.data.catalog import CatalogError
    from freshnet.data.snapshot import (
        build_manifest,
        check_quality,
        diff_manifests,
        load_manifest,
        write_snapshot,
    )

    store = open_store(cfg)
    manifest = build_manifest(store, cfg)
    snap = write_snapshot(store, manifest, cfg.classes)
    problems = check_quality(snap, cfg.dataset, cfg.classes)
    new_since = None
    if since:
        try:
            # Tonight's rows are in hand: only the champion's snapshot is read back.
            old = load_manifest(store, since)
            new_since = int(diff_manifests(old, manifest)["added"].sum())
        except CatalogError as exc:  # the champion's snapshot is gone or unreadable
            log.warning("%s: every image of tonight's snapshot counts as new", exc)
            new_since = snap.rows
    return SnapshotResult(
        id=snap.id,
        key=snap.key,
        counts=snap.counts,
        rows=snap.rows,
        problems=problems,
        new_since=new_since,
    )


# ---- a model's predictions (label check, evaluation) ---------------------------------------


def predictor(
    cfg: Config, store: Storage, model_key: str, version: str
) -> Callable[[list[str]], tuple[Any, list[str]]]:
    """predict(shas) -> (probs, vocab) for freshnet.model.predictions: fetches the model and only the
    images it is asked for, so rows served from the prediction cache cost no download."""

    def predict(shas: list[str]) -> tuple[Any, list[str]]:
        import pandas as pd

        from freshnet.model import evaluate, loaders

        model_path = cache_dir(cfg) / "models" / version / "model.pkl"
        if not model_path.exists():
            store.get_to_file(model_key, model_path)
        image_dir = loaders.materialize(
            store, pd.DataFrame({"sha256": shas}), cache_dir(cfg) / "images"
        )
        _, probs, vocab = evaluate.predict_files(
            model_path, [loaders.image_path(image_dir, s) for s in shas]
        )
        return probs, vocab

    return predict


# ---- history ----------------------------------------------------------------------------------


class NightRecordResult(TypedDict):
    """record_night_step's result: tonight's history record and the history table's rows."""

    record: dict[str, Any]
    rows: list[dict[str, Any]]


def record_night_step(
    cfg: Config, summary: dict[str, Any], run: str | None = None
) -> NightRecordResult:
    """Add tonight to the nights' history in storage; returns the record and the table rows."""
    from freshnet import history

    store = open_store(cfg)
    rec = history.record(store, summary, run)
    return NightRecordResult(record=rec, rows=history.table_rows(history.recent(store)))
