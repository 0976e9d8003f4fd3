"""Training data: the local image files, the seeded validation split, the fastai DataLoaders."""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freshnet.model.network import ARCHS, TrainError
from freshnet.model.pixels import CachedImages, PixelCache, PixelCacheError, stored_size
from freshnet.storage import NotFound

if TYPE_CHECKING:  # heavy imports stay inside functions: nothing happens at import time
    import pandas as pd
    import torch

    from freshnet.config_sections import TrainConfig
    from freshnet.storage import Storage

log = logging.getLogger(__name__)

PATH_COL = "path"
LABEL_COL = "label"
VALID_COL = "is_valid"


def image_path(image_dir: Path, sha: str) -> Path:
    return Path(image_dir) / f"{sha}.jpg"


def materialize(store: Storage, manifest: pd.DataFrame, cache_dir: Path) -> Path:
    """Fetch the manifest's images to ``<cache_dir>/<sha>.jpg``, skipping those already there."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fetched = 0
    for sha in manifest["sha256"].unique():
        dest = image_path(cache_dir, sha)
        if dest.exists():
            continue
        key = f"images/{sha[:2]}/{sha}.jpg"
        try:
            store.get_to_file(key, dest)
        except NotFound:
            raise TrainError(f"manifest image {sha} is missing from storage at {key!r}") from None
        fetched += 1
    log.info(
        "materialized %d images into %s (%d cached)", fetched, cache_dir, len(manifest) - fetched
    )
    return cache_dir


def valid_mask(manifest: pd.DataFrame, fraction: float, seed: int) -> list[bool]:
    """Seeded per-class choice of validation rows among the training rows (never the holdout)."""
    mask = [False] * len(manifest)
    labels = manifest[LABEL_COL].tolist()
    shas = manifest["sha256"].tolist()
    by_class: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(i)
    for rows in by_class.values():
        # Ordering by a keyed hash makes the choice stable when other rows come and go.
        rows.sort(key=lambda i: hashlib.sha256(f"{seed}:{shas[i]}".encode()).hexdigest())
        k = math.ceil(len(rows) * fraction) if len(rows) >= 2 else 0
        for i in rows[:k]:
            mask[i] = True
    return mask


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _num_workers(cfg: TrainConfig, device: torch.device) -> int:
    if cfg.num_workers is not None:
        return cfg.num_workers
    # On CPU the model competes with loader processes for the same cores; decoding in-process is faster.
    return 0 if device.type == "cpu" else min(8, cpu_count())


def frame_for(manifest: pd.DataFrame, image_dir: Path) -> pd.DataFrame:
    """A DataFrame with only plain columns (path string, label) that fastai's ColReader reads."""
    import pandas as pd

    missing = [c for c in ("sha256", LABEL_COL) if c not in manifest.columns]
    if missing:
        raise TrainError(f"manifest lacks column(s) {missing}; has {list(manifest.columns)}")
    paths = [str(image_path(image_dir, s)) for s in manifest["sha256"]]
    absent = [p for p in paths if not os.path.exists(p)]
    if absent:
        raise TrainError(
            f"{len(absent)} manifest image(s) missing under {image_dir}, e.g. {absent[0]}"
        )
    return pd.DataFrame({PATH_COL: paths, LABEL_COL: manifest[LABEL_COL].astype(str).tolist()})


def build_dls(df: pd.DataFrame, cfg: TrainConfig, device: torch.device, vocab: list[str]) -> Any:
    """fastai DataLoaders; ``df`` has path, label and is_valid columns."""
    from fastai.vision.all import (
        CategoryBlock,
        ColReader,
        ColSplitter,
        DataBlock,
        ImageBlock,
        Normalize,
        Resize,
        ResizeMethod,
        aug_transforms,
    )

    method = {"squish": ResizeMethod.Squish, "crop": ResizeMethod.Crop, "pad": ResizeMethod.Pad}
    mean, std = ARCHS[cfg.arch]["stats"]
    batch_tfms = []
    if cfg.augment:
        # The tutorial's improved recipe: random resized crops plus flips/rotation/lighting, on the batch.
        batch_tfms += aug_transforms(size=cfg.image_size, min_scale=cfg.min_scale)
    batch_tfms.append(Normalize.from_stats(list(mean), list(std)))
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock(vocab=vocab)),
        get_x=ColReader(PATH_COL),
        get_y=ColReader(LABEL_COL),
        splitter=ColSplitter(VALID_COL),
        item_tfms=Resize(cfg.image_size, method=method[cfg.resize_method]),
        batch_tfms=batch_tfms,
    )
    bs = max(1, min(cfg.batch_size, int((~df[VALID_COL]).sum())))
    return block.dataloaders(
        df,
        bs=bs,
        num_workers=_num_workers(cfg, device),
        device=device,
        pin_memory=device.type == "cuda",
    )


