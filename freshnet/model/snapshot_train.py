"""The train step on a stored snapshot: fetch its images, train, upload ``models/<version>/``."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freshnet.data.snapshot import load_manifest
from freshnet.model.loaders import LABEL_COL, materialize
from freshnet.model.train import train_model
from freshnet.storage import sha256_file

if TYPE_CHECKING:
    import pandas as pd

    from freshnet.config import Config
    from freshnet.storage import Storage

log = logging.getLogger(__name__)


def train_snapshot(
    store: Storage,
    snapshot_id: str,
    cfg: Config,
    version: str,
    work_dir: Path,
    init_model_key: str | None = None,
    progress: Callable[[float, int], None] | None = None,
    find_noise: Callable[[Path, pd.DataFrame, Path], list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Train on a snapshot's train rows, upload ``models/<version>/``, return a small JSON-able dict.

    ``progress(epochs, total)`` follows the training, as in ``train_model``.
    ``find_noise(model_path, train_rows, image_dir)`` lists training images the new model
    disputes (the caller passes evaluate's check: the trainer does not import the evaluator).
    """
    work_dir = Path(work_dir)
    manifest = load_manifest(store, snapshot_id)
    train_rows = manifest[manifest["split"] == "train"]
    train_rows = train_rows[train_rows[LABEL_COL].isin(cfg.classes)].reset_index(drop=True)
    image_dir = materialize(store, train_rows, work_dir / "images")
    init_from = None
    if cfg.train.init == "champion" and init_model_key:
        init_from = store.get_to_file(init_model_key, work_dir / "champion" / "model.pkl")
    out_path = work_dir / "models" / version / "model.pkl"
    result = train_model(
        train_rows,
        image_dir,
        cfg.train,
        out_path,
        init_from=init_from,
        progress=progress,
        cache_dir=work_dir / "pixels",
    )

    noisy = find_noise(out_path, train_rows, image_dir) if find_noise else []
    if noisy:
        log.warning("%d training image(s) look mislabeled (listed for quarantine)", len(noisy))

    model_key = f"models/{version}/model.pkl"
    model_sha = sha256_file(out_path)
    metrics = {
        "valid_accuracy": result.valid_accuracy,
        "train_size": result.train_size,
        "valid_size": result.valid_size,
        "seconds": round(result.seconds, 3),
        "epochs": result.epochs,
        "arch": result.arch,
        "device": result.device,
        "precision": result.precision,
        "init": result.init,
        "init_note": result.init_note,
        "vocab": result.vocab,
    }
    info = {
        "version": version,
        "snapshot": snapshot_id,
        "model_key": model_key,
        "model_sha256": model_sha,
        "metrics": metrics,
        "history": result.history,
        "config": cfg.train.model_dump(mode="json"),
        "noisy": noisy,
    }
    with open(out_path, "rb") as f:
        store.put(model_key, f.read())
    store.put(f"models/{version}/train.json", json.dumps(info, indent=2, sort_keys=True).encode())
    # The cached images are reusable by the next night; the champion copy is not.
    shutil.rmtree(work_dir / "champion", ignore_errors=True)
    return {
        k: info[k] for k in ("version", "snapshot", "model_key", "model_sha256", "metrics", "noisy")
    }
