"""Training data: the pipeline's parquet windows as model-ready tensors.

Which windows are closed, over every writer's folder, is :mod:`trainer.windows`.
:class:`WindowDataset` reads closed training windows with Arrow and builds every sample's
features once, with the functions serving uses too (:mod:`trainer.features`), then cuts
batches in the model's contract (``trainer.model``). Item vectors come from the offline
item log (:class:`ModalTable`: every vector of an encoder version, each available from its
content's time) and are looked up *as of the impression*, for the target and for every
sequence item alike: the newest vector the item had then, never one computed later, and
only if :func:`trainer.features.usable_vectors` allows it then (the freshness window);
otherwise row 0, which the model replaces by its learned "missing" vector. The target's
also needs the sample's record that the stream had embedded the item at the impression
(``item_encoder_version``), unless a refresh policy's table says when vectors were
available (``as_recorded=False``).

Item and user ids go through the model's :class:`trainer.features.IdVocabulary` of their
kind (an id it does not admit is "unknown", 0); :class:`WindowCounts` counts them from
training windows (:func:`id_vocabulary`, and :func:`taste_vocabulary_of` the (user, profile
value) pairs).

The frozen encoders are never run here: only their cached outputs are read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch

from trainer.features import (
    PROFILE_FIELDS,
    TASKS,
    TASTE_FIELDS,
    IdVocabulary,
    Sequences,
    Targets,
    counts_before,
    model_batch,
    sequence_features,
    target_features,
    taste_features,
    taste_keys,
    usable_vectors,
)
from trainer.model import RankerConfig
from trainer.refresh import cached_reads
from trainer.windows import Window, closed_windows, files_of, window_files, window_sources

__all__ = ["ModalTable", "Window", "WindowCounts", "WindowDataset", "chunks", "closed_windows",
           "files_of", "id_vocabulary", "window_files", "window_sources"]

SAMPLE_COLUMNS = [
    "sample_id", "user_id", "item_id", "request_id", "impression_time", *TASKS,
    "seq_item_ids", "seq_actions", "seq_times_us", "item_encoder_version",
    *(f"item_{f}" for f in PROFILE_FIELDS), "item_age_s", "item_clicks_before", "window_start",
]


def chunks(indices: np.ndarray, size: int) -> list[np.ndarray]:
    """``indices`` cut into consecutive batches of ``size`` (the last may be shorter)."""
    return [indices[i : i + size] for i in range(0, len(indices), size)]


@dataclass(frozen=True)
class ModalTable:
    """Every cached vector of one encoder version, each with the time from which a reader
    could have it: an item has one row per content version it was embedded at. Rows are
    sorted by item, then by ``available_us``; row 0 is a zero placeholder for "missing".

    :meth:`rows_as_of` is the point-in-time lookup: the vector an item had at a moment,
    never one that became available later. Build one with :meth:`of` or
    :meth:`from_item_log`.
    """

    encoder_version: str | None
    item_ids: np.ndarray
    """(R + 1,) object: each row's item id; None at row 0."""
    vectors: np.ndarray
    """(R + 1, dim) float32."""
    content_time_us: np.ndarray
    """(R + 1,) int64: event time of the content each vector was computed from."""
    available_us: np.ndarray
    """(R + 1,) int64: from when a reader has the vector (event time): by default its
    content's time (embedded on arrival); a refresh policy makes it later."""

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @classmethod
    def of(cls, encoder_version: str | None, item_ids: Sequence[str], vectors: np.ndarray,
           content_time_us: Sequence[int] | np.ndarray,
           available_us: Sequence[int] | np.ndarray | None = None) -> ModalTable:
        """A table of R vectors (R, dim) of ``item_ids`` (R,), in any order; available from
        their content's time unless ``available_us`` (R,) says otherwise."""
        vectors = np.asarray(vectors, np.float32)
        vectors = vectors.reshape(len(item_ids), vectors.shape[-1])  # (R, dim)
        content = np.asarray(content_time_us, np.int64).reshape(-1)
        available = content if available_us is None else np.asarray(available_us, np.int64)
        ids = np.empty(len(item_ids), object)
        ids[:] = list(item_ids)
        order = np.lexsort((available, ids.astype(str))) if len(ids) else np.zeros(0, int)
        table = np.zeros((len(ids) + 1, vectors.shape[1]), np.float32)
        table[1:] = vectors[order]
        return cls(encoder_version, np.r_[np.array([None], object), ids[order]], table,
                   np.r_[0, content[order]].astype(np.int64),
                   np.r_[0, available[order]].astype(np.int64))

    @classmethod
    def empty(cls, dim: int, encoder_version: str | None = None) -> ModalTable:
        return cls.of(encoder_version, [], np.zeros((0, dim), np.float32), [])

    @classmethod
    def from_item_log(cls, folder: Path, encoder_version: str | None = None,
                      dim: int = 1664) -> ModalTable:
        """Every vector of ``encoder_version`` (default: the version with the most recent
        write) in the offline item log under ``folder``, one per item and content time (the
        latest write of it), available from its content's time."""
        # Imported here: feature_repo.item_log loads Feast (seconds), which readers of the window
        # listing (ppm status) do not need.
        from feature_repo.item_log import newest_version, read_item_log

        log = read_item_log(folder)
        if log.num_rows == 0:
            return cls.empty(dim, encoder_version)
        encoder_version = encoder_version or newest_version(log)
        versions = set(log["encoder_version"].to_pylist())
        if encoder_version not in versions:
            raise ValueError(f"the item log in {folder} holds no vector of encoder version "
                             f"{encoder_version!r}; it holds {sorted(versions)}")
        log = log.filter(pc.equal(log["encoder_version"], encoder_version))
        # One row per (item, content time): the latest write (a photo retried, say).
        log = log.sort_by([("item_id", "ascending"), ("content_time", "ascending"),
                           ("embedded_at", "descending")])
        ids = log["item_id"].to_pylist()
        times = log["content_time"].cast(pa.int64()).to_numpy()
        keep = [i for i in range(len(ids))
                if i == 0 or ids[i] != ids[i - 1] or times[i] != times[i - 1]]
        log = log.take(keep)
        flat = pc.list_flatten(log["embedding"]).to_numpy().astype(np.float32)
        return cls.of(encoder_version, log["item_id"].to_pylist(),
                      flat.reshape(log.num_rows, -1),
                      log["content_time"].cast(pa.int64()).to_numpy())

    def available_from(self, available_us: np.ndarray) -> ModalTable:
        """The same vectors available from other times, (R + 1,) (row 0's is ignored): a
        refresh policy's view of the table."""
        return ModalTable.of(self.encoder_version, list(self.item_ids[1:]), self.vectors[1:],
                             self.content_time_us[1:], np.asarray(available_us)[1:])

    def shuffled(self, seed: int) -> ModalTable:
        """The shuffled-vector control: the same items, each with another item's vector (a
        permutation of rows 1.. seeded by ``seed``; row 0 stays "missing"). Which items have
        a vector, and since when, is unchanged, so a model trained and scored on this table
        sees content exactly as often, but content that says nothing about the item: what
        ``ppm`` gains over ``idrec`` here is not the content's doing."""
        order = np.r_[0, 1 + np.random.default_rng(seed).permutation(len(self.vectors) - 1)]
        return replace(self, vectors=self.vectors[order])

    @cached_property
    def _index(self) -> dict[str, int]:
        """item id -> its code: the rank of its first row among the items."""
        index: dict[str, int] = {}
        for item_id in self.item_ids[1:]:
            index.setdefault(item_id, len(index))
        return index

    @cached_property
    def _row_codes(self) -> np.ndarray:
        """(R + 1,) int64: each row's item code (row 0: -1); non-decreasing."""
        index = self._index
        return np.r_[-1, np.fromiter((index[i] for i in self.item_ids[1:]), np.int64,
                                     len(self.item_ids) - 1)].astype(np.int64)

    def rows_as_of(self, item_ids: Sequence[str | None], at_us: int | np.ndarray
                   ) -> np.ndarray:
        """(N,) int64: for each of ``item_ids``, the row of its newest vector available at
        ``at_us`` (a scalar or (N,): ``available_us <= at_us``); 0 where it had none."""
        n = len(item_ids)
        get = self._index.get
        codes = np.fromiter((get(i, -1) if i else -1 for i in item_ids), np.int64, n)
        at = np.broadcast_to(np.asarray(at_us, np.int64), (n,))
        if not n or len(self.item_ids) == 1:
            return np.zeros(n, np.int64)
        # One sorted key for (item, time): times become ranks, so item * ranks + rank fits
        # int64 whatever the clock.
        times, inverse = np.unique(np.r_[self.available_us[1:], at], return_inverse=True)
        inverse = inverse.ravel()
        span = len(times) + 1
        table_key = self._row_codes[1:] * span + inverse[: len(self.item_ids) - 1]
        query_key = codes * span + inverse[len(self.item_ids) - 1:]
        pos = np.searchsorted(table_key, query_key, side="right") - 1  # last row <= query
        found = (codes >= 0) & (pos >= 0)
        found[found] &= self._row_codes[1:][pos[found]] == codes[found]
        return np.where(found, pos + 1, 0).astype(np.int64)