def pixel_cache_size(cfg: TrainConfig) -> int:
    """The side the pixel cache stores images at: larger than the training size only when random
    resized crops cut into it."""
    if cfg.augment and cfg.min_scale < 1:
        return stored_size(cfg.image_size, cfg.cache_margin)
    return cfg.image_size


def _cached_loader_cls() -> Any:
    """A fastai DataLoader that gathers whole batches of rows from the pixel cache at once."""
    import torch
    from fastai.data.load import DataLoader
    from fastai.torch_core import TensorCategory, TensorImage
    from fastcore.basics import chunked

    class CachedImageDL(DataLoader):
        def create_batches(self, samps: Any) -> Iterator[tuple[Any, Any]]:
            for idxs in chunked(samps, self.bs, self.drop_last):
                x, y = self.dataset.gather(idxs)
                # NHWC memory viewed as NCHW: the channels-last layout the model trains in.
                yield (
                    TensorImage(torch.from_numpy(x).permute(0, 3, 1, 2)),
                    TensorCategory(torch.from_numpy(y)),
                )

    return CachedImageDL


def build_cached_dls(
    manifest: pd.DataFrame,
    is_valid: list[bool],
    image_dir: Path,
    cache_root: Path,
    cfg: TrainConfig,
    device: torch.device,
    vocab: list[str],
) -> Any:
    """DataLoaders over the pixel cache (extended with tonight's new images first).

    Decoding and resizing happened once, when a row was added; the loader only gathers uint8
    rows, and every transform (random resized crop, flips, lighting, normalization) runs on the
    batch, on the training device.
    """
    import numpy as np
    from fastai.data.core import DataLoaders
    from fastai.vision.all import IntToFloatTensor, Normalize, Pipeline, aug_transforms

    missing = [c for c in ("sha256", LABEL_COL) if c not in manifest.columns]
    if missing:
        raise TrainError(f"manifest lacks column(s) {missing}; has {list(manifest.columns)}")
    cache = PixelCache(cache_root, pixel_cache_size(cfg), cfg.resize_method)
    try:
        rows, _ = cache.update(manifest["sha256"].tolist(), lambda sha: image_path(image_dir, sha))
    except PixelCacheError as exc:
        raise TrainError(str(exc)) from None
    pixels = cache.rows()
    index = {v: i for i, v in enumerate(vocab)}
    labels = np.array([index[v] for v in manifest[LABEL_COL].astype(str)], dtype=np.int64)
    valid = np.asarray(is_valid, dtype=bool)
    mean, std = ARCHS[cfg.arch]["stats"]
    batch_tfms = [IntToFloatTensor()]
    if cfg.augment:
        batch_tfms += aug_transforms(size=cfg.image_size, min_scale=cfg.min_scale)
    batch_tfms.append(Normalize.from_stats(list(mean), list(std)))
    dl_cls = _cached_loader_cls()
    n_train = int((~valid).sum())
    bs = max(1, min(cfg.batch_size, n_train))
    # Gathering rows is a memory copy: one worker process keeps ahead of a GPU, none on CPU.
    workers = cfg.num_workers if cfg.num_workers is not None else (0 if device.type == "cpu" else 2)
    common = dict(num_workers=workers, pin_memory=device.type == "cuda", device=device)
    train = dl_cls(
        CachedImages(pixels, rows[~valid], labels[~valid], vocab),
        bs=bs,
        shuffle=True,
        drop_last=n_train > bs,  # as fastai's own train loader: no tiny last batch
        # split_idx as fastai's Datasets set it: 0 draws augmentations, 1 is validation.
        after_batch=Pipeline(batch_tfms, split_idx=0),
        **common,
    )
    valid_dl = dl_cls(
        CachedImages(pixels, rows[valid], labels[valid], vocab),
        bs=bs,
        shuffle=False,
        after_batch=Pipeline(batch_tfms, split_idx=1),
        **common,
    )
    return DataLoaders(train, valid_dl, device=device)


def dataloaders(
    manifest_train: pd.DataFrame,
    df: pd.DataFrame,
    image_dir: Path,
    cache_dir: Path | None,
    cfg: TrainConfig,
    device: torch.device,
    vocab: list[str],
) -> Any:
    """fastai DataLoaders from the decoded-image cache (``train.loader = "cache"``) or the files."""
    if cfg.loader == "cache":
        root = Path(cache_dir) if cache_dir is not None else Path(image_dir).parent / "pixels"
        return build_cached_dls(
            manifest_train, df[VALID_COL].tolist(), image_dir, root, cfg, device, vocab
        )
    return build_dls(df, cfg, device, vocab)
