"""Frozen pretrained encoders that embed a new item the moment it arrives (PPM's modal input).

* :class:`ItemEncoder` — item events -> concat(text part, image part) vectors, with
  content-hash skipping and an ``encoder_version``; what the stream calls.
* :class:`TextEncoder` — texts -> L2-normalised mean-pooled BERT vectors (all-MiniLM-L6-v2).
* :class:`ImageEncoder` — pictures -> pooled CNN features (EfficientNet-Lite0 or a ResNet).
* :func:`load_image` / :class:`ImageLoadError` — image references (path, URL, data URL) ->
  decoded pictures, within limits.

Names are imported on first use: ``import encoders`` or ``from encoders.image_source import
load_image`` does not import torch (a slow import); touching an encoder class does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from encoders.image_encoder import ImageEncoder
    from encoders.image_source import ImageLoadError, load_image
    from encoders.item_encoder import ItemEmbeddings, ItemEncoder, item_text
    from encoders.text_encoder import TextEncoder

_MODULE_OF = {
    "ImageEncoder": "encoders.image_encoder",
    "ImageLoadError": "encoders.image_source",
    "load_image": "encoders.image_source",
    "ItemEmbeddings": "encoders.item_encoder",
    "ItemEncoder": "encoders.item_encoder",
    "item_text": "encoders.item_encoder",
    "TextEncoder": "encoders.text_encoder",
}

__all__ = [
    "ImageEncoder",
    "ImageLoadError",
    "ItemEmbeddings",
    "ItemEncoder",
    "TextEncoder",
    "item_text",
    "load_image",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'encoders' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
