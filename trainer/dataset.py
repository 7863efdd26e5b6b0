"""Training data: the pipeline's parquet windows as model-ready tensors.

Which windows are closed, over every writer's folder, is :mod:`trainer.windows`.
:class:`WindowDataset` reads closed training windows with Arrow and builds every sample's
features once, with the functions serving uses too (:mod:`trainer.features`), then cuts
batches in the model's contract (``trainer.model``). Item vectors come from the offline
item log, joined by ``(item_id, encoder_version)``:

* the target item gets its vector only when the sample says the item was embedded at the
  impression (``item_encoder_version`` is set, equal to the current version) and that
  vector passes :func:`trainer.features.usable_vectors` at the impression; otherwise row 0,
  which the model replaces by its learned "missing" vector;
* sequence items get the current vector of the same encoder version, or row 0. (Serving
  judges them like targets; in a window the newest vector may postdate the impression.)

Item and user ids go through the model's :class:`trainer.features.IdVocabulary` of their
kind (an id it does not admit is "unknown", 0); :func:`id_vocabulary` counts one from
training windows.

The frozen encoders are never run here: only their cached outputs are read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch

from trainer.features import (
    PROFILE_FIELDS,
    TASKS,
    IdVocabulary,
    Sequences,
    Targets,
    model_batch,
    sequence_features,
    target_features,
    usable_vectors,
)
from trainer.model import RankerConfig
from trainer.windows import Window, closed_windows, files_of, window_files, window_sources

__all__ = ["ModalTable", "Window", "WindowDataset", "closed_windows", "files_of",
           "id_vocabulary", "window_files", "window_sources"]

SAMPLE_COLUMNS = [
    "sample_id", "user_id", "item_id", "request_id", "impression_time", *TASKS,
    "seq_item_ids", "seq_actions", "seq_times_us", "item_encoder_version",
    *(f"item_{f}" for f in PROFILE_FIELDS), "item_age_s", "item_clicks_before",
]


@dataclass(frozen=True)
class ModalTable:
    """Cached item vectors of one encoder version: ``vectors[row_of[item_id]]``.

    Row 0 of ``vectors`` is a zero placeholder for "missing".
    """

    encoder_version: str | None
    row_of: dict[str, int]
    vectors: np.ndarray
    """(len(row_of) + 1, dim) float32."""
    content_time_us: np.ndarray
    """(len(row_of) + 1,) int64: event time of the content each vector was computed from."""

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @classmethod
    def from_item_log(cls, folder: Path, encoder_version: str | None = None,
                      dim: int = 1664) -> ModalTable:
        """The newest vector per item of ``encoder_version`` (default: the version with the
        most recent write) from the offline item log under ``folder``."""
        # Imported here: feature_repo.item_log loads Feast (seconds), which readers of the window
        # listing (ppm status) do not need.
        from feature_repo.item_log import read_item_log

        log = read_item_log(folder)
        if log.num_rows == 0:
            return cls(encoder_version, {}, np.zeros((1, dim), np.float32), np.zeros(1, np.int64))
        if encoder_version is None:
            newest = pc.index(log["embedded_at"], pc.max(log["embedded_at"])).as_py()
            encoder_version = log["encoder_version"][newest].as_py()
        log = log.filter(pc.equal(log["encoder_version"], encoder_version))
        log = log.sort_by([("item_id", "ascending"), ("content_time", "descending")])
        ids = log["item_id"].to_pylist()
        keep = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
        log = log.take(keep)
        flat = pc.list_flatten(log["embedding"]).to_numpy().astype(np.float32)
        vectors = np.zeros((log.num_rows + 1, flat.size // max(log.num_rows, 1)), np.float32)
        vectors[1:] = flat.reshape(log.num_rows, -1)
        times = np.zeros(log.num_rows + 1, np.int64)
        times[1:] = log["content_time"].cast(pa.int64()).to_numpy()
        return cls(encoder_version,
                   {item_id: row + 1 for row, item_id in enumerate(log["item_id"].to_pylist())},
                   vectors, times)

    def shuffled(self, seed: int) -> ModalTable:
        """The shuffled-vector control: the same items, each with another item's vector (a
        permutation of rows 1.. seeded by ``seed``; row 0 stays "missing"). Which items have
        a vector, and since when, is unchanged, so a model trained and scored on this table
        sees content exactly as often, but content that says nothing about the item: what
        ``ppm`` gains over ``idrec`` here is not the content's doing."""
        order = np.r_[0, 1 + np.random.default_rng(seed).permutation(len(self.vectors) - 1)]
        return ModalTable(self.encoder_version, self.row_of, self.vectors[order],
                          self.content_time_us)

    def rows(self, item_ids: Sequence[str | None]) -> np.ndarray:
        """Rows of ``item_ids`` (0 where unknown), int64."""
        get = self.row_of.get
        return np.fromiter((get(i, 0) if i else 0 for i in item_ids), np.int64, len(item_ids))


