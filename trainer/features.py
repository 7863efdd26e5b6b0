"""The model's input, built one way for training and for serving.

:class:`trainer.dataset.WindowDataset` (logged impressions, a million at a time) and
:class:`trainer.serving.ranker.Ranker` (one request's candidates) describe what they know
column-wise and call the same functions, so an impression scored online gets the tensors
it got in training (``tests/test_features.py`` pins this):

1. :func:`target_features`: the target items' hashed ids and profiles, (N,) each, and
   their click histories (:func:`id_rates`), (N, 2); :func:`taste_features`: how often the
   user clicked items of each target's category, brand, shop and price bucket, (N, 4);
2. :func:`sequence_features`: whose sequence it is (the user's hashed id, (S,), and click
   history, (S, 2)) and the behaviour sequences left-padded to ``max_seq_len``, (S, L)
   each: S = N in training, S = 1 in serving (one user and sequence shared by every
   candidate);
3. :func:`usable_vectors`: which cached item vectors the model may read; any other is
   row 0, for which the model has a learned "missing" vector;
4. :func:`model_batch`: tensors in the model's batch contract (``trainer.model``'s module
   docstring), the modal table cut to the rows the batch uses.

The vocabularies live here too: the tasks (label columns and the model's heads) and the
codes of a sequence's actions, both from ``ppm.events.INTERACTIONS`` (impressions coded
after them), and a model's
:class:`IdVocabulary` of items and of users, the ids it admits and their click counts
(and one of (user, profile value) pairs, :func:`taste_keys`).

Ids are hashed with BLAKE2b (:func:`hash_ids`): stable across processes and runs, so a
model trained today and an item first seen tomorrow agree on buckets. Item and user ids go
through one more rule, :func:`id_buckets`: an id the model's vocabulary does not admit
(seen in fewer than ``trainer.min_item_count`` / ``min_user_count`` impressions of its
training data) is "unknown", bucket 0, in training, evaluation and serving alike, so a new
item's or user's score never depends on an untrained row or on the row of another id it
collides with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from itertools import repeat
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ppm.events import INTERACTIONS, Action
from ppm.records import ItemState, UserSequence

if TYPE_CHECKING:
    from trainer.model import RankerConfig

TASKS: tuple[str, ...] = tuple(a.value for a in INTERACTIONS)
"""The label columns of a window file, in order; the model's heads by default."""
ACTION_CODES: dict[str, int] = {action: code for code, action in enumerate(TASKS, start=1)}
"""An interaction -> its code in ``seq_action``; 0 is padding."""
N_ACTIONS = len(ACTION_CODES) + 1
"""Rows of the model's action embedding (padding included), one more where it reads
impressions (``RankerConfig.sequence_impressions``)."""
IMPRESSION_CODE = N_ACTIONS
SEQUENCE_CODES: dict[str, int] = {**ACTION_CODES, Action.IMPRESSION.value: IMPRESSION_CODE}
"""A sequence position's action (an interaction or an impression) -> its code."""

HASHED_PROFILE = ("category", "brand", "shop")
"""Profile fields hashed into ``RankerConfig.<field>_buckets`` rows."""
PROFILE_FIELDS = (*HASHED_PROFILE, "price_bucket")
"""The target item's profile: ``ItemState`` fields, window columns ``item_<field>`` and
batch keys of the same names."""

TASTE_FIELDS = PROFILE_FIELDS
"""The profile fields whose value, for the target item, a model with
``RankerConfig.taste_rates`` reads the user's click rate on (:func:`taste_features`)."""

BATCH_KEYS = ("item_id", *PROFILE_FIELDS, "item_rates", "taste_rates", "user_id", "user_rates",
              "seq_item_id", "seq_action", "seq_gap", "seq_mask", "modal_table",
              "target_modal_row", "seq_modal_row")
"""Every key of a batch but the optional ``labels`` and ``label_mask``."""

GAP_MIN_S = 60.0  # bucket 1: less than a minute ago
GAP_MAX_S = 30 * 86_400.0  # last bucket: 30 days ago or more