@dataclass(frozen=True)
class WindowCounts:
    """The impressions of some windows as a model counts them, read once: each target
    item's, each user's and each (user, profile value) pair's impressions and clicks
    (:meth:`ids`, :meth:`tastes`). One read serves all three kinds of a fine-tuning step."""

    table: pa.Table | None
    """The columns counted (:data:`COUNTED_COLUMNS`, or without the profile fields: see
    :meth:`read`); None: no windows."""

    @classmethod
    def read(cls, windows: Sequence[Window | Path], tastes: bool = True) -> WindowCounts:
        """``tastes``: also read the target's profile fields, which only :meth:`tastes`
        needs (False: it raises)."""
        files = files_of(windows)
        columns = COUNTED_COLUMNS if tastes else ID_COUNTED_COLUMNS
        return cls(ds.dataset([str(f) for f in files], format="parquet").to_table(
            columns=columns) if files else None)

    @cached_property
    def clicked(self) -> np.ndarray:
        return self.table.column("click").to_numpy(zero_copy_only=False) > 0

    def ids(self, column: str, min_count: int = 1, base: IdVocabulary | None = None
            ) -> IdVocabulary:
        """The vocabulary of ``column`` (``item_id``: the target items, ``user_id``: the
        users): each impression's id and click counted, added to ``base``'s counts when
        given (then ``base.min_count`` is kept and ``min_count`` ignored)."""
        base = base or IdVocabulary({}, min_count)
        if self.table is None:
            return base
        return base.plus(self.table.column(column), self.clicked)

    def tastes(self, base: IdVocabulary | None = None) -> IdVocabulary:
        """The taste vocabulary (``UnifiedRanker.taste_vocabulary``): each impression's
        (user, profile value) pairs (:func:`trainer.features.taste_keys`) and click counted,
        added to ``base``'s counts when given. Every pair is admitted (``min_count`` 1): a
        pair is never an embedding row, only a count."""
        base = base or IdVocabulary({}, 1)
        if self.table is None:
            return base
        if not set(COUNTED_COLUMNS) <= set(self.table.column_names):
            raise ValueError("these counts were read without the profile fields: "
                             "WindowCounts.read(windows, tastes=True)")
        keys = taste_keys(self.table.column("user_id").to_pylist(),
                          Targets.from_window(self.table))
        return base.plus(keys, np.tile(self.clicked, len(TASTE_FIELDS)))


