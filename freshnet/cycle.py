"""The steps of one nightly cycle, each one core call plus its storage I/O.

Every step takes the config and small JSON-able values and returns a small JSON-able dict, so the
Prefect tasks around them stay a few lines and only URIs cross machines (served mode).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from freshnet.config import Config
from freshnet.storage import NotFound, Storage, open_storage

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


def search_step(cfg: Config, night: str, feedback_token: str | None = None) -> dict[str, Any]:
    """``feedback_token``: space.feedback_repo's token read at run time (else the environment's)."""
    from freshnet.data import feedback, sources

    store = open_store(cfg)
    options: dict[str, Any] = {}
    if cfg.source.kind == "duckduckgo":
        # Which queries had results on earlier nights: tonight an empty first page of one of
        # them is taken for a block (sources.SearchBreaker), not for an empty result.
        options["history"] = sources.load_search_history(store)
    report = feedback.search_all(cfg, night, feedback_token=feedback_token, **options)
    data = report.to_dict()
    key = put_json(store, f"nights/{night}/search.json", data)
    sources.save_search_history(store, report, night)
    log.info("night %s: %d candidate URLs (%s)", night, len(report.candidates), key)
    return {
        "key": key,
        "candidates": len(report.candidates),
        "failures": report.failures,
        "failed_classes": report.failed_classes,
        # The search breaker's pauses, resumes and give-up, for the night's summary.
        "search_events": report.events,
        "search_gave_up": report.gave_up,
    }


def ingest_step(
    cfg: Config,
    night: str,
    search_key: str,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Download tonight's candidates; ``on_progress(done, total)`` follows the downloads."""
    from freshnet.data import ingest, sources

    store = open_store(cfg)
    report = sources.SearchReport.from_dict(get_json(store, search_key))
    outcomes = ingest.ingest(report.candidates, cfg, store, progress=True, on_progress=on_progress)
    key = put_json(store, f"nights/{night}/ingest.json", [vars(o) for o in outcomes])
    counts = ingest.count_outcomes(outcomes)
    accepted = sum(1 for o in outcomes if o.status == "accepted")
    return {
        "key": key,
        "counts": counts,
        "accepted": accepted,
        "rejected": len(outcomes) - accepted,
    }


def curate_step(cfg: Config, night: str, ingest_key: str) -> dict[str, Any]:
    from freshnet.data import dataset, ingest

    store = open_store(cfg)
    outcomes = [ingest.Outcome(**o) for o in get_json(store, ingest_key)]
    report = dataset.curate(store, outcomes, night, cfg)
    put_json(store, f"nights/{night}/curation.json", report.to_dict())
    return report.to_dict()


def _champion_probs(
    cfg: Config, store: Storage, champion: dict[str, Any], rows: Any, judge: Any
) -> Any:
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
            _predictor(cfg, store, champion["model_key"], champion["version"]),
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


