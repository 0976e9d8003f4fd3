"""The test model: a small real flower classifier, trained by freshnet's own trainer once per session."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

PER_CLASS_TRAIN = 40  # 200 photos: enough for every class, cheap on 2 shared CPU cores

_CACHE: dict[str, Path] = {}


def split_flowers(flower_photos: dict[str, list[Path]]) -> tuple[list[Path], dict[str, list[Path]]]:
    """A fixed train list and the remaining photos per class (holdout candidates)."""
    train: list[Path] = []
    rest: dict[str, list[Path]] = {}
    for label, paths in sorted(flower_photos.items()):
        shuffled = list(paths)
        random.Random(label).shuffle(shuffled)
        train += shuffled[:PER_CLASS_TRAIN]
        rest[label] = shuffled[PER_CLASS_TRAIN:]
    return train, rest


def tiny_train_config():
    """The nightly's trainer, made small: 128 px, no augmentation, one frozen and one full epoch."""
    from freshnet.config_sections import TrainConfig

    return TrainConfig(
        image_size=128,
        epochs=1,
        freeze_epochs=1,
        batch_size=16,
        augment=False,
        loader="files",  # no pixel cache to build for one short run
        device="cpu",
        seed=0,
    )


def train_flower_model(flower_photos: dict[str, list[Path]], out_dir: Path) -> Path:
    """Train with ``freshnet.model.train.train_model`` on the fixed train split; returns model.pkl."""
    key = str(out_dir)
    if key in _CACHE:
        return _CACHE[key]
    import pandas as pd

    from freshnet.model.loaders import image_path
    from freshnet.model.train import train_model

    train, _ = split_flowers(flower_photos)
    # The trainer reads <sha256>.jpg from an image folder, as materialized from storage:
    # links to the shared photos stand in for it (the photos are never copied).
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = {}
    for path in train:
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        link = image_path(image_dir, sha)
        if not link.exists():
            link.symlink_to(path.resolve())
        rows[sha] = path.parent.name  # an identical photo in two classes keeps one row
    manifest = pd.DataFrame({"sha256": list(rows), "label": list(rows.values())})
    result = train_model(manifest, image_dir, tiny_train_config(), out_dir / "model.pkl")
    _CACHE[key] = result.model_path
    return result.model_path


def model_for_tests(flower_photos: dict[str, list[Path]], tmp_path_factory) -> Path:
    """One trained model per test session (FRESHNET_SPACE_TEST_MODEL reuses a prebuilt one)."""
    prebuilt = os.environ.get("FRESHNET_SPACE_TEST_MODEL")
    if prebuilt:
        return Path(prebuilt)
    return train_flower_model(flower_photos, tmp_path_factory.getbasetemp() / "space-model")


# Loads model.pkl and predicts with fastai alone, freshnet import blocked, and prints
# {"vocab": [...], "pred": [[label, p_max], ...]}.
CLEAN_PROCESS_PREDICT = r"""
import importlib.abc, sys, json
class Block(importlib.abc.MetaPathFinder):
    # freshnet is installed in this venv (editable): make sure the model never needs it.
    def find_spec(self, name, path=None, target=None):
        if name == "freshnet" or name.startswith("freshnet."):
            raise ImportError("freshnet is not available in the Space")
sys.meta_path.insert(0, Block())
from fastai.learner import load_learner
from fastai.vision.core import PILImage
learn = load_learner(sys.argv[1])
out = []
for p in sys.argv[2:]:
    label, idx, probs = learn.predict(PILImage.create(p))
    out.append([str(label), float(probs.max())])
assert not any(m.startswith("freshnet") for m in sys.modules), "freshnet was imported"
print(json.dumps({"vocab": [str(v) for v in learn.dls.vocab], "pred": out}))
"""


def predict_in_clean_process(model_path: Path, paths: list[Path], folder: Path) -> dict:
    """What the Space does: only the model file, in a folder of its own, run from that folder
    with -I (no cwd, no env paths) and freshnet unimportable; the printed result."""
    folder.mkdir(parents=True)
    shutil.copy(model_path, folder / "model.pkl")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", CLEAN_PROCESS_PREDICT, "model.pkl", *map(str, paths)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