ID_COUNTED_COLUMNS = ["user_id", "item_id", "click"]
"""The columns of a window :class:`WindowCounts` reads for item and user counts only."""
COUNTED_COLUMNS = [*ID_COUNTED_COLUMNS, *(f"item_{f}" for f in PROFILE_FIELDS)]
"""The columns of a window :class:`WindowCounts` reads (with ``tastes``)."""


def id_vocabulary(windows: Sequence[Window | Path], column: str, min_count: int,
                  base: IdVocabulary | None = None) -> IdVocabulary:
    """:meth:`WindowCounts.ids` of ``windows`` (the vocabulary of a model trained on them)."""
    return WindowCounts.read(windows, tastes=False).ids(column, min_count, base)


def taste_vocabulary_of(windows: Sequence[Window | Path], base: IdVocabulary | None = None
                        ) -> IdVocabulary:
    """:meth:`WindowCounts.tastes` of ``windows`` (the taste vocabulary of a model trained
    on them)."""
    return WindowCounts.read(windows).tastes(base)


def _usable_rows(modal: ModalTable, item_ids: Sequence[str | None], at_us: np.ndarray,
                 freshness_window_s: float | None,
                 recorded_versions: Sequence[str | None] | None = None,
                 read_us: np.ndarray | None = None) -> np.ndarray:
    """(N,) rows of ``modal`` the model reads for ``item_ids`` at ``at_us`` (N,): the
    vector available then (or at ``read_us``, when a cache read it earlier;
    :meth:`ModalTable.rows_as_of`) where :func:`trainer.features.usable_vectors` allows it
    at ``at_us``, else 0."""
    rows = modal.rows_as_of(item_ids, at_us if read_us is None else read_us)
    content_time_us = modal.content_time_us[rows]
    # A recorded version says the stream had a vector of the item then; read as "had one
    # of the model's version", so a version backfilled later (streams.backfill) stands in
    # for the one the stream had, as of the same content, and never where it had none.
    versions = ([None if v is None else modal.encoder_version for v in recorded_versions]
                if recorded_versions is not None else [modal.encoder_version] * len(rows))
    return np.where(usable_vectors(
        embedded=rows > 0, encoder_versions=versions, content_time_us=content_time_us,
        at_us=at_us, model_version=modal.encoder_version,
        freshness_window_s=freshness_window_s), rows, 0)