def hash_ids(values: Sequence[str | None] | np.ndarray | pa.Array, buckets: int
             ) -> np.ndarray:
    """Stable int64 buckets in ``[1, buckets)`` for string ids; None and "" map to 0.

    Hashes each distinct value once, so a column of a million rows with a few thousand
    distinct ids costs a few thousand hashes (and a recent id's hash is remembered).
    """
    if _short(values):  # a serving request's ids: their hashes are cached (_bucket_of)
        return np.fromiter(map(_bucket_of, values, repeat(buckets)), np.int64, len(values))
    arr = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values,
                                                                                pa.string())
    encoded = pc.dictionary_encode(arr).combine_chunks() if isinstance(
        arr, pa.ChunkedArray) else pc.dictionary_encode(arr)
    uniques = encoded.dictionary.to_pylist()
    codes = np.fromiter(map(_bucket_of, uniques, repeat(buckets)), np.int64, len(uniques))
    index = encoded.indices.to_numpy(zero_copy_only=False)
    out = np.zeros(len(arr), dtype=np.int64)
    valid = ~np.asarray(pc.is_null(encoded.indices))
    out[valid] = codes[index[valid].astype(np.int64)]
    return out


_SHORT = 4096
"""Up to this many ids, a list or tuple of str and None is hashed id by id: building Arrow
arrays to deduplicate them would cost more than the cached hashes (a request's few hundred
ids). Anything else (pandas columns with NaN, bytes, subclasses of str such as numpy's
``str_``, ...) goes through Arrow's conversion."""


def _short(values: Sequence[str | None] | np.ndarray | pa.Array) -> bool:
    return (isinstance(values, list | tuple) and len(values) <= _SHORT
            and set(map(type, values)) <= _PLAIN)  # no Python loop: a request's ids pass


_PLAIN = {str, type(None)}


