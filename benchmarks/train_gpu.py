"""Training throughput (images/s) and GPU busy fraction on CUDA: the cached loader vs the file loader.

"ours" is ``train_model`` as configured by default on CUDA: images decoded once into the
memory-mapped pixel cache, augmentation (random resized crop, flips, lighting) as batch
transforms on the GPU, bf16/fp16 mixed precision, channels-last. "baseline" is the same call with
``train.loader = "files"`` (JPEG decode and resize in loader workers every epoch). Same images,
same recipe, same run. GPU utilisation is sampled with nvidia-smi every 0.2 s while each run
trains. Goals: ours >= 80% busy, ours/baseline >= 3 in images/s. The cache is built before the
timed runs (a one-time cost per image; printed). On a machine without CUDA it prints a message
and exits 0.

Run: ``.venv/bin/python benchmarks/train_gpu.py`` (no arguments, no network).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


class UtilSampler:
    """Samples GPU utilisation (%) with nvidia-smi in a background thread."""

    def __init__(self, period: float = 0.2):
        self.period = period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    [
                        "nvidia-smi",
                        "--query-gpu=utilization.gpu",
                        "--format=csv,noheader,nounits",
                        "-i",
                        "0",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout.strip()
                self.samples.append(float(out.splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.period)

    def __enter__(self) -> UtilSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def run(train, image_dir: Path, cfg, out: Path, cache_dir: Path) -> dict:
    from freshnet.model.train import train_model

    util = UtilSampler() if shutil.which("nvidia-smi") else None
    t0 = time.perf_counter()
    if util:
        with util:
            res = train_model(train, image_dir, cfg, out, cache_dir=cache_dir)
    else:
        res = train_model(train, image_dir, cfg, out, cache_dir=cache_dir)
    seconds = time.perf_counter() - t0
    images = res.train_size * (cfg.freeze_epochs + cfg.epochs)
    return {
        "seconds": seconds,
        "images_per_s": images / seconds,
        "gpu_util": util.mean if util else None,
        "valid_accuracy": res.valid_accuracy,
        "precision": res.precision,
        "train_size": res.train_size,
    }


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        print("train_gpu: no CUDA device on this machine; skipped (run it on a GPU worker).")
        return
    from train_overhead import demo_manifest

    from freshnet.config_sections import TrainConfig
    from freshnet.model.loaders import pixel_cache_size
    from freshnet.model.pixels import PixelCache

    logging.basicConfig(level=logging.WARNING)
    name = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        manifest = demo_manifest(tmp / "images", per_query=200)
        prep = time.perf_counter() - t0
        train = manifest[manifest["split"] == "train"]
        base_cfg = dict(device="cuda", image_size=224, batch_size=64, epochs=3, freeze_epochs=1)
        cache_dir = tmp / "pixels"
        # The cache's one-time cost (each image decoded once, ever): built here, outside the timing.
        cfg = TrainConfig(**base_cfg)
        _, built = PixelCache(cache_dir, pixel_cache_size(cfg), cfg.resize_method).update(
            train["sha256"], lambda s: tmp / "images" / f"{s}.jpg"
        )
        # Warm-up: CUDA context, cuDNN autotuning, page cache; each loader once.
        for loader in ("files", "cache"):
            warm = TrainConfig(**{**base_cfg, "epochs": 1, "freeze_epochs": 0, "loader": loader})
            run(train, tmp / "images", warm, tmp / "w.pkl", cache_dir)
        ours = run(train, tmp / "images", TrainConfig(**base_cfg), tmp / "ours.pkl", cache_dir)
        base = run(
            train,
            tmp / "images",
            TrainConfig(**base_cfg, loader="files"),
            tmp / "base.pkl",
            cache_dir,
        )

    def util(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0f}%"

    print(f"train_gpu on {name}: {ours['train_size']} demo images, efficientnet_lite0, 224px, bs 64, "
          f"1 frozen + 3 epochs, {ours['precision']}, channels-last (data prep {prep:.0f}s, "
          f"cache build {built.decoded} images in {built.seconds:.1f}s; neither timed)")  # fmt: skip
    print()
    print(f"{'':34}{'images/s':>10}{'GPU util':>10}{'seconds':>9}{'valid acc':>11}")
    for label, r in (
        ("cached loader, GPU augmentation", ours),
        ("file loader (decode per epoch)", base),
    ):
        print(
            f"{label:34}{r['images_per_s']:>10.0f}{util(r['gpu_util']):>10}"
            f"{r['seconds']:>9.1f}{r['valid_accuracy']:>11.3f}"
        )
    print()
    print(json.dumps({"benchmark": "train_images_per_s", "unit": "images/s",
                      "ours": round(ours["images_per_s"], 1), "baseline": round(base["images_per_s"], 1),
                      "goal": "ours/baseline >= 3"}))  # fmt: skip
    print(json.dumps({"benchmark": "train_gpu_util", "unit": "%",
                      "ours": None if ours["gpu_util"] is None else round(ours["gpu_util"], 1),
                      "baseline": None if base["gpu_util"] is None else round(base["gpu_util"], 1),
                      "goal": "ours >= 80"}))  # fmt: skip


if __name__ == "__main__":
    main()