def label_check_step(
    cfg: Config, night: str, champion: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Hold back images whose label out-of-sample models dispute (status noisy_label).

    Runs after curation and before the snapshot, so neither tonight's challenger nor the holdout
    that scores both models sees them.
    """
    import numpy as np

    from freshnet.data import dataset, embed, labels

    lc = cfg.label_check
    if not lc.enabled:
        return labels.LabelCheck(
            0, notes=["label check off (label_check.enabled = false)"]
        ).to_dict()
    store = open_store(cfg)
    df = dataset.load_catalog(store)
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
    emb = embed.ensure_embeddings(store, rows["sha256"].tolist(), progress=True)
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
        held = dataset.quarantine_images(
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
    put_json(store, f"nights/{night}/labels.json", check.to_dict())
    return check.to_dict()


def snapshot_step(cfg: Config, since: str | None = None) -> dict[str, Any]:
    """Snapshot and gate; ``new_since`` counts images not in snapshot ``since`` (the champion's).

    "Nothing new" is measured against the champion's dataset, not tonight's curation: a night
    that failed after curating must still train on its images when it is rerun.
    """
    from freshnet.data import dataset

    store = open_store(cfg)
    snap = dataset.make_snapshot(store, cfg)
    problems = dataset.check_quality(snap, cfg.dataset, cfg.classes)
    new_since = None
    if since:
        try:
            new_since = int(dataset.diff_snapshots(store, since, snap.id)["added"].sum())
        except NotFound:  # the champion's snapshot is gone: everything counts as new
            new_since = snap.rows
    return {
        "id": snap.id,
        "key": snap.key,
        "counts": snap.counts,
        "rows": snap.rows,
        "problems": problems,
        "new_since": new_since,
    }


# ---- train ----------------------------------------------------------------------------------


def train_step(
    cfg: Config,
    snapshot_id: str,
    version: str,
    init_model_key: str | None,
    on_progress: Callable[[float, int], None] | None = None,
) -> dict[str, Any]:
    """Train ``version``; ``on_progress(epochs, total)`` follows the training."""
    from freshnet.data import dataset
    from freshnet.model import evaluate, train

    store = open_store(cfg)
    tc = cfg.train

    def find_noise(model_path: Path, rows: Any, image_dir: Path) -> list[dict[str, Any]]:
        return evaluate.find_label_noise(
            model_path, rows, image_dir, tc.noise_confidence, tc.noise_top_loss_fraction
        )

    result = train.train_snapshot(
        store,
        snapshot_id,
        cfg,
        version,
        cache_dir(cfg),
        init_model_key=init_model_key,
        progress=on_progress,
        find_noise=find_noise if tc.in_sample_noise else None,
    )
    noisy = result.get("noisy") or []
    if noisy:
        # Never relabel silently: suspects go to review and leave the next snapshot.
        dataset.quarantine_images(
            store, [n["sha256"] for n in noisy], "noisy_label", f"flagged by {version}"
        )
    put_json(store, f"models/{version}/result.json", result)
    return result


def load_train_result(cfg: Config, version: str) -> dict[str, Any]:
    """What the train flow left in storage (how a result crosses machines in served mode)."""
    result: dict[str, Any] = get_json(open_store(cfg), f"models/{version}/result.json")
    return result


def find_train_result(cfg: Config, version: str) -> dict[str, Any] | None:
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


def _predictor(
    cfg: Config, store: Storage, model_key: str, version: str
) -> Callable[[list[str]], tuple[Any, list[str]]]:
    """predict(shas) -> (probs, vocab) for freshnet.model.predictions: fetches the model and only the
    images it is asked for, so rows served from the prediction cache cost no download."""

    def predict(shas: list[str]) -> tuple[Any, list[str]]:
        import pandas as pd

        from freshnet.model import evaluate, train

        model_path = cache_dir(cfg) / "models" / version / "model.pkl"
        if not model_path.exists():
            store.get_to_file(model_key, model_path)
        image_dir = train.materialize(
            store, pd.DataFrame({"sha256": shas}), cache_dir(cfg) / "images"
        )
        _, probs, vocab = evaluate.predict_files(
            model_path, [train.image_path(image_dir, s) for s in shas]
        )
        return probs, vocab

    return predict


def evaluate_step(cfg: Config, model_key: str, version: str, snapshot_id: str) -> dict[str, Any]:
    """Score ``version`` on the snapshot's holdout; the model predicts only the images its
    prediction cache (per version and image sha256) does not hold yet."""
    from freshnet.data import dataset
    from freshnet.model import evaluate, predictions

    store = open_store(cfg)
    key = f"evals/{version}/{snapshot_id}.json"
    try:
        done: dict[str, Any] = get_json(store, key)  # a model is scored once per snapshot
        return done
    except NotFound:
        pass
    manifest = dataset.load_manifest(store, snapshot_id)
    rows = evaluate.holdout_rows(manifest[manifest["split"] == "holdout"])
    scored = predictions.score(
        store, version, rows["sha256"].tolist(), _predictor(cfg, store, model_key, version)
    )
    ev = evaluate.evaluation_from(version, rows, scored.probs, scored.vocab, cached=scored.cached)
    store.put(f"evals/{version}/{snapshot_id}.png", evaluate.confusion_png(ev))
    put_json(store, key, ev.to_dict())
    return ev.to_dict()


def decide_step(
    cfg: Config,
    challenger: dict[str, Any],
    champion: dict[str, Any] | None,
    bundle_error: str | None = None,
    bundle_checked: bool = False,
) -> dict[str, Any]:
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
    out = {
        "decision": decision.to_dict(),
        "comparison": vars(comparison) if comparison else None,
        "report_key": f"decisions/{chal.version}.md",
        "report": report,
        "confusion_key": png_key,
        "confusion_url": png_url,
        "confusion_table": policy.confusion_markdown(chal),
    }
    put_json(store, f"decisions/{chal.version}.json", out)
    log.info(
        "decision for %s: %s — %s",
        chal.version,
        "PROMOTE" if decision.promote else "KEEP CHAMPION",
        decision.summary,
    )
    return out


# ---- bundle and publish ---------------------------------------------------------------------


def _examples(cfg: Config, holdout_paths: list[tuple[Path, str]]) -> list[Path]:
    if cfg.space.examples_dir and Path(cfg.space.examples_dir).is_dir():
        return sorted(Path(cfg.space.examples_dir).glob("*.jpg"))[:10]
    # One holdout image per class makes a fair example set.
    seen: dict[str, Path] = {}
    for path, label in holdout_paths:
        seen.setdefault(label, path)
    return list(seen.values())


def bundle_step(
    cfg: Config,
    version: str,
    train_result: dict[str, Any],
    evaluation: dict[str, Any],
    snapshot_id: str,
) -> dict[str, Any]:
    """Build the Space bundle and check it in a clean process; returns its path and the verdict."""
    from freshnet.data import dataset
    from freshnet.model import train
    from freshnet.space import publish as space

    store = open_store(cfg)
    model_path = cache_dir(cfg) / "models" / version / "model.pkl"
    if not model_path.exists():
        store.get_to_file(train_result["model_key"], model_path)
    manifest = dataset.load_manifest(store, snapshot_id)
    holdout = manifest[manifest["split"] == "holdout"]
    image_dir = train.materialize(store, holdout, cache_dir(cfg) / "images")
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
    bundle = space.build_bundle(model_path, meta, examples, out_dir, cfg.space)
    check = space.validate_bundle(bundle, canaries, cfg.policy.canary_latency_s)
    return {
        "path": str(bundle),
        "ok": check.ok,
        "reason": check.reason,
        "latency_s": check.latency_s,
        "meta": meta,
    }


def publish_step(
    cfg: Config,
    version: str,
    bundle_path: str,
    train_result: dict[str, Any],
    evaluation: dict[str, Any],
    decision: dict[str, Any],
    snapshot_id: str,
    token: str | None = None,
) -> dict[str, Any]:
    """The nightly promotion: the validated bundle through the one publish path.

    ``token`` is the HF token read at run time by the caller (else HF_TOKEN); it is never stored.
    """
    from freshnet.space import publish as space

    def prepare(ledger: Any, served: Any, work: Path) -> space.Release:
        return space.Release(
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


def champion_step(cfg: Config, token: str | None = None) -> dict[str, Any] | None:
    """The champion, after settling a publish that a killed or failed publisher left pending.

    Healing here (not only at the next publish) means a night that keeps the champion still
    brings the ledger back in line with what the Space serves.
    """
    from freshnet.space.ledger import Ledger

    ledger = Ledger(open_store(cfg))
    if ledger.intent()[0] is not None:
        return reconcile_step(cfg, token)
    entry = ledger.champion()
    return vars(entry) if entry else None


# ---- the one publish path: nightly promotion, rollback and manual promotion -----------------

PUBLISH_LEASE = "publish"
# A killed publisher holds the lease at most this long (a live one renews it every third of it).
PUBLISH_LEASE_TTL_S = 60.0
# How long a publisher waits for another one to finish (an HF commit of a large model is slow).
PUBLISH_LEASE_WAIT_S = 900.0


def _publish_lease(store: Storage, what: str) -> Any:
    """Take the publish lease (a conditional write in storage), waiting while another holds it."""
    from freshnet.lease import Lease, LeaseHeld

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
    from freshnet.redact import redact
    from freshnet.space import publish as space

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
        head = space.space_head(target, token)
        if not head or space.intent_mark(intent["id"]) not in space.commit_message(
            target, head, token
        ):
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
    import uuid

    from freshnet.redact import redact
    from freshnet.space import publish as space

    t0 = time.perf_counter()
    target = cfg.space.target
    settle_intent(cfg, ledger, token)
    champion = ledger.champion()
    same = champion is not None and redact(champion.target) == redact(target)
    expected = champion.commit if same else None
    head = space.space_head(target, token)
    space.check_parent(target, head, expected)  # SpaceMoved before any work when it moved
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
        raise space.PublishError(f"lost the publish lease before pushing {release.version}")
    title = f"{release.title} {space.intent_mark(intent_id)}"
    try:
        commit = space.publish(release.bundle, target, title, head, token=token)
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
) -> dict[str, Any]:
    """The one publish path: nightly promotion, rollback and manual promotion all come here.

    Under the publish lease: settle a lost intent, check the Space's head is the champion's
    commit, ``prepare(ledger, served_entry, work_dir)`` a space.Release, write the intent, push
    one commit (its title carries the intent id), append the ledger entry, point the champion at
    it, clear the intent. A publisher killed anywhere leaves state the next one settles exactly.
    Then, outside the lease, the Space must come up (``space.wait_running``, hf targets).
    """
    import tempfile

    from freshnet.space import publish as space
    from freshnet.space.ledger import Ledger

    store = open_store(cfg)
    ledger = Ledger(store)
    target = cfg.space.target
    with tempfile.TemporaryDirectory(prefix="freshnet-publish-", dir=cache_dir(cfg)) as tmp:
        lease = _publish_lease(store, what)
        try:
            entry, bundle = _publish_locked(cfg, ledger, lease, prepare, Path(tmp), token)
        finally:
            _release(lease)
        if cfg.space.wait_running and target.startswith(space.HF_PREFIX):
            # The commit is live and recorded; a Space that fails to start is a loud failure
            # (rollback is one command), not a silent success.
            examples = sorted(
                p
                for p in (Path(bundle) / "examples").glob("*")
                if p.suffix.lower() in space.IMAGE_SUFFIXES
            )
            space.wait_space(
                target,
                cfg.space.wait_timeout_s,
                token=token,
                canary=examples[0] if examples else None,
            )
    published: dict[str, Any] = vars(entry)
    return published


def rollback_step(
    cfg: Config, version: str | None = None, token: str | None = None
) -> dict[str, Any]:
    """Publish an earlier version again: ``version``, or the one before what the Space serves."""
    from freshnet.space import publish as space

    def prepare(ledger: Any, served: Any, work: Path) -> space.Release:
        chosen = space.rollback_version(ledger.history(), served, version)
        return space.republish_release(
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


def promote_step(
    cfg: Config, version: str, reason: str, token: str | None = None
) -> dict[str, Any]:
    """Publish any trained version by hand (models/<version>/model.pkl), recording the reason."""
    from freshnet.space import publish as space
    from freshnet.space.ledger import LedgerError

    if not reason or not reason.strip():
        raise LedgerError("a manual promotion needs a reason (--reason TEXT)")

    def prepare(ledger: Any, served: Any, work: Path) -> space.Release:
        return space.republish_release(
            cfg, ledger.store, ledger, version, "manual", reason.strip(), served, work, token
        )

    return publish_and_record(cfg, prepare, token=token, what=f"manual promotion of {version}")


def reconcile_step(cfg: Config, token: str | None = None) -> dict[str, Any] | None:
    """Settle a lost publish intent now (under the lease) and return the champion."""
    from freshnet.space.ledger import Ledger

    store = open_store(cfg)
    ledger = Ledger(store)
    lease = _publish_lease(store, "reconcile")
    try:
        settle_intent(cfg, ledger, token)
    finally:
        _release(lease)
    entry = ledger.champion()
    return vars(entry) if entry else None


# ---- history ----------------------------------------------------------------------------------


def record_night_step(
    cfg: Config, summary: dict[str, Any], run: str | None = None
) -> dict[str, Any]:
    """Add tonight to the nights' history in storage; returns the record and the table rows."""
    from freshnet import history

    store = open_store(cfg)
    rec = history.record(store, summary, run)
    return {"record": rec, "rows": history.table_rows(history.recent(store))}