@lru_cache(maxsize=1 << 20)
def _bucket_of(value: str | None, buckets: int) -> int:
    # Cached: a serving request hashes the same few hundred ids (and their categories,
    # brands, shops) as the requests before it, and a cache hit costs a tenth of a hash.
    if not value:  # None and "": unknown
        return 0
    digest = hashlib.blake2b(value.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (buckets - 1) + 1


@dataclass(frozen=True, repr=False)
class IdVocabulary:
    """The ids of one kind (items, users) a model admits, and how often each was shown and
    clicked in the impressions of its training data (as the target item; as the user).

    An id shown fewer than ``min_count`` times is "unknown" (bucket 0) wherever the model
    reads it (:func:`id_buckets`). The click counts give every id a smoothed click rate
    (:func:`id_rates`), a feature of models with ``RankerConfig.id_rates``.

    A model carries one per kind (``UnifiedRanker.item_vocabulary``, ``.user_vocabulary``,
    saved in its checkpoint), so serving and ``ppm eval`` apply the rule training applied;
    a model with ``RankerConfig.taste_rates`` one more, ``.taste_vocabulary``, whose "ids"
    are (user, profile value) pairs (:func:`taste_keys`), all admitted.
    Fine-tuning adds the new windows' counts (:meth:`plus`) and keeps ``min_count``.
    """

    counts: Mapping[str, int]
    """Impressions per id, over the windows the model trained on."""
    min_count: int = 1
    """Fewer impressions than this: unknown. 1 admits every id of the training data."""
    clicks: Mapping[str, int] = field(default_factory=dict)
    """Clicks per id over the same impressions (absent: none)."""

    def __post_init__(self):
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")

    def __repr__(self) -> str:
        return (f"IdVocabulary({len(self.counts)} ids, {len(self.admitted)} admitted, "
                f"min_count={self.min_count})")

    @classmethod
    def of(cls, item_ids: Iterable[str | None], min_count: int = 1,
           clicked: Iterable[bool] | None = None) -> IdVocabulary:
        """Counted from ids (one per impression; None and "" are not counted) and, when
        given, whether each impression was clicked."""
        return cls({}, min_count).plus(item_ids, clicked)

    def plus(self, item_ids: Iterable[str | None],
             clicked: Iterable[bool] | None = None) -> IdVocabulary:
        """These counts and one more impression per id in ``item_ids`` (a click more where
        ``clicked``, aligned with ``item_ids``, is true)."""
        arr = item_ids if isinstance(item_ids, pa.Array | pa.ChunkedArray) else pa.array(
            list(item_ids), pa.string())
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        known = pc.fill_null(pc.not_equal(arr, ""), False)
        counts, clicks = dict(self.counts), dict(self.clicks)
        for row in pc.value_counts(arr.filter(known)).to_pylist():
            counts[row["values"]] = counts.get(row["values"], 0) + row["counts"]
        if clicked is not None:
            hit = pa.array(np.asarray(list(clicked) if not isinstance(clicked, np.ndarray)
                                      else clicked, bool))
            for row in pc.value_counts(arr.filter(pc.and_(known, hit))).to_pylist():
                clicks[row["values"]] = clicks.get(row["values"], 0) + row["counts"]
        return IdVocabulary(counts, self.min_count, clicks)

    @cached_property
    def admitted(self) -> frozenset[str]:
        """The admitted ids."""
        return frozenset(i for i, n in self.counts.items() if n >= self.min_count)

    @cached_property
    def prior(self) -> float:
        """The click rate over every counted impression, kept inside (0.001, 0.999) so its
        logit is finite; 0.5 with nothing counted."""
        shows = sum(self.counts.values())
        rate = sum(self.clicks.values()) / shows if shows else 0.5
        return min(max(rate, 1e-3), 1 - 1e-3)

    def admits(self, item_ids: Sequence[str | None] | pa.Array) -> np.ndarray:
        """(N,) bool: which of ``item_ids`` are admitted."""
        if isinstance(item_ids, pa.Array | pa.ChunkedArray):
            item_ids = item_ids.to_pylist()
        # A set lookup per id: serving asks about a few hundred ids per request, and
        # Arrow's is_in would build a hash table of the whole vocabulary on every call.
        return np.fromiter(map(self.admitted.__contains__, item_ids), bool, len(item_ids))

    def totals(self, ids: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """(impressions, clicks) of each of ``ids``, float64 (N,) each; 0 for an id never
        counted."""
        return (np.fromiter(map(self.counts.get, ids, repeat(0)), np.float64, len(ids)),
                np.fromiter(map(self.clicks.get, ids, repeat(0)), np.float64, len(ids)))

    def to_dict(self) -> dict:
        """Plain values for a checkpoint (:func:`trainer.model.save_checkpoint`)."""
        ids = list(self.counts)
        return {"min_count": self.min_count, "ids": ids,
                "counts": torch.tensor([self.counts[i] for i in ids], dtype=torch.int64),
                "clicks": torch.tensor([self.clicks.get(i, 0) for i in ids], dtype=torch.int64)}

    @classmethod
    def from_dict(cls, d: Mapping) -> IdVocabulary:
        ids = d["ids"]
        clicks = d.get("clicks")  # absent in checkpoints from before click counts
        return cls(dict(zip(ids, (int(n) for n in d["counts"]), strict=True)),
                   int(d["min_count"]),
                   {} if clicks is None else {i: int(n) for i, n in
                                              zip(ids, clicks, strict=True) if n})


RATE_PRIOR_STRENGTH = 10.0
"""Pseudo-impressions of the prior that smooths an id's click rate (:func:`id_rates`)."""


def id_rates(shows: np.ndarray, clicks: np.ndarray, prior: float) -> np.ndarray:
    """What a model with ``RankerConfig.id_rates`` reads of an id's history, (N, 2) float32:
    the logit of its click rate smoothed towards ``prior`` by :data:`RATE_PRIOR_STRENGTH`
    pseudo-impressions, minus the prior's logit, and ``log1p(shows)``. An id never shown
    reads (0, 0), which is also what the model reads of an item whose id it drops.

    ``shows`` and ``clicks`` (N,) are counts over the model's training data that come
    *before* the impression: all of them when scoring later impressions (serving,
    evaluation: :meth:`IdVocabulary.totals`); for a training impression only those of
    the windows before its own (:func:`counts_before` of the window starts;
    ``trainer.dataset.WindowDataset``), so its own label never reaches its input.
    """
    shows, clicks = np.asarray(shows, np.float64), np.asarray(clicks, np.float64)
    rate = (clicks + RATE_PRIOR_STRENGTH * prior) / (shows + RATE_PRIOR_STRENGTH)
    rate = np.clip(rate, 1e-6, 1 - 1e-6)
    lift = np.log(rate) - np.log1p(-rate) - (np.log(prior) - np.log1p(-prior))
    return np.stack([lift, np.log1p(shows)], axis=1).astype(np.float32).reshape(-1, 2)


def counts_before(ids: Sequence[str | None], times_us: np.ndarray, clicked: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """For each of N impressions, the impressions and clicks of the same id among these N
    that happened strictly earlier (impressions at the same time, such as the candidates of
    one request, or given the same time, such as their window's start, do not see each
    other), float64 (N,) each. None and "" count nothing."""
    n = len(ids)
    codes = pc.dictionary_encode(pa.array(ids, pa.string())).indices.to_numpy(
        zero_copy_only=False)
    codes = np.where(np.isnan(codes.astype(np.float64)), -1, codes).astype(np.int64)
    times = np.asarray(times_us, np.int64)
    order = np.lexsort((times, codes))  # by id, then time
    c, t = codes[order], times[order]
    y = np.asarray(clicked, np.float64)[order]
    idx = np.arange(n)
    new_id = np.r_[True, c[1:] != c[:-1]] if n else np.zeros(0, bool)
    new_time = new_id | np.r_[True, t[1:] != t[:-1]] if n else np.zeros(0, bool)
    id_start = np.maximum.accumulate(np.where(new_id, idx, 0))
    time_start = np.maximum.accumulate(np.where(new_time, idx, 0))
    cum = np.r_[0.0, np.cumsum(y)]
    shows, hits = np.zeros(n), np.zeros(n)
    shows[order] = time_start - id_start
    hits[order] = cum[time_start] - cum[id_start]
    unknown = np.array([not i for i in ids], bool) if n else np.zeros(0, bool)
    shows[unknown], hits[unknown] = 0.0, 0.0
    return shows, hits


def id_buckets(ids: Sequence[str | None], buckets: int,
               vocabulary: IdVocabulary | None) -> np.ndarray:
    """:func:`hash_ids` of item or user ids, 0 (unknown) for an id ``vocabulary`` does not
    admit (None: every id is admitted, as for a model that has no vocabulary)."""
    arr = ids if _short(ids) else pa.array(ids, pa.string())  # at most once, for both
    out = hash_ids(arr, buckets)
    if vocabulary is not None:
        out[~vocabulary.admits(arr)] = 0
    return out


def gap_bucket(seconds: np.ndarray, n_buckets: int) -> np.ndarray:
    """Recency buckets of ``seconds`` (impression time - interaction time; any array-like of
    numbers), int64 in ``[1, n_buckets)``, same shape as ``seconds``.

    Bucket 1 is "< 1 min", bucket ``n_buckets - 1`` is ">= 30 days", and the buckets between
    are log-spaced. Non-decreasing in ``seconds``. Negative gaps (clock skew) land in
    bucket 1, NaN in the last bucket. 0 is never returned: it is the padding bucket.
    """
    if n_buckets < 2:
        raise ValueError("n_buckets must be >= 2 (0 is padding)")
    s = np.asarray(seconds, dtype=np.float64)
    edges = np.geomspace(GAP_MIN_S, GAP_MAX_S, n_buckets - 2)  # (n_buckets - 2,)
    return (np.searchsorted(edges, s, side="right") + 1).astype(np.int64)


# -----------------------------------------------------------------------------
# What the data layer knows, column-wise


@dataclass(frozen=True)
class Targets:
    """N target items and their profiles; None where the data layer does not know them."""

    item_id: Sequence[str | None]
    category: Sequence[str | None]
    brand: Sequence[str | None]
    shop: Sequence[str | None]
    price_bucket: np.ndarray
    """(N,) int64; 0 = unknown."""

    @classmethod
    def from_states(cls, item_ids: Sequence[str], states: Sequence[ItemState | None]
                    ) -> Targets:
        """Candidates and their stored states (None: the store does not know the item)."""
        return cls(list(item_ids),
                   *([getattr(s, f) if s else None for s in states] for f in HASHED_PROFILE),
                   np.array([s.price_bucket if s else 0 for s in states], np.int64))

    @classmethod
    def from_window(cls, table: pa.Table) -> Targets:
        """The impressions of a window table (columns ``item_id`` and ``item_<field>``)."""
        col = table.column
        return cls(col("item_id").to_pylist(),
                   *(col(f"item_{f}").to_pylist() for f in HASHED_PROFILE),
                   col("item_price_bucket").fill_null(0).to_numpy().astype(np.int64))


@dataclass(frozen=True)
class Sequences:
    """S users' behaviour sequences flattened as Arrow lists are: sequence ``s`` (of user
    ``user_ids[s]``) is positions ``offsets[s]:offsets[s + 1]`` of the flat columns, oldest
    first."""

    user_ids: Sequence[str | None]
    """(S,) whose sequence each is."""
    offsets: np.ndarray
    """(S + 1,) int64, starting at 0."""
    item_ids: Sequence[str]
    actions: Sequence[str]
    times_us: np.ndarray
    """int64, microseconds since the epoch (UTC)."""

    @classmethod
    def of(cls, sequences: Sequence[UserSequence]) -> Sequences:
        lengths = [len(s.item_ids) for s in sequences]
        return cls([s.user_id for s in sequences],
                   np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
                   [i for s in sequences for i in s.item_ids],
                   [a for s in sequences for a in s.actions],
                   np.array([t for s in sequences for t in s.times_us], np.int64))

    @classmethod
    def from_window(cls, table: pa.Table) -> Sequences:
        """The sequences of a window table (columns ``user_id``, ``seq_item_ids``,
        ``seq_actions``, ``seq_times_us``)."""
        col = table.column
        offsets = col("seq_item_ids").combine_chunks().offsets.to_numpy().astype(np.int64)
        return cls(col("user_id").to_pylist(), offsets - offsets[0],
                   pc.list_flatten(col("seq_item_ids")).to_pylist(),
                   pc.list_flatten(col("seq_actions")).to_pylist(),
                   pc.list_flatten(col("seq_times_us")).to_numpy().astype(np.int64))


# -----------------------------------------------------------------------------
# The rules


def usable_vectors(embedded: Sequence[bool] | np.ndarray,
                   encoder_versions: Sequence[str | None],
                   content_time_us: Sequence[float] | np.ndarray,
                   at_us: int | np.ndarray,
                   model_version: str | None,
                   freshness_window_s: float | None,
                   deleted: Sequence[bool] | np.ndarray | None = None) -> np.ndarray:
    """Which of N items' cached vectors the model may read, (N,) bool; it reads row 0, its
    learned "missing" vector, for the others.

    A vector is usable when the item has one (``embedded``; the caller says as of when:
    the dataset counts only vectors computed from content no later than the impression),
    the item is not ``deleted``, the vector comes from encoder ``model_version`` (None: any
    version, but a vector of no version is never usable) and, when ``freshness_window_s``
    is set, the item event it was computed from (``content_time_us``, NaN = unknown, never
    too old) is at most that many seconds old at ``at_us`` (a scalar or (N,)).

    ``feature_repo.online_features.OnlineFeatures.judge`` words the same rule for the
    store's readers (``ppm features``); ``tests/test_features.py`` pins that they agree.
    """
    usable = np.asarray(embedded, dtype=bool).copy()
    usable &= np.array([v is not None and (model_version is None or v == model_version)
                        for v in encoder_versions], dtype=bool).reshape(usable.shape)
    if deleted is not None:
        usable &= ~np.asarray(deleted, dtype=bool)
    if freshness_window_s is not None:
        age_s = (np.asarray(at_us) - np.asarray(content_time_us, np.float64)) / 1e6
        usable &= ~(age_s > freshness_window_s)  # NaN (unknown) compares False: kept
    return usable


def target_features(targets: Targets, config: RankerConfig,
                    vocabulary: IdVocabulary | None = None,
                    counts: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> dict[str, np.ndarray]:
    """``item_id`` (:func:`id_buckets` with the model's ``vocabulary``), ``category``,
    ``brand``, ``shop`` (hashed; 0 = unknown) and ``price_bucket`` (clipped to the model's
    buckets), int64 (N,) each, and ``item_rates`` (N, 2) (:func:`id_rates` of the items'
    ``counts``, default the vocabulary's totals; zeros for an id the vocabulary does not
    admit, and for a model without ``config.id_rates`` or vocabulary)."""
    out = {"item_id": id_buckets(targets.item_id, config.item_buckets, vocabulary)}
    for field_ in HASHED_PROFILE:
        out[field_] = hash_ids(getattr(targets, field_), getattr(config, f"{field_}_buckets"))
    out["price_bucket"] = np.clip(np.asarray(targets.price_bucket, np.int64), 0,
                                  config.price_buckets - 1)
    out["item_rates"] = _rates(targets.item_id, config, vocabulary, counts)
    return out


def _rates(ids: Sequence[str | None], config: RankerConfig, vocabulary: IdVocabulary | None,
           counts: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    if not config.id_rates or vocabulary is None:
        return np.zeros((len(ids), 2), np.float32)
    rates = id_rates(*(counts if counts is not None else vocabulary.totals(ids)),
                     vocabulary.prior)
    rates[~vocabulary.admits(ids)] = 0.0  # an unknown id has no history either
    return rates


def taste_keys(user_ids: Sequence[str | None], targets: Targets) -> list[str | None]:
    """The (user, field, value) pairs of N impressions, one per field of
    :data:`TASTE_FIELDS` and impression, field by field: (len(TASTE_FIELDS) * N,) keys of
    a model's ``taste_vocabulary`` (``UnifiedRanker``). None where the user or the value
    is unknown (None, "", price bucket 0): such a pair is never counted."""
    keys: list[str | None] = []
    for field_ in TASTE_FIELDS:
        values = getattr(targets, field_)
        if field_ == "price_bucket":
            values = [str(v) if v else None for v in np.asarray(values).tolist()]
        # \x1f (unit separator): no id or profile value of the data layer holds it.
        keys += [f"{u}\x1f{field_}\x1f{v}" if u and v else None
                 for u, v in zip(user_ids, values, strict=True)]
    return keys


def taste_features(user_ids: Sequence[str | None], targets: Targets, config: RankerConfig,
                   vocabulary: IdVocabulary | None,
                   counts: tuple[np.ndarray, np.ndarray] | None = None,
                   user_vocabulary: IdVocabulary | None = None) -> dict[str, np.ndarray]:
    """``taste_rates`` (N, 4) float32: for each of N impressions (user ``user_ids[n]`` (N,),
    target ``targets``), the user's smoothed click-rate lift (:func:`id_rates`' first
    column) on items of the target's category, brand, shop and price bucket
    (:data:`TASTE_FIELDS`), counted in the model's training data by its taste
    ``vocabulary`` (``counts``: the pairs' (impressions, clicks), (4 N,) each, in the order
    of :func:`taste_keys`; default the vocabulary's totals). What a sequence of positive
    actions cannot say: how often this user passes over this kind of item. Zeros for a
    pair never counted, for a user the model's ``user_vocabulary`` does not admit (as
    its own click rate, :func:`sequence_features`), and for a model without
    ``config.taste_rates`` or vocabulary."""
    n = len(targets.item_id)
    if not config.taste_rates or vocabulary is None:
        return {"taste_rates": np.zeros((n, len(TASTE_FIELDS)), np.float32)}
    shows, clicks = counts if counts is not None else vocabulary.totals(
        taste_keys(user_ids, targets))
    lift = id_rates(shows, clicks, vocabulary.prior)[:, 0]  # (4 N,), field by field
    rates = np.ascontiguousarray(lift.reshape(len(TASTE_FIELDS), n).T)  # (N, 4)
    if user_vocabulary is not None:
        rates[~user_vocabulary.admits(user_ids)] = 0.0  # an unknown user has no history
    return {"taste_rates": rates}


def sequence_features(sequences: Sequences, impression_us: np.ndarray,
                      vector_rows: np.ndarray, config: RankerConfig,
                      vocabulary: IdVocabulary | None = None,
                      user_vocabulary: IdVocabulary | None = None,
                      user_counts: tuple[np.ndarray, np.ndarray] | None = None
                      ) -> dict[str, np.ndarray]:
    """S users and their sequences as the model reads them: ``user_id`` (S,) int64
    (:func:`id_buckets` with the model's ``user_vocabulary``; all 0 for a model without
    user ids, ``config.user_buckets`` 0), ``user_rates`` (S, 2) (as ``item_rates`` in
    :func:`target_features`, of ``user_counts``), and (S, L) each with
    L = ``config.max_seq_len``:

    LEFT-padded: the most recent interaction is in the last slot. A sequence keeps its last
    ``config.sequence_impressions`` impressions and its last L minus that many
    interactions (``UserSequence.kept``, the rule the online store keeps them by), so a
    model that reads no impressions reads none of a sequence that holds some.
    ``seq_item_id`` (:func:`id_buckets` with the model's ``vocabulary``: 0 for an id it
    does not admit), ``seq_action`` (:data:`SEQUENCE_CODES`),
    ``seq_gap`` (:func:`gap_bucket` of ``impression_us[s]`` (S,) minus the interaction's
    time), ``seq_modal_row`` (``vector_rows``: the flat positions' rows in the caller's
    vector table, 0 = none) are int64 and 0 at padding; ``seq_mask`` is True at real
    positions (interactions and impressions).
    """
    L = config.max_seq_len
    actions = sequences.actions
    codes = np.fromiter((SEQUENCE_CODES.get(a, 0) for a in actions), np.int64, len(actions))
    readable = _kept(np.asarray(sequences.offsets, np.int64), codes == IMPRESSION_CODE,
                     L - config.sequence_impressions, config.sequence_impressions)
    # The readable positions, as sequences of their own: offsets into ``positions``.
    positions = np.flatnonzero(readable)
    offsets = np.concatenate([[0], np.cumsum(readable)])[np.asarray(sequences.offsets)]
    S = len(offsets) - 1
    keep = np.diff(offsets)  # (S,) positions kept per sequence, at most L
    # Each kept position: its sequence, its index in the flat columns, its slot in (S, L).
    seq_of = np.repeat(np.arange(S), keep)
    pos_in_kept = np.arange(keep.sum()) - np.repeat(np.cumsum(keep) - keep, keep)
    flat = positions[np.repeat(offsets[1:] - keep, keep) + pos_in_kept]
    slot = np.repeat(L - keep, keep) + pos_in_kept
    flat_values = {
        "seq_item_id": id_buckets(sequences.item_ids, config.item_buckets, vocabulary),
        "seq_action": codes,
        "seq_modal_row": np.asarray(vector_rows, np.int64),
    }
    out = {"user_id": id_buckets(sequences.user_ids, config.user_buckets, user_vocabulary)
           if config.user_buckets else np.zeros(S, np.int64),
           "user_rates": _rates(sequences.user_ids, config, user_vocabulary, user_counts)}
    for key, values in flat_values.items():
        out[key] = np.zeros((S, L), np.int64)
        out[key][seq_of, slot] = values[flat]
    gaps_s = (np.asarray(impression_us, np.int64)[seq_of] - sequences.times_us[flat]) / 1e6
    out["seq_gap"] = np.zeros((S, L), np.int64)
    out["seq_gap"][seq_of, slot] = gap_bucket(gaps_s, config.gap_buckets)
    # A real interaction, even one whose item id is unknown (0) to the model.
    out["seq_mask"] = np.zeros((S, L), bool)
    out["seq_mask"][seq_of, slot] = True
    return out


def _kept(offsets: np.ndarray, shown: np.ndarray, interactions: int, impressions: int
          ) -> np.ndarray:
    """(P,) bool: which of the flat positions of sequences ``offsets`` (S + 1,) are among
    their sequence's last ``interactions`` interactions or last ``impressions``
    impressions (``shown`` (P,) True at an impression): ``UserSequence.kept`` for many."""
    end = np.repeat(offsets[1:], np.diff(offsets))  # (P,) where each one's sequence ends
    position = np.arange(len(shown))
    out = np.empty(len(shown), bool)
    for kind, cap in ((shown, impressions), (~shown, interactions)):
        count = np.concatenate([[0], np.cumsum(kind)])  # this kind at or after a position
        later = count[end] - count[position]  # (P,): itself included
        out[kind] = later[kind] <= cap
    return out


def model_batch(features: Mapping[str, np.ndarray], vectors: np.ndarray
                ) -> dict[str, torch.Tensor]:
    """Tensors in the model's contract from :func:`target_features`,
    :func:`sequence_features` and ``target_modal_row`` (B,), whose modal rows index
    ``vectors`` (row 0: missing). Other keys (``labels``, ``label_mask``) pass through.

    The batch's ``modal_table`` holds row 0 and then only the rows used, in order of first
    use (targets, then sequence positions): small, and the same for two callers that hold
    the same vectors in differently ordered tables.
    """
    target, seq = features["target_modal_row"], features["seq_modal_row"]
    rows = np.concatenate([[0], target, seq.ravel()]).astype(np.int64)
    used, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    by_first_use = np.argsort(first, kind="stable")  # row 0 (at index 0) stays first
    local = np.empty(len(used), np.int64)
    local[by_first_use] = np.arange(len(used))
    local = local[inverse.ravel()]  # rows renumbered into the batch's table
    rows_used = used[by_first_use]
    # A table already in first-use order and all used (serving builds it so) is not copied.
    compact = len(rows_used) == len(vectors) and bool(
        (rows_used == np.arange(len(vectors))).all())
    arrays = {**features,
              "modal_table": vectors if compact else vectors[rows_used],
              "target_modal_row": local[1 : 1 + len(target)],
              "seq_modal_row": local[1 + len(target):].reshape(seq.shape)}
    order = [*(k for k in BATCH_KEYS if k in arrays), *(k for k in arrays if k not in BATCH_KEYS)]
    return {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in order}