def id_vocabulary(windows: Sequence[Window | Path], column: str, min_count: int,
                  base: IdVocabulary | None = None) -> IdVocabulary:
    """The vocabulary of ``column`` (``item_id``: the target items, ``user_id``: the users)
    of a model trained on ``windows``: each impression's id counted (reading only that
    column), added to ``base``'s counts when given (then ``base.min_count`` is kept and
    ``min_count`` ignored)."""
    files = files_of(windows)
    base = base or IdVocabulary({}, min_count)
    if not files:
        return base
    ids = ds.dataset([str(f) for f in files], format="parquet").to_table(
        columns=[column]).column(column)
    return base.plus(ids)


class WindowDataset:
    """Samples of some windows as arrays, batched into the model's contract.

    Args:
        windows: closed windows (their files in order), or window parquet files.
        modal: cached item vectors (see :class:`ModalTable`).
        config: the model config (tasks, hash bucket sizes, sequence length, gap buckets).
        freshness_window_s: a target vector older than this at the impression is "missing"
            (None: no age limit).
        tasks: tasks whose labels count; None: those with at least one positive in these
            files (a task never observed, e.g. orders in a ratings data set, is treated as
            absent, not as all-negative).
        vocabulary: the model's item vocabulary (``UnifiedRanker.item_vocabulary``): item
            ids it does not admit are unknown (0), targets and sequences alike. None: every
            id is hashed to its bucket.
        user_vocabulary: the same for user ids (``UnifiedRanker.user_vocabulary``).
    """

    def __init__(self, windows: Sequence[Window | Path], modal: ModalTable, config: RankerConfig,
                 freshness_window_s: float | None = None,
                 tasks: Sequence[str] | None = None, *,
                 vocabulary: IdVocabulary | None = None,
                 user_vocabulary: IdVocabulary | None = None):
        self.modal = modal
        self.config = config
        files = files_of(windows)
        table = (ds.dataset([str(f) for f in files], format="parquet").to_table(
            columns=SAMPLE_COLUMNS) if files else None)
        self.n = 0 if table is None else table.num_rows
        if not self.n:
            self.tasks = tuple(tasks or ())
            return
        col = table.column
        self.user_id = np.asarray(col("user_id").to_pylist(), dtype=object)
        self.request_id = np.asarray(col("request_id").to_pylist(), dtype=object)
        self.item_ids = col("item_id").to_pylist()
        self.impression_us = col("impression_time").cast(pa.int64()).to_numpy()
        self.item_age_s = col("item_age_s").to_numpy(zero_copy_only=False).astype(np.float64)
        self.item_clicks_before = col("item_clicks_before").to_numpy().astype(np.int64)
        # Labels in the order of the model's heads (config.tasks), (n, n_tasks).
        self.labels = np.stack([col(t).to_numpy().astype(np.float32) for t in config.tasks],
                               axis=1)
        present = self.labels.max(axis=0) > 0
        self.tasks = tuple(tasks) if tasks is not None else tuple(
            t for t, p in zip(config.tasks, present, strict=True) if p)
        self.label_mask = np.broadcast_to(
            np.array([t in self.tasks for t in config.tasks]), self.labels.shape).copy()

        # Target vector: the item log's newest of this version, if the item had it at the
        # impression (the log also holds vectors computed later) and it is usable then.
        rows = modal.rows(self.item_ids)
        content_time_us = modal.content_time_us[rows]
        target_row = np.where(usable_vectors(
            embedded=(rows > 0) & (content_time_us <= self.impression_us),
            encoder_versions=col("item_encoder_version").to_pylist(),
            content_time_us=content_time_us, at_us=self.impression_us,
            model_version=modal.encoder_version, freshness_window_s=freshness_window_s),
            rows, 0)
        sequences = Sequences.from_window(table)
        self.features: dict[str, np.ndarray] = {
            **target_features(Targets.from_window(table), config, vocabulary),
            "target_modal_row": target_row,
            **sequence_features(sequences, self.impression_us,
                                modal.rows(sequences.item_ids), config, vocabulary,
                                user_vocabulary),
        }
        """Every sample's features, by batch key: (n,) and (n, L); modal rows index
        ``modal.vectors``."""

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int, shuffle: bool = False,
                seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches in the model's contract; the modal table holds only the rows a batch uses."""
        order = (np.random.default_rng(seed).permutation(self.n) if shuffle
                 else np.arange(self.n))
        for start in range(0, self.n, batch_size):
            yield self.batch(order[start : start + batch_size])

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """The samples ``idx`` in the model's contract, with labels."""
        return model_batch({**{k: v[idx] for k, v in self.features.items()},
                            "labels": self.labels[idx], "label_mask": self.label_mask[idx]},
                           self.modal.vectors)
