"""Training data: the pipeline's parquet windows as model-ready tensors.

Which windows are closed, over every writer's folder, is :mod:`trainer.windows`.
:class:`WindowDataset` reads closed training windows with Arrow and turns every column into a
NumPy array once (no per-row pandas), then cuts batches in the model's contract
(``trainer.model``). Item vectors come from the offline item log, joined by
``(item_id, encoder_version)``:

* the target item gets its vector only when the sample says the item was embedded at the
  impression (``item_encoder_version`` is set, equal to the current version) and that
  vector is within the freshness window at the impression; otherwise row 0, which the model
  replaces by its learned "missing" vector;
* sequence items get the current vector of the same encoder version, or row 0.

The frozen encoders are never run here: only their cached outputs are read.

ID hashing (:func:`hash_ids`) is stable across processes and runs (BLAKE2b), so a model
trained today and an item first seen tomorrow agree on buckets, and an id never seen before
still lands in a bucket.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch

from trainer.model import RankerConfig, gap_bucket
from trainer.windows import Window, closed_windows, files_of, window_files, window_sources

__all__ = ["TASKS", "ModalTable", "Window", "WindowDataset", "closed_windows", "files_of",
           "hash_ids", "window_files", "window_sources"]

TASKS = ("click", "order", "collect")
ACTION_CODES = {"click": 1, "order": 2, "collect": 3}
SAMPLE_COLUMNS = [
    "sample_id", "user_id", "item_id", "request_id", "impression_time", "click", "order",
    "collect", "seq_item_ids", "seq_actions", "seq_times_us", "item_encoder_version",
    "item_category", "item_brand", "item_shop", "item_price_bucket", "item_age_s",
    "item_clicks_before",
]


def hash_ids(values: Sequence[str | None] | np.ndarray, buckets: int) -> np.ndarray:
    """Stable int64 buckets in ``[1, buckets)`` for string ids; None and "" map to 0.

    Hashes each distinct value once, so a column of a million rows with a few thousand
    distinct ids costs a few thousand hashes.
    """
    arr = pa.array(values, pa.string())
    encoded = pc.dictionary_encode(arr).combine_chunks() if isinstance(
        arr, pa.ChunkedArray) else pc.dictionary_encode(arr)
    uniques = encoded.dictionary.to_pylist()
    codes = np.array(
        [int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little")
         % (buckets - 1) + 1 if u else 0 for u in uniques],
        dtype=np.int64,
    )
    index = encoded.indices.to_numpy(zero_copy_only=False)
    out = np.zeros(len(arr), dtype=np.int64)
    valid = ~np.asarray(pc.is_null(encoded.indices))
    out[valid] = codes[index[valid].astype(np.int64)]
    return out


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

    def rows(self, item_ids: Sequence[str | None]) -> np.ndarray:
        """Rows of ``item_ids`` (0 where unknown), int64."""
        get = self.row_of.get
        return np.fromiter((get(i, 0) if i else 0 for i in item_ids), np.int64, len(item_ids))


class WindowDataset:
    """Samples of some windows as arrays, batched into the model's contract.

    Args:
        windows: closed windows (their files in order), or window parquet files.
        modal: cached item vectors (see :class:`ModalTable`).
        config: the model config (hash bucket sizes, sequence length, gap buckets).
        freshness_window_s: a target vector older than this at the impression is "missing"
            (None: no age limit).
        tasks: tasks whose labels count; None: those with at least one positive in these
            files (a task never observed, e.g. orders in a ratings data set, is treated as
            absent, not as all-negative).
    """

    def __init__(self, windows: Sequence[Window | Path], modal: ModalTable, config: RankerConfig,
                 freshness_window_s: float | None = None,
                 tasks: Sequence[str] | None = None):
        self.modal = modal
        self.config = config
        files = files_of(windows)
        table = (ds.dataset([str(f) for f in files], format="parquet").to_table(
            columns=SAMPLE_COLUMNS) if files else None)
        self.n = 0 if table is None else table.num_rows
        if not self.n:
            self.tasks = tuple(tasks or ())
            return
        c = config
        col = table.column
        self.user_id = np.asarray(col("user_id").to_pylist(), dtype=object)
        self.request_id = np.asarray(col("request_id").to_pylist(), dtype=object)
        self.item_ids = col("item_id").to_pylist()
        self.impression_us = col("impression_time").cast(pa.int64()).to_numpy()
        self.item_age_s = col("item_age_s").to_numpy(zero_copy_only=False).astype(np.float64)
        self.item_clicks_before = col("item_clicks_before").to_numpy().astype(np.int64)
        self.labels = np.stack([col(t).to_numpy().astype(np.float32) for t in TASKS], axis=1)
        present = self.labels.max(axis=0) > 0
        self.tasks = tuple(tasks) if tasks is not None else tuple(
            t for t, p in zip(TASKS, present, strict=True) if p)
        self.label_mask = np.broadcast_to(
            np.array([t in self.tasks for t in TASKS]), self.labels.shape).copy()

        self.item_hash = hash_ids(self.item_ids, c.item_buckets)
        self.category = hash_ids(col("item_category").to_pylist(), c.category_buckets)
        self.brand = hash_ids(col("item_brand").to_pylist(), c.brand_buckets)
        self.shop = hash_ids(col("item_shop").to_pylist(), c.shop_buckets)
        price = col("item_price_bucket").fill_null(0).to_numpy().astype(np.int64)
        self.price = np.clip(price, 0, c.price_buckets - 1)

        # Target vector: only if embedded (this version) at the impression and still fresh.
        rows = modal.rows(self.item_ids)
        versions = np.asarray(col("item_encoder_version").to_pylist(), dtype=object)
        age_at_impression = (self.impression_us - modal.content_time_us[rows]) / 1e6
        usable = ((versions == modal.encoder_version) & (rows > 0)
                  & (age_at_impression >= 0))
        if freshness_window_s is not None:
            usable &= age_at_impression <= freshness_window_s
        self.target_row = np.where(usable, rows, 0)

        # Sequences: left-padded to L (the most recent interaction last).
        L = c.max_seq_len
        offsets = col("seq_item_ids").combine_chunks().offsets.to_numpy()
        flat_items = pc.list_flatten(col("seq_item_ids")).to_pylist()
        flat_actions = pc.list_flatten(col("seq_actions")).to_pylist()
        flat_times = pc.list_flatten(col("seq_times_us")).to_numpy()
        lengths = np.diff(offsets)
        keep = np.minimum(lengths, L)
        # Index of each kept element in the flat arrays and its slot in the (n, L) matrix.
        rows_idx = np.repeat(np.arange(self.n), keep)
        pos_in_kept = np.arange(keep.sum()) - np.repeat(np.cumsum(keep) - keep, keep)
        flat_idx = np.repeat(offsets[1:] - keep, keep) + pos_in_kept
        slot = np.repeat(L - keep, keep) + pos_in_kept
        flat_hash = hash_ids(flat_items, c.item_buckets)
        flat_modal = modal.rows(flat_items)
        flat_action = np.fromiter((ACTION_CODES.get(a, 0) for a in flat_actions), np.int64,
                                  len(flat_actions))
        gaps = (np.repeat(self.impression_us, lengths) - flat_times) / 1e6
        flat_gap = gap_bucket(gaps, c.gap_buckets)
        self.seq_item = np.zeros((self.n, L), np.int64)
        self.seq_action = np.zeros((self.n, L), np.int64)
        self.seq_gap = np.zeros((self.n, L), np.int64)
        self.seq_modal = np.zeros((self.n, L), np.int64)
        for target, source in ((self.seq_item, flat_hash), (self.seq_action, flat_action),
                               (self.seq_gap, flat_gap), (self.seq_modal, flat_modal)):
            target[rows_idx, slot] = source[flat_idx]
        self.seq_mask = self.seq_item > 0

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
        used, inverse = np.unique(
            np.concatenate([[0], self.target_row[idx], self.seq_modal[idx].ravel()]),
            return_inverse=True)
        # Row 0 stays 0 (missing) because 0 is the smallest row and always present.
        target_rows = inverse[1 : 1 + len(idx)]
        seq_rows = inverse[1 + len(idx):].reshape(len(idx), -1)
        t = torch.from_numpy
        return {
            "item_id": t(self.item_hash[idx]),
            "category": t(self.category[idx]),
            "brand": t(self.brand[idx]),
            "shop": t(self.shop[idx]),
            "price_bucket": t(self.price[idx]),
            "seq_item_id": t(self.seq_item[idx]),
            "seq_action": t(self.seq_action[idx]),
            "seq_gap": t(self.seq_gap[idx]),
            "seq_mask": t(self.seq_mask[idx]),
            "modal_table": t(self.modal.vectors[used]),
            "target_modal_row": t(target_rows.astype(np.int64)),
            "seq_modal_row": t(seq_rows.astype(np.int64)),
            "labels": t(self.labels[idx]),
            "label_mask": t(self.label_mask[idx]),
        }