def _counts_in_training(ids: list, opened_us: np.ndarray, clicked: np.ndarray,
                        vocabulary: IdVocabulary | None, later: IdVocabulary | None
                        ) -> tuple[np.ndarray, np.ndarray] | None:
    """Per sample of training data the vocabulary counted: its id's impressions and clicks
    outside these samples and the ``later`` windows' counts, plus those of these samples
    in windows that opened before its own (``opened_us``, its window's start)."""
    if vocabulary is None:
        return None
    shows, hits = vocabulary.totals(ids)
    here_shows, here_hits = IdVocabulary.of(ids, clicked=clicked).totals(ids)
    if later is not None:
        later_shows, later_hits = later.totals(ids)
        shows, hits = shows - later_shows, hits - later_hits
    before_shows, before_hits = counts_before(ids, opened_us, clicked)
    shows = shows - here_shows + before_shows
    hits = hits - here_hits + before_hits
    if (shows < 0).any() or (hits < 0).any():
        raise ValueError("training=True, but the vocabulary did not count these windows")
    return shows, hits


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
        taste_vocabulary: the model's (user, profile value) counts
            (``UnifiedRanker.taste_vocabulary``), for ``RankerConfig.taste_rates``.
        training: these windows are among those the vocabularies counted (the model trains
            on them): each sample's click-rate features (``RankerConfig.id_rates``,
            ``taste_rates``) then count only the vocabularies' other impressions and those
            of these windows that opened before the sample's own window
            (:func:`trainer.features.counts_before` of the window starts): never its own
            label, nor those of its window, which a model serving that window would not
            have counted yet either. (Counted up to the impression itself, a user's rate
            carries the clicks of the same session; scored later from a finished model's
            counts it cannot, and the model learned to trust it too much: docs/results.md.)
            False: they count every impression of the vocabularies (data after training).
        counted_later: with ``training``, windows after these that the vocabularies also
            counted (the new windows of a fine-tuning step, for its replayed older ones):
            their impressions are not history for these samples either.
        as_recorded: a target's vector only where the sample records that the stream had
            embedded the item at the impression (what serving had). False: wherever
            ``modal`` makes one available by then, as a refresh policy's table
            (:meth:`ModalTable.available_from`) says.
        serving_cache_s: read the vectors (targets and sequences, once per request and
            item) as serving with an item cache of this lifetime would have had them
            (:func:`trainer.refresh.cached_reads`, ``features.serving_cache_s``); still
            judged fresh or not at the impression. 0: no cache. None (the default): as of
            each impression, and nothing counted.

    With ``serving_cache_s``, ``store_reads`` and ``requests`` count what serving these
    samples reads from the store (a read per request and item the cache did not hold) and
    for how many requests; otherwise both are None.
    """

    def __init__(self, windows: Sequence[Window | Path], modal: ModalTable, config: RankerConfig,
                 freshness_window_s: float | None = None,
                 tasks: Sequence[str] | None = None, *,
                 vocabulary: IdVocabulary | None = None,
                 user_vocabulary: IdVocabulary | None = None,
                 taste_vocabulary: IdVocabulary | None = None, training: bool = False,
                 as_recorded: bool = True, counted_later: Sequence[Window | Path] = (),
                 serving_cache_s: float | None = None):
        self.modal = modal
        self.projected = False
        """Whether :meth:`project_with` replaced the vectors by a frozen plug-in's outputs."""
        self.config = config
        self.vocabularies = (vocabulary, user_vocabulary, taste_vocabulary)
        """The item, user and taste vocabularies these samples were read with: a model
        scores them only if they are its own (``trainer.train.predict`` checks)."""
        files = files_of(windows)
        table = (ds.dataset([str(f) for f in files], format="parquet").to_table(
            columns=SAMPLE_COLUMNS) if files else None)
        self.n = 0 if table is None else table.num_rows
        self.store_reads: int | None = None
        self.requests: int | None = None
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

        # Vectors as of the impression: the target's and every sequence item's newest
        # vector available then (never one computed later), if usable then. The target's
        # only where the sample records that the stream had embedded the item then (with
        # ``as_recorded``): what serving had.
        sequences = Sequences.from_window(table)
        recorded = col("item_encoder_version").to_pylist() if as_recorded else None
        seq_at_us = np.repeat(self.impression_us, np.diff(sequences.offsets))
        target_read_us = seq_read_us = None
        if serving_cache_s is not None:
            target_read_us, seq_read_us = self._served_reads(sequences, seq_at_us,
                                                             serving_cache_s)
        target_row = _usable_rows(modal, self.item_ids, self.impression_us,
                                  freshness_window_s, recorded, target_read_us)
        seq_rows = _usable_rows(modal, sequences.item_ids, seq_at_us, freshness_window_s,
                                read_us=seq_read_us)
        targets = Targets.from_window(table)
        users = list(self.user_id)
        item_counts = user_counts = taste_counts = None
        if training and config.id_rates:
            clicked = col("click").to_numpy(zero_copy_only=False) > 0
            opened_us = col("window_start").cast(pa.int64()).to_numpy()
            count_tastes = bool(config.taste_rates and taste_vocabulary is not None)
            later = (WindowCounts.read(counted_later, tastes=count_tastes) if counted_later
                     else None)
            item_counts = _counts_in_training(
                self.item_ids, opened_us, clicked, vocabulary,
                later.ids("item_id") if later else None)
            user_counts = _counts_in_training(
                users, opened_us, clicked, user_vocabulary,
                later.ids("user_id") if later else None)
            if count_tastes:
                n_fields = len(TASTE_FIELDS)
                taste_counts = _counts_in_training(
                    taste_keys(users, targets), np.tile(opened_us, n_fields),
                    np.tile(clicked, n_fields), taste_vocabulary,
                    later.tastes() if later else None)
        self.features: dict[str, np.ndarray] = {
            **target_features(targets, config, vocabulary, item_counts),
            **taste_features(users, targets, config, taste_vocabulary, taste_counts,
                             user_vocabulary),
            "target_modal_row": target_row,
            **sequence_features(sequences, self.impression_us, seq_rows, config, vocabulary,
                                user_vocabulary, user_counts),
        }
        """Every sample's features, by batch key: (n,) and (n, L); modal rows index
        ``modal.vectors``."""

    def _served_reads(self, sequences: Sequences, seq_at_us: np.ndarray, cache_s: float
                      ) -> tuple[np.ndarray, np.ndarray]:
        """As of when serving read each target's and sequence item's vector, (n,) and
        (total sequence length,): one read per request and item (at the request's first
        impression), through a cache of ``cache_s`` seconds; counts ``store_reads``."""
        _, request = np.unique(self.request_id.astype(str), return_inverse=True)
        seq_request = np.repeat(request, np.diff(sequences.offsets))
        item_names, item = np.unique(np.asarray([*self.item_ids, *sequences.item_ids],
                                                dtype=str), return_inverse=True)
        request_of = np.concatenate([request, seq_request]).astype(np.int64)
        times = np.concatenate([self.impression_us, seq_at_us]).astype(np.int64)
        # One read per (request, item): integer keys, deduplicated by numpy, not Python.
        keys, index = np.unique(request_of * len(item_names) + item, return_inverse=True)
        read_at = np.full(len(keys), np.iinfo(np.int64).max)
        np.minimum.at(read_at, index, times)
        as_of, missed = cached_reads(keys % len(item_names), read_at, cache_s)
        self.store_reads = int(missed.sum())
        self.requests = int(request.max()) + 1
        read_us = as_of[index] if cache_s else times
        return read_us[:self.n], read_us[self.n:]

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int, shuffle: bool = False,
                seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches in the model's contract; the modal table holds only the rows a batch uses."""
        for idx in self.batch_indices(batch_size, shuffle, seed):
            yield self.batch(idx)

    def batch_indices(self, batch_size: int, shuffle: bool = False, seed: int = 0
                      ) -> list[np.ndarray]:
        """The samples of each of :meth:`batches`, in order (shuffled with ``seed``)."""
        order = (np.random.default_rng(seed).permutation(self.n) if shuffle
                 else np.arange(self.n))
        return chunks(order, batch_size)

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """The samples ``idx`` in the model's contract, with labels; for a model that reads
        no vectors (``idrec``) the modal table is row 0 alone and every modal row 0."""
        features = {**{k: v[idx] for k, v in self.features.items()},
                    "labels": self.labels[idx], "label_mask": self.label_mask[idx]}
        vectors = self.modal.vectors
        if not self.config.uses_modal:
            # Gathering rows nobody reads cost idrec's steps a copy of every batch's vectors.
            vectors = vectors[:1].copy()  # not a view: nothing may write the table's row 0
            for key in ("target_modal_row", "seq_modal_row"):
                features[key] = np.zeros_like(features[key])
        batch = model_batch(features, vectors)
        if self.projected:
            batch["modal_projected"] = batch.pop("modal_table")
        return batch

    def project_with(self, ppm_module) -> None:
        """Replace the vectors by ``ppm_module.project`` of them, once: for a model whose
        plug-in is frozen the projection never changes, so each step reads d_model floats
        per item instead of the raw vector (``PPMModule.forward``'s ``modal_projected``)."""
        with torch.no_grad():
            rows = ppm_module.project(torch.from_numpy(self.modal.vectors)).numpy()
        self.modal = replace(self.modal, vectors=rows.astype(np.float32))
        self.projected = True
