"""Item events -> modal feature vectors: concat(text part, image part), PPM's frozen input.

A new item is embedded the moment it arrives: its text (title, category, brand, description)
by the text encoder and its photo by the image encoder. Each part is L2-normalised, so the
two modalities weigh the same whatever the image size; an item with no usable photo gets a
zero image part and a recorded reason, never an exception, so the stream goes on.

Unchanged items are never encoded twice: :meth:`ItemEncoder.content_hash` digests exactly
what the vector depends on, and :meth:`ItemEncoder.encode` skips an item whose hash matches
the one in the caller's ``seen`` mapping.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from encoders.finetune_report import fine_tuning_of
from encoders.image_encoder import ImageEncoder
from encoders.image_source import ImageLoadError, load_image
from encoders.text_encoder import TextEncoder
from ppm.config import Config, EncoderConfig, ImageFetchConfig
from ppm.events import ItemEvent, ItemOp

NO_IMAGE = "no image"
"""The ``image_errors`` reason for an item that has no image reference."""

# Part of encoder_version: bump it whenever item_text() changes, since every vector changes.
TEXT_FORMAT_VERSION = 1

# Image fetches wait on the network, not the CPU, so a few run side by side.
_FETCH_THREADS = 8


def item_text(item: ItemEvent) -> str:
    """The one text the text encoder sees for an item.

    ``"<title>. Category: <category>. Brand: <brand>. <description>"``, leaving out the
    brand and description sentences when those fields are absent or blank, e.g.
    ``"Acme black leather coat. Category: coats. Brand: Acme."``. The description comes
    last because truncation (``text_max_length`` tokens) cuts from the end.
    """
    parts = [f"{item.title}.", f"Category: {item.category}."]
    if item.brand:
        parts.append(f"Brand: {item.brand}.")
    if item.description and item.description.strip():
        parts.append(item.description.strip())
    return " ".join(parts)


@dataclass(frozen=True)
class ItemEmbeddings:
    """The result of one :meth:`ItemEncoder.encode` call.

    Row ``i`` of ``vectors`` belongs to ``item_ids[i]`` and ``content_hashes[i]``.
    """

    item_ids: list[str]
    vectors: np.ndarray
    """(N, text_dim + image_dim) in the configured dtype: text part first, then image part."""
    content_hashes: list[str]
    encoder_version: str
    skipped: list[str] = field(default_factory=list)
    """Item ids left out because ``seen`` already held their content hash."""
    image_errors: dict[str, str] = field(default_factory=dict)
    """item_id -> reason, for rows whose image part is zero (no image, or it failed to load)."""


def content_hash(encoder_version: str, item: ItemEvent) -> str:
    """sha256 (hex) of exactly what the item's vector depends on.

    That is the encoder version, the item text (:func:`item_text`) and the image reference
    as given (for a data URL, its bytes; for a path or URL, the string, so a photo replaced
    behind an unchanged URL is not noticed). Price, shop and event time do not count. The
    item id does not either: identical items share a hash.
    """
    payload = json.dumps([encoder_version, item_text(item), item.image])
    return hashlib.sha256(payload.encode()).hexdigest()


class ItemEncoder:
    """Turns upsert :class:`~ppm.events.ItemEvent` batches into modal feature vectors.

    Args:
        config: models, sizes, batch size, output dtype and threads.
        images: limits for reading image references (default: ``ImageFetchConfig()``).
        local_files: whether an item's ``image`` may be a local path or ``file://`` URL. True
            (the default) suits a trusted source: the local runner, ``ppm import``. The Faust
            worker passes ``images.local_files_from_kafka`` (off by default), since anyone who
            can produce to the items topic chooses those references.

    Both models are loaded, frozen and warmed up here, at construction (after torch and
    transformers are imported, which takes longer), so a bad model path fails at start-up
    and the first batch is not slow. The constructor also calls
    ``torch.set_num_threads(config.threads or os.cpu_count())``: that setting is process-wide,
    so build one ItemEncoder per process, or several with the same ``threads``. An instance is
    not safe for concurrent ``encode`` calls.

    Example:
        >>> enc = ItemEncoder(EncoderConfig())
        >>> coat = ItemEvent(item_id="42", event_time="2026-01-01T00:00:00Z",
        ...                  title="Acme black leather coat", category="coats")
        >>> seen = {}
        >>> out = enc.encode([coat], seen)
        >>> out.vectors.shape, out.vectors.dtype, out.image_errors
        ((1, 1664), dtype('float32'), {'42': 'no image'})
        >>> enc.encode([coat], seen).skipped
        ['42']
    """

    def __init__(self, config: EncoderConfig, images: ImageFetchConfig | None = None, *,
                 local_files: bool = True):
        self.config = config
        self.images = images or ImageFetchConfig()
        self.local_files = local_files
        torch.set_num_threads(config.threads or os.cpu_count() or 1)
        # The image encoder first: a ResNet without weights fails before the slower text load.
        self.image = ImageEncoder(
            config.image_model, config.image_weights, config.image_size, config.batch_size
        )
        self.text = TextEncoder(config.text_model, config.text_max_length, config.batch_size)
        self.encoder_version = self._version()

    @classmethod
    def from_config(cls, cfg: Config, *, local_files: bool = True) -> ItemEncoder:
        """The encoder for ``cfg.encoders``, reading images within ``cfg.images``;
        ``local_files`` as in the constructor."""
        return cls(cfg.encoders, cfg.images, local_files=local_files)

    @property
    def text_dim(self) -> int:
        """Length of the text part, the first columns of a vector (384 by default)."""
        return self.text.dim

    @property
    def image_dim(self) -> int:
        """Length of the image part, the last columns of a vector (1280 by default)."""
        return self.image.dim

    @property
    def dim(self) -> int:
        """Length of one item vector: ``text_dim + image_dim`` (384 + 1280 by default)."""
        return self.text_dim + self.image_dim

    def _settings(self) -> dict[str, Any]:
        # Everything that changes the numbers, nothing that changes them only by float
        # rounding (batch size, threads). Plain values, so equal settings give the same
        # JSON in any process, on any run.
        return {
            "text": self.text.identity,
            "text_max_length": self.config.text_max_length,
            "text_format": TEXT_FORMAT_VERSION,
            "text_pooling": "masked-mean,l2",
            "image": self.image.identity,
            "image_size": self.config.image_size,
            "image_preprocess": "rgb-on-white,fit-centre-bilinear",
            "image_pooling": "global-avg,l2",
            "dtype": self.config.dtype,
        }

    def _version(self) -> str:
        digest = hashlib.sha256(json.dumps(self._settings(), sort_keys=True).encode()).hexdigest()
        return f"enc-{digest[:12]}"

    @property
    def provenance(self) -> dict[str, Any]:
        """How this encoder's vectors are made, as the item log records it per version
        (:meth:`feature_repo.item_log.ItemLog.record_version`): ``encoder_version``, the
        settings it hashes, and ``text_fine_tuning``, what ``ppm finetune text`` reported
        on the text model (:func:`encoders.finetune_report.fine_tuning_of`; None for a
        model it did not write), whose periods say which clicks the vectors learned from."""
        return {"encoder_version": self.encoder_version, "settings": self._settings(),
                "text_fine_tuning": fine_tuning_of(self.config.text_model)}

    def content_hash(self, item: ItemEvent) -> str:
        """sha256 (hex) of exactly what the item's vector depends on: see
        :func:`content_hash`."""
        return content_hash(self.encoder_version, item)

    def encode(
        self, items: Sequence[ItemEvent], seen: MutableMapping[str, str] | None = None
    ) -> ItemEmbeddings:
        """Embed the upserts in ``items``, skipping those ``seen`` says are unchanged.

        ``seen`` maps item_id -> content hash of its last stored vector. An item whose hash
        matches is skipped; others are encoded and ``seen`` is updated, except for items whose
        image failed to load (a re-sent event then retries the fetch). Rows follow the order in
        which ids first occur; when an id occurs more than once its last event wins. Items with
        identical content are computed once.

        Raises ValueError for a delete event: those carry no content to embed.
        """
        latest: dict[str, ItemEvent] = {}
        for item in items:
            if item.op is not ItemOp.UPSERT:
                raise ValueError(f"cannot encode a {item.op.value} event (item {item.item_id})")
            latest[item.item_id] = item  # keeps the id's first position, takes its last event

        seen_before = {} if seen is None else seen
        hashes = {item_id: self.content_hash(item) for item_id, item in latest.items()}
        skipped = [i for i in latest if seen_before.get(i) == hashes[i]]
        todo = [i for i in latest if seen_before.get(i) != hashes[i]]
        unique: dict[str, ItemEvent] = {}  # content hash -> one item with that content
        for i in todo:
            unique.setdefault(hashes[i], latest[i])

        text_part = self.text.encode([item_text(item) for item in unique.values()])
        image_part, reasons = self._image_part(list(unique.values()))
        vectors = np.concatenate([text_part, image_part], axis=1)  # (U, dim), U <= len(todo)
        row_of = {h: row for row, h in enumerate(unique)}
        rows = [row_of[hashes[i]] for i in todo]
        image_errors = {
            i: reasons[row] for i, row in zip(todo, rows, strict=True) if row in reasons
        }
        if seen is not None:
            seen.update({i: hashes[i] for i in todo if image_errors.get(i, NO_IMAGE) == NO_IMAGE})
        return ItemEmbeddings(
            item_ids=todo,
            vectors=vectors[rows].astype(self.config.dtype),
            content_hashes=[hashes[i] for i in todo],
            encoder_version=self.encoder_version,
            skipped=skipped,
            image_errors=image_errors,
        )

    def _image_part(self, items: list[ItemEvent]) -> tuple[np.ndarray, dict[int, str]]:
        """L2-normalised image features, float32 ``(len(items), image_dim)``, with zero rows
        where there is no usable image; and row -> reason for those rows."""
        with ThreadPoolExecutor(max_workers=_FETCH_THREADS) as pool:
            loaded = list(pool.map(self._load, items))
        reasons = {row: result for row, result in enumerate(loaded) if isinstance(result, str)}
        ok = [row for row in range(len(items)) if row not in reasons]
        part = np.zeros((len(items), self.image_dim), dtype=np.float32)
        if ok:
            features = self.image.encode([loaded[row] for row in ok])
            norms = np.linalg.norm(features, axis=1, keepdims=True)
            part[ok] = features / np.maximum(norms, 1e-12)
        return part, reasons

    def _load(self, item: ItemEvent) -> Image.Image | str:
        """The decoded image, or the reason there is none."""
        if not item.image:
            return NO_IMAGE
        try:
            return load_image(item.image, self.images, local_files=self.local_files)
        except ImageLoadError as exc:
            return exc.reason
