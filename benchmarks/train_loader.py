"""Training loader: the decoded-image cache vs the file loader, on the real flower photos.

1. Loader throughput at the training size (192 px), one core (one torch thread, no loader
   workers), over the same images in the same run: the work a loader does on the CPU to hand a
   batch to the device. The file loader decodes and resizes every JPEG every epoch; the cached
   loader gathers uint8 rows from the memory-mapped cache. The batch transforms (random resized
   crop, flips, lighting, normalization) run on the device in both and are shown apart, run on
   this CPU. Goal: cached / files >= 10 (``train_loader``).
2. The default recipe (EfficientNet-Lite0, 192 px, 1 frozen + 3 epochs) trained on the same
   flower snapshot with each loader, scored on the same holdout: accuracy difference
   cached - files >= -0.01 (``train_loader_accuracy_delta``).

Run: ``.venv/bin/python benchmarks/train_loader.py`` (no arguments, no network).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHOTOS = REPO.parent / "shared" / "data" / "photos" / "flowers"


def flower_manifest(image_dir: Path):
    """Every flower photo as ``<sha>.jpg``; 20% holdout by a hash of the sha."""
    import pandas as pd

    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for folder in sorted(p for p in PHOTOS.iterdir() if p.is_dir()):
        for src in sorted(folder.glob("*.jpg")):
            data = src.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            (image_dir / f"{sha}.jpg").write_bytes(data)
            h = int(hashlib.sha256(f"split:{sha}".encode()).hexdigest()[:8], 16)
            rows.append(
                {"sha256": sha, "label": folder.name, "split": "holdout" if h % 5 == 0 else "train"}
            )
    return pd.DataFrame(rows).drop_duplicates("sha256").reset_index(drop=True)


def loader_rate(dl, epochs: int) -> tuple[float, float]:
    """Images/s of the loader's own work (batch tfms removed) and with the batch tfms on CPU."""
    from fastai.vision.all import Pipeline

    tfms = dl.after_batch
    n = 0
    dl.after_batch = Pipeline([])
    t0 = time.perf_counter()
    for _ in range(epochs):
        for xb, _yb in dl:
            n += len(xb)
    bare = n / (time.perf_counter() - t0)
    dl.after_batch = tfms
    n = 0
    t0 = time.perf_counter()
    for xb, _yb in dl:
        n += len(xb)
    full = n / (time.perf_counter() - t0)
    return bare, full


def main() -> None:
    import torch

    from freshnet.config_sections import TrainConfig
    from freshnet.model.evaluate import evaluate_model
    from freshnet.model.loaders import (
        VALID_COL,
        build_cached_dls,
        build_dls,
        frame_for,
        pixel_cache_size,
    )
    from freshnet.model.pixels import PixelCache
    from freshnet.model.train import train_model

    logging.basicConfig(level=logging.WARNING)
    cores = len(os.sched_getaffinity(0))
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        manifest = flower_manifest(images)
        train = manifest[manifest["split"] == "train"].sort_values("sha256").reset_index(drop=True)
        holdout = manifest[manifest["split"] == "holdout"]
        cfg = TrainConfig(device="cpu", num_workers=0)
        vocab = sorted(train["label"].unique())

        # ---- 1. loader throughput, one core ----
        torch.set_num_threads(1)
        # The cache's one-time cost: every image decoded once (threads: all cores), then a night
        # bringing 5% new images.
        cache_root = tmp / "pixels"
        cache = PixelCache(cache_root, pixel_cache_size(cfg), cfg.resize_method)
        shas = train["sha256"].tolist()
        old, new = shas[: int(len(shas) * 0.95)], shas
        _, first = cache.update(old, lambda s: images / f"{s}.jpg")
        _, night = cache.update(new, lambda s: images / f"{s}.jpg")
        df = frame_for(train, images)
        df[VALID_COL] = False  # every image through the train loader (shuffled, augmented)
        mask = [False] * len(train)
        files_dl = build_dls(df, cfg, cpu, vocab).train
        cached_dl = build_cached_dls(train, mask, images, cache_root, cfg, cpu, vocab).train
        loader_rate(files_dl, 1)  # warm: page cache, allocator
        loader_rate(cached_dl, 1)
        # Interleaved, best of two: the machine is shared and noisy.
        files_runs, cached_runs = [], []
        for _ in range(2):
            files_runs.append(loader_rate(files_dl, 1))
            cached_runs.append(loader_rate(cached_dl, 5))
        files_bare, files_full = max(r[0] for r in files_runs), max(r[1] for r in files_runs)
        cached_bare, cached_full = max(r[0] for r in cached_runs), max(r[1] for r in cached_runs)

        # ---- 2. accuracy with each loader ----
        torch.set_num_threads(cores)
        results = {}
        for loader in ("files", "cache"):
            run_cfg = TrainConfig(device="cpu", loader=loader)
            t0 = time.perf_counter()
            res = train_model(
                train, images, run_cfg, tmp / loader / "model.pkl", cache_dir=tmp / "pixels2"
            )
            seconds = time.perf_counter() - t0
            ev = evaluate_model(res.model_path, loader, holdout, images)
            results[loader] = {"accuracy": ev.accuracy, "seconds": seconds, "n": ev.n}

    size = cfg.image_size
    print(f"train_loader: {len(train)} flower photos (train split), {size} px "
          f"(cache rows {pixel_cache_size(cfg)} px), bs {cfg.batch_size}, 1 torch thread, "
          f"no loader workers, {cores} cores on the machine")  # fmt: skip
    print()
    print(f"{'images/s on one core':34}{'loader':>10}{'+ batch tfms on CPU':>22}")
    print(f"{'files (decode + resize per epoch)':34}{files_bare:>10.0f}{files_full:>22.0f}")
    print(f"{'cached (memory-mapped rows)':34}{cached_bare:>10.0f}{cached_full:>22.0f}")
    print(f"{'ratio':34}{cached_bare / files_bare:>9.1f}x{cached_full / files_full:>21.1f}x")
    print()
    print(f"cache build: {first.decoded} images decoded in {first.seconds:.1f} s ({cores} threads); "
          f"next night: {night.decoded} new decoded, {night.reused} reused, {night.seconds:.2f} s")  # fmt: skip
    print()
    print(f"{'flowers, default recipe':34}{'holdout acc':>12}{'train s':>9}")
    for loader in ("files", "cache"):
        r = results[loader]
        print(f"{loader:34}{r['accuracy']:>12.4f}{r['seconds']:>9.0f}")
    delta = results["cache"]["accuracy"] - results["files"]["accuracy"]
    print(f"{'cached - files':34}{delta:>+12.4f}   ({results['cache']['n']} holdout images)")
    print()
    print(json.dumps({"benchmark": "train_loader", "unit": "images/s per core",
                      "ours": round(cached_bare, 1), "baseline": round(files_bare, 1),
                      "goal": "ours/baseline >= 10"}))  # fmt: skip
    print(json.dumps({"benchmark": "train_loader_accuracy_delta", "unit": "holdout accuracy",
                      "ours": round(results["cache"]["accuracy"], 4),
                      "baseline": round(results["files"]["accuracy"], 4),
                      "goal": "ours - baseline >= -0.01"}))  # fmt: skip


if __name__ == "__main__":
    main()
