"""The model's input: vocabularies, hashing, recency buckets, padding, the vector rule, and
one impression built by the training path and by the serving path into the same tensors."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from feature_repo.item_log import ItemLog
from feature_repo.online_features import ItemEmbeddingRow, OnlineFeatures, StoredItem
from ppm.config import ModelConfig
from ppm.data_dir import DataDir
from ppm.records import ItemState, UserSequence
from trainer.dataset import SAMPLE_COLUMNS, ModalTable, WindowDataset, taste_vocabulary_of
from trainer.features import (
    ACTION_CODES,
    BATCH_KEYS,
    N_ACTIONS,
    SEQUENCE_CODES,
    TASKS,
    IdVocabulary,
    Sequences,
    counts_before,
    gap_bucket,
    hash_ids,
    id_buckets,
    id_rates,
    model_batch,
    sequence_features,
    usable_vectors,
)
from trainer.model import RankerConfig, UnifiedRanker
from trainer.registry import Registry
from trainer.serving.ranker import Ranker

DAY = 86_400.0
S = 1_000_000  # µs per second


# -----------------------------------------------------------------------------
# Vocabularies, hashing, recency


def test_one_vocabulary_serves_labels_heads_actions_and_config():
    assert TASKS == ("click", "order", "collect")
    assert ACTION_CODES == {"click": 1, "order": 2, "collect": 3} and N_ACTIONS == 4
    assert RankerConfig().tasks == TASKS
    assert ModelConfig().tasks == TASKS  # the config's default is spelled out: pin it


def test_hash_ids_are_stable_and_keep_unknown_at_zero():
    assert (hash_ids(["a", None, "a", ""], 1024) == hash_ids(["a", None, "a", ""], 1024)).all()
    assert hash_ids(["a", None, ""], 1024)[1:].tolist() == [0, 0]
    got = hash_ids([f"id{i}" for i in range(500)], 7)
    assert got.dtype == np.int64 and got.min() >= 1 and got.max() <= 6


def test_hash_ids_agree_whichever_way_they_are_converted():
    """A short list of str is hashed id by id, anything else through Arrow: same buckets."""
    import pandas as pd

    ids = ["a", None, "", "b", "a", "é"]
    want = hash_ids(pa.array(ids, pa.string()), 64)
    assert want[[1, 2]].tolist() == [0, 0]
    for values in (ids, tuple(ids), np.array(ids, dtype=object), pd.Series(ids)):
        assert hash_ids(values, 64).tolist() == want.tolist(), type(values)
    # Missing values of a pandas column are unknown ids, as Arrow reads them.
    assert hash_ids(pd.Series(["a", np.nan]), 64).tolist() == [want[0], 0]
    many = [f"id{i}" for i in range(5000)]  # over the id-by-id limit
    assert hash_ids(many, 64).tolist() == hash_ids(many[:4000], 64).tolist() + hash_ids(
        many[4000:], 64).tolist()
    assert (id_buckets(ids, 64, None) == want).all()


def test_gap_bucket_edges():
    got = gap_bucket(np.array([-5.0, 0.0, 59.9, 60.0, 3600.0, 29.9 * DAY, 30 * DAY, 1e12]), 16)
    assert got.dtype == np.int64
    assert got[:3].tolist() == [1, 1, 1]  # under a minute (and clock skew)
    assert got[3] == 2
    assert got[5] == 14 and got[6] == 15 and got[7] == 15  # 30 days or more: the last bucket
    assert gap_bucket([float("nan")], 16).tolist() == [15]  # unknown time: "long ago"
    assert gap_bucket(np.zeros((2, 3)), 16).shape == (2, 3)
    assert gap_bucket(np.array([1.0, 1e9]), 2).tolist() == [1, 1]
    with pytest.raises(ValueError):
        gap_bucket(np.array([1.0]), 1)


@given(
    seconds=hnp.arrays(np.float64, st.integers(0, 50),
                       elements=st.floats(-1e3, 1e10, allow_nan=False)),
    n_buckets=st.integers(2, 64),
)
def test_gap_bucket_monotone_and_in_range(seconds, n_buckets):
    got = gap_bucket(seconds, n_buckets)
    assert got.shape == seconds.shape
    assert ((got >= 1) & (got <= n_buckets - 1)).all()
    order = np.argsort(seconds, kind="stable")
    assert (np.diff(got[order]) >= 0).all()


@given(ids=st.lists(st.one_of(st.none(), st.sampled_from(["", "a", "b", "c", "d"])),
                    max_size=30),
       min_count=st.integers(1, 4), extra=st.lists(st.sampled_from(["a", "b", "e"])))
def test_an_item_id_is_admitted_once_seen_min_count_times(ids, min_count, extra):
    vocabulary = IdVocabulary.of(ids, min_count)
    counted = ids + extra
    assert vocabulary.plus(extra) == IdVocabulary.of(counted, min_count)
    queries = ["a", "b", "c", "d", "e", "", None]
    got = vocabulary.plus(extra).admits(queries)
    assert got.tolist() == [bool(q) and counted.count(q) >= min_count for q in queries]
    # Admitted ids keep their bucket; any other is unknown, 0.
    buckets = id_buckets(queries, 64, vocabulary.plus(extra))
    assert (buckets == np.where(got, hash_ids(queries, 64), 0)).all()
    assert (id_buckets(queries, 64, None) == hash_ids(queries, 64)).all()
    assert IdVocabulary.from_dict(vocabulary.to_dict()) == vocabulary


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "", None]),
                               st.integers(0, 4), st.booleans()), max_size=30))
def test_counts_before_counts_strictly_earlier_impressions_of_the_same_id(rows):
    ids = [r[0] for r in rows]
    times = np.array([r[1] for r in rows], np.int64)
    clicked = np.array([r[2] for r in rows], bool)
    shows, hits = counts_before(ids, times, clicked)
    for n, (i, t, _) in enumerate(rows):  # brute force
        earlier = [m for m, r in enumerate(rows) if i and r[0] == i and r[1] < t]
        assert shows[n] == len(earlier)
        assert hits[n] == sum(clicked[m] for m in earlier)


def test_rates_read_zero_without_history_and_move_with_clicks():
    vocabulary = IdVocabulary.of(["a"] * 10 + ["b"] * 10, clicked=[True] * 8 + [False] * 12)
    assert vocabulary.prior == pytest.approx(0.4)
    lift, shows = id_rates(*vocabulary.totals(["a", "b", "new"]), vocabulary.prior).T
    assert lift[0] > 0 > lift[1] and lift[2] == 0
    assert shows.tolist() == pytest.approx([np.log1p(10), np.log1p(10), 0.0])
    assert IdVocabulary.from_dict(vocabulary.to_dict()) == vocabulary


# -----------------------------------------------------------------------------
# Padding and the modal table


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(0, 7), min_size=1, max_size=4), L=st.integers(1, 5),
       impressions=st.integers(0, 4), seed=st.integers(0, 1000))
def test_sequences_are_left_padded_to_their_last_L(lengths, L, impressions, seed):
    """And read by ``UserSequence.kept``'s rule: the last ``impressions`` impressions and
    the last L minus that many interactions (the store's rule, and serving's)."""
    impressions = min(impressions, L - 1)
    rng = np.random.default_rng(seed)
    users = [UserSequence(f"u{s}", tuple(f"i{rng.integers(5)}" for _ in range(n)),
                          tuple(rng.choice(["click", "order", "collect", "view",
                                            "impression"], n)),
                          tuple(sorted(int(t) for t in rng.integers(0, 10**9, n))))
             for s, n in enumerate(lengths)]
    impression_us = np.full(len(users), 10**12, np.int64)
    rows = rng.integers(0, 9, sum(lengths))
    c = RankerConfig(max_seq_len=L, sequence_impressions=impressions, item_buckets=64,
                     gap_buckets=8)
    got = sequence_features(Sequences.of(users), impression_us, rows, c)

    offsets = np.concatenate([[0], np.cumsum(lengths)])
    assert (got["user_id"] == hash_ids([u.user_id for u in users], c.user_buckets)).all()
    assert (got["user_rates"] == 0).all()  # no vocabulary: no history
    for s, user in enumerate(users):  # the plain per-row reading of the same rule
        # Each position's row travels with it through kept() (rows as item ids).
        tagged = UserSequence(user.user_id,
                              tuple(str(r) for r in rows[offsets[s]:offsets[s + 1]]),
                              user.actions, user.times_us)
        read = user.kept(L - impressions, impressions)
        kept_rows = [int(r) for r in tagged.kept(L - impressions, impressions).item_ids]
        k = len(read.item_ids)
        assert k <= L and sum(a == "impression" for a in read.actions) <= impressions
        want = {key: np.zeros(L, np.int64) for key in got if key not in ("user_id",
                                                                          "user_rates")}
        if k:
            want["seq_item_id"][L - k:] = hash_ids(read.item_ids, 64)
            want["seq_action"][L - k:] = [SEQUENCE_CODES.get(a, 0) for a in read.actions]
            want["seq_gap"][L - k:] = gap_bucket(
                (impression_us[s] - np.array(read.times_us)) / 1e6, 8)
            want["seq_modal_row"][L - k:] = kept_rows
        want["seq_mask"] = np.arange(L) >= L - k  # the real interactions
        for key, value in want.items():
            assert got[key].shape == (len(users), L)
            assert (got[key][s] == value).all(), key


@settings(max_examples=100, deadline=None)
@given(target=hnp.arrays(np.int64, st.integers(1, 6), elements=st.integers(0, 9)),
       seq=hnp.arrays(np.int64, st.tuples(st.integers(1, 6), st.integers(1, 5)),
                      elements=st.integers(0, 9)))
def test_the_batch_table_holds_the_rows_used_in_order_of_first_use(target, seq):
    vectors = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    vectors[0] = 0
    batch = model_batch({"target_modal_row": target, "seq_modal_row": seq}, vectors)
    table = batch["modal_table"].numpy()
    assert (table[batch["target_modal_row"].numpy()] == vectors[target]).all()
    assert (table[batch["seq_modal_row"].numpy()] == vectors[seq]).all()
    used = list(dict.fromkeys([0, *target.tolist(), *seq.ravel().tolist()]))
    assert (table == vectors[used]).all()  # row 0 first, then each row once, as first used


# -----------------------------------------------------------------------------
# The vector rule


@settings(max_examples=300, deadline=None)
@given(deleted=st.booleans(), version=st.sampled_from([None, "enc-1", "enc-2"]),
       model_version=st.sampled_from([None, "enc-1"]),
       content_age_s=st.one_of(st.none(), st.floats(-DAY, 10 * DAY)),
       window_s=st.one_of(st.none(), st.floats(1.0, 5 * DAY)))
def test_the_rule_agrees_with_what_the_store_reports(deleted, version, model_version,
                                                      content_age_s, window_s):
    """``OnlineFeatures.judge`` (what ``ppm features`` shows) and the rule the model's input
    follows say the same thing about an embedded item."""
    now = 10**15
    content_us = None if content_age_s is None else now - int(content_age_s * S)
    state = ItemState("a", "coat", None, None, 3, 0, 0, deleted, version, "h", content_us)
    stored = StoredItem(state, np.zeros(4, np.float32), 0, True)
    judged = OnlineFeatures(None, None, window_s).judge(stored, now, model_version)
    usable = usable_vectors([True], [version], [np.nan if content_us is None else content_us],
                            now, model_version, window_s, [deleted])
    assert usable.tolist() == [not judged.stale]


# -----------------------------------------------------------------------------
# Training and serving build the same batch

ENC = "enc-1"
DIM = 8
T = int(datetime(2026, 1, 1, 12, tzinfo=UTC).timestamp() * S)  # the impression
CONFIG = RankerConfig(variant="ppm", modal_dim=DIM, max_seq_len=4, item_buckets=64,
                      category_buckets=16, brand_buckets=16, shop_buckets=16, price_buckets=8,
                      gap_buckets=8)


def item(item_id: str, content_age_s: float | None, version: str | None = ENC,
         price: int = 3) -> ItemState:
    content = None if content_age_s is None else T - int(content_age_s * S)
    return ItemState(item_id, f"cat-{item_id}", f"brand-{item_id}", "shop-1", price,
                     first_seen_us=T - 10 * int(DAY) * S, updated_us=T - S,
                     encoder_version=None if content is None else version,
                     content_hash=None if content is None else f"h-{item_id}",
                     content_time_us=content)


# What the pipeline knows at the impression: item states and their vectors.
ITEMS = {
    "fresh": item("fresh", 3600, price=12),  # price above the model's buckets: clipped
    "old": item("old", 3 * DAY),  # older than the freshness window: missing
    "other": item("other", 600, version="enc-0"),  # another encoder's vector: missing
    "unembedded": item("unembedded", None),  # known, never embedded: missing
    "s1": item("s1", 7200), "s2": item("s2", 7200), "s3": item("s3", 60),
    "s4": item("s4", 120, version="enc-0"),
}
VECTORS = {i: np.random.default_rng(n).normal(size=DIM).astype(np.float32)
           for n, i in enumerate(ITEMS)}
TARGETS = ["fresh", "old", "other", "unembedded", "never-seen", "s2"]
# Oldest first: "gone" is unknown to the store; the last interaction is after the
# impression, so neither path may see it; six before it, of which the model keeps four.
USER = UserSequence(
    "u1", ("s1", "gone", "s2", "fresh", "s3", "s4", "s2"),
    ("click", "order", "click", "collect", "click", "order", "click"),
    tuple(T - int(s * S) for s in (5 * DAY, 3 * DAY, 7200, 3000, 60, 30, -10)))


class MemoryStore(OnlineFeatures):
    """The online store's reads from dicts, the freshness rule inherited: no Feast."""

    def __init__(self, items: dict[str, ItemState], freshness_window_s: float | None):
        super().__init__(None, None, freshness_window_s)
        self.items = items

    def fetch_items(self, item_ids, with_embeddings=False, encoder_version=None):
        return {i: StoredItem(self.items[i], VECTORS[i] if with_embeddings and
                              self.items[i].encoder_version else None, T, with_embeddings)
                for i in item_ids if i in self.items}

    user = USER

    def read_sequences(self, user_ids):
        return {u: self.user for u in user_ids if u == self.user.user_id}


def write_window(path: Path, user: UserSequence = USER) -> None:
    """One sample per target as the training log writes it: the sequence before the
    impression, the item's features as known then (``streams.training_log``)."""
    seen = user.before(T)
    rows = []
    for n, target in enumerate(TARGETS):
        state = ITEMS.get(target)
        embedded = state is not None and state.content_time_us is not None and (
            state.content_time_us <= T)
        rows.append({
            "sample_id": f"s{n}", "user_id": user.user_id, "item_id": target,
            "request_id": "r1", "impression_time": T, "click": n % 2, "order": 0,
            "collect": int(n == 2), "seq_item_ids": list(seen.item_ids),
            "seq_actions": list(seen.actions), "seq_times_us": list(seen.times_us),
            "item_encoder_version": state.encoder_version if embedded else None,
            **{f"item_{f}": getattr(state, f) if state else None
               for f in ("category", "brand", "shop", "price_bucket")},
            "item_age_s": None if state is None else (T - state.first_seen_us) / S,
            "item_clicks_before": 0, "window_start": T,
        })
    ts = pa.timestamp("us", tz="UTC")
    types = {"impression_time": ts, "click": pa.int8(), "order": pa.int8(),
             "collect": pa.int8(), "seq_item_ids": pa.list_(pa.string()),
             "seq_actions": pa.list_(pa.string()), "seq_times_us": pa.list_(pa.int64()),
             "item_price_bucket": pa.int32(), "item_age_s": pa.float64(),
             "item_clicks_before": pa.int32(), "window_start": ts}
    schema = pa.schema([(c, types.get(c, pa.string())) for c in SAMPLE_COLUMNS])
    pq.write_table(pa.Table.from_pylist(rows, schema), path)


def test_training_and_serving_build_the_same_batch(tmp_path):
    window = 24 * 3600.0
    # Training: a window file and the offline item log, vectors of both encoder versions.
    write_window(tmp_path / "window.parquet")
    ItemLog(tmp_path / "items").append(
        [ItemEmbeddingRow(i, VECTORS[i], s.encoder_version, s.content_hash, s.content_time_us,
                          T - 10 * S) for i, s in reversed(ITEMS.items()) if s.encoder_version],
        [T - 10 * S] * 7)
    modal = ModalTable.from_item_log(tmp_path / "items", ENC, DIM)
    data = WindowDataset([tmp_path / "window.parquet"], modal, CONFIG, window)
    trained = data.batch(np.arange(len(TARGETS)))

    # Serving: the same items and sequence in the online store, a request at the impression.
    ranker = Ranker(MemoryStore(ITEMS, window), Registry(DataDir(tmp_path).registry("ppm")))
    model = UnifiedRanker(CONFIG).eval()
    served, missing = ranker.build_batch(model, ENC, USER.user_id, TARGETS, now=T)

    assert list(served) == list(BATCH_KEYS)
    assert set(trained) == {*BATCH_KEYS, "labels", "label_mask"}
    for key in BATCH_KEYS:
        want = served[key]
        if key.startswith(("seq_", "user_")):  # one shared user and sequence row
            want = want.expand(len(TARGETS), *want.shape[1:])  # in serving, one per sample
        assert trained[key].dtype == served[key].dtype, key
        assert torch.equal(trained[key], want), key

    # The scenario covers what it claims to: each target's vector rule, padding, clipping.
    assert (trained["target_modal_row"] > 0).tolist() == [True, False, False, False, False,
                                                           True]
    assert trained["seq_mask"][0].tolist() == [True] * 4  # six before the impression, L = 4
    assert (trained["seq_modal_row"][0] > 0).tolist() == [True, True, True, False]  # s4: enc-0
    assert trained["price_bucket"].tolist() == [7, 3, 3, 3, 0, 3]
    assert missing == {"user_sequence": 0, "item_profile": 1, "item_embedding": 4,
                       "sequence_embedding": 1}

    # And the model scores both the same (serving encodes the shared sequence once).
    with torch.no_grad():
        torch.testing.assert_close(model(trained)[0], model(served)[0])


def test_training_and_serving_read_the_same_impressions_of_a_sequence(tmp_path):
    """A sequence with impressions (``features.sequence_impressions``): a model reading
    two of them and two interactions reads the same on both paths, and a model reading
    none of them reads only the interactions of the same stored sequence."""
    # Oldest first; the last one is after the impression.
    user = UserSequence(
        "u1", ("s1", "s1", "s2", "s3", "s3", "fresh", "s2", "s4", "s2"),
        ("impression", "click", "impression", "impression", "click", "impression",
         "order", "impression", "impression"),
        tuple(T - int(s * S) for s in (900, 899, 800, 700, 699, 600, 500, 400, -10)))
    write_window(tmp_path / "window.parquet", user)
    ItemLog(tmp_path / "items").append(
        [ItemEmbeddingRow(i, VECTORS[i], s.encoder_version, s.content_hash, s.content_time_us,
                          T - 10 * S) for i, s in reversed(ITEMS.items()) if s.encoder_version],
        [T - 10 * S] * 7)
    modal = ModalTable.from_item_log(tmp_path / "items", ENC, DIM)
    window = 24 * 3600.0
    store = MemoryStore(ITEMS, window)
    store.user = user
    ranker = Ranker(store, Registry(DataDir(tmp_path).registry("ppm")))
    codes = {code: action for action, code in SEQUENCE_CODES.items()}
    for config, want in (
            (replace(CONFIG, sequence_impressions=2),  # the last two of each kind
             [("s3", "click"), ("fresh", "impression"), ("s2", "order"), ("s4", "impression")]),
            (CONFIG,  # interactions only: three, left-padded
             [("s1", "click"), ("s3", "click"), ("s2", "order")])):
        trained = WindowDataset([tmp_path / "window.parquet"], modal, config, window).batch(
            np.arange(len(TARGETS)))
        model = UnifiedRanker(config).eval()
        served, _ = ranker.build_batch(model, ENC, user.user_id, TARGETS, now=T)
        for key in ("seq_item_id", "seq_action", "seq_gap", "seq_mask", "seq_modal_row"):
            assert torch.equal(trained[key], served[key].expand_as(trained[key])), key
        mask = served["seq_mask"][0]
        assert served["seq_item_id"][0][mask].tolist() == hash_ids(
            [i for i, _ in want], config.item_buckets).tolist()
        assert [codes[c] for c in served["seq_action"][0][mask].tolist()] == [
            a for _, a in want]
        with torch.no_grad():
            torch.testing.assert_close(model(trained)[0], model(served)[0])


def test_a_change_of_freshness_window_moves_both_paths_alike(tmp_path):
    """No freshness window: the old target's vector becomes usable on both paths."""
    write_window(tmp_path / "window.parquet")
    ItemLog(tmp_path / "items").append(
        [ItemEmbeddingRow(i, VECTORS[i], s.encoder_version, s.content_hash, s.content_time_us,
                          T) for i, s in ITEMS.items() if s.encoder_version], [T] * 7)
    modal = ModalTable.from_item_log(tmp_path / "items", ENC, DIM)
    trained = WindowDataset([tmp_path / "window.parquet"], modal, CONFIG).batch(np.arange(6))
    ranker = Ranker(MemoryStore(ITEMS, None), Registry(DataDir(tmp_path).registry("ppm")))
    served, _ = ranker.build_batch(UnifiedRanker(CONFIG), ENC, "u1", TARGETS, now=T)
    assert (trained["target_modal_row"] > 0).tolist() == [True, True, False, False, False,
                                                           True]
    assert torch.equal(trained["target_modal_row"], served["target_modal_row"])
    assert torch.equal(trained["modal_table"], served["modal_table"])


def test_a_deleted_item_is_missing_when_served(tmp_path):
    """Serving knows deletions; a window does not (the writer records the version the item
    had), which matters only for impressions of withdrawn items."""
    items = {**ITEMS, "fresh": replace(ITEMS["fresh"], deleted=True)}
    ranker = Ranker(MemoryStore(items, None), Registry(DataDir(tmp_path).registry("ppm")))
    served, missing = ranker.build_batch(UnifiedRanker(CONFIG), ENC, "u1", ["fresh"], now=T)
    assert served["target_modal_row"].tolist() == [0] and missing["item_embedding"] == 1


def test_rare_item_and_user_ids_are_unknown_in_training_and_in_serving_alike(tmp_path):
    """A model whose vocabularies admit ids seen at least twice, stored in a registry and
    served from it: the ids it does not admit are 0 in its training batch and in its
    serving batch, targets, sequence positions (still real positions) and the user alike;
    a frequent id keeps its bucket. Both paths build the same batch."""
    window = 24 * 3600.0
    write_window(tmp_path / "window.parquet")
    ItemLog(tmp_path / "items").append(
        [ItemEmbeddingRow(i, VECTORS[i], s.encoder_version, s.content_hash, s.content_time_us,
                          T - 10 * S) for i, s in ITEMS.items() if s.encoder_version],
        [T - 10 * S] * 7)
    modal = ModalTable.from_item_log(tmp_path / "items", ENC, DIM)
    model = UnifiedRanker(CONFIG).eval()
    model.item_vocabulary = IdVocabulary({"fresh": 9, "s2": 2, "s3": 5, "old": 1, "s4": 1},
                                           min_count=2, clicks={"fresh": 6, "s3": 1})
    model.user_vocabulary = IdVocabulary({USER.user_id: 1, "u2": 5}, min_count=2,
                                         clicks={USER.user_id: 1, "u2": 1})
    registry = Registry(DataDir(tmp_path).registry("ppm"))
    registry.promote(registry.register(model, {"trained_on": [], "encoder_version": ENC}))
    ranker = Ranker(MemoryStore(ITEMS, window), registry)
    served_model = registry.load(registry.champion())  # as the ranker loads it
    assert served_model.item_vocabulary == model.item_vocabulary
    assert served_model.user_vocabulary == model.user_vocabulary

    trained = WindowDataset([tmp_path / "window.parquet"], modal, CONFIG, window,
                            vocabulary=served_model.item_vocabulary,
                            user_vocabulary=served_model.user_vocabulary).batch(np.arange(6))
    served, _ = ranker.build_batch(served_model, ENC, USER.user_id, TARGETS, now=T)
    for key in BATCH_KEYS:
        want = served[key]
        if key.startswith(("seq_", "user_")):  # shared in serving
            want = want.expand(len(TARGETS), *want.shape[1:])
        assert torch.equal(trained[key], want), key

    assert served["user_id"].tolist() == [0]  # seen once: unknown
    # Click histories come from the same counts on both paths: fresh clicked 6 of 9 times,
    # above the prior (8 of 18); s2, shown twice, never; never-seen has no history.
    rates = dict(zip(TARGETS, served["item_rates"].tolist(), strict=True))
    assert rates["fresh"][0] > 0 > rates["s2"][0] and rates["never-seen"] == [0.0, 0.0]
    assert rates["fresh"][1] == pytest.approx(np.log1p(9))
    known = WindowDataset([tmp_path / "window.parquet"], modal, CONFIG, window,
                          user_vocabulary=IdVocabulary({USER.user_id: 2}, min_count=2))
    assert (known.features["user_id"] == hash_ids([USER.user_id], CONFIG.user_buckets)).all()

    # Targets: fresh and s2 admitted; old (once), other, unembedded, never-seen not.
    admitted = np.array([True, False, False, False, False, True])
    assert (trained["item_id"].numpy() == np.where(
        admitted, hash_ids(TARGETS, CONFIG.item_buckets), 0)).all()
    # The model's last four interactions: s2, fresh, s3 (admitted) and s4 (seen once).
    assert (served["seq_item_id"][0].numpy() == np.append(
        hash_ids(["s2", "fresh", "s3"], CONFIG.item_buckets), 0)).all()
    assert served["seq_mask"][0].tolist() == [True] * 4
    with torch.no_grad():
        want = torch.sigmoid(served_model(trained)[0][:, 0]).tolist()
    ranked = ranker.rank(USER.user_id, TARGETS, now=T)  # the ranker's own model and batch
    got = dict(zip(ranked.item_ids, ranked.scores["click"], strict=True))
    assert [got[i] for i in TARGETS] == pytest.approx(want, rel=1e-5)


def test_the_users_taste_reads_the_same_counts_in_training_and_in_serving(tmp_path):
    """A model's taste vocabulary counts (user, category / brand / shop / price bucket)
    pairs of its training windows and travels in its checkpoint; evaluation and serving
    read the same lifts from it. In the window u1 is shown the six targets, every second
    one clicked: 12 clicks in 20 counted pairs ("never-seen" has no profile, no pair)."""
    window = 24 * 3600.0
    write_window(tmp_path / "window.parquet")
    model = UnifiedRanker(CONFIG).eval()
    model.taste_vocabulary = taste_vocabulary_of([tmp_path / "window.parquet"])
    assert model.taste_vocabulary.prior == pytest.approx(12 / 20)
    registry = Registry(DataDir(tmp_path).registry("ppm"))
    registry.promote(registry.register(model, {"trained_on": [], "encoder_version": ENC}))
    served_model = registry.load(registry.champion())
    assert served_model.taste_vocabulary == model.taste_vocabulary

    ItemLog(tmp_path / "items").append(
        [ItemEmbeddingRow(i, VECTORS[i], s.encoder_version, s.content_hash, s.content_time_us,
                          T - 10 * S) for i, s in ITEMS.items() if s.encoder_version],
        [T - 10 * S] * 7)
    modal = ModalTable.from_item_log(tmp_path / "items", ENC, DIM)
    trained = WindowDataset([tmp_path / "window.parquet"], modal, CONFIG, window,
                            taste_vocabulary=served_model.taste_vocabulary).batch(np.arange(6))
    ranker = Ranker(MemoryStore(ITEMS, window), registry)
    served, _ = ranker.build_batch(served_model, ENC, USER.user_id, TARGETS, now=T)
    assert torch.equal(trained["taste_rates"], served["taste_rates"])

    taste = dict(zip(TARGETS, served["taste_rates"].tolist(), strict=True))
    # Each target's category is its own: "fresh" shown once, not clicked; "s2" clicked.
    assert taste["fresh"][0] == pytest.approx(id_rates([1], [0], 0.6)[0, 0])
    assert taste["s2"][0] == pytest.approx(id_rates([1], [1], 0.6)[0, 0])
    assert taste["s2"][0] > 0 > taste["fresh"][0]
    assert taste["never-seen"] == [0.0] * 4
    # One shop for all: 3 clicks in 5, the prior itself.
    assert [t[2] for i, t in taste.items() if i != "never-seen"] == pytest.approx([0.0] * 5)
    # A user the model does not admit reads no taste, on both paths.
    unknown = IdVocabulary({USER.user_id: 1}, min_count=2)
    assert not WindowDataset([tmp_path / "window.parquet"], modal, CONFIG, window,
                             taste_vocabulary=model.taste_vocabulary,
                             user_vocabulary=unknown).features["taste_rates"].any()
    served_model.user_vocabulary = unknown
    assert not ranker.build_batch(served_model, ENC, USER.user_id, TARGETS, now=T
                                  )[0]["taste_rates"].any()
    # A model without the feature reads zeros.
    plain = replace(CONFIG, taste_rates=False)
    assert not WindowDataset([tmp_path / "window.parquet"], modal, plain, window,
                             taste_vocabulary=model.taste_vocabulary
                             ).features["taste_rates"].any()


def test_direct_reads_return_what_feasts_sdk_returns(online):
    from tests.online_reads_check import check_reads_agree, fill

    fill(online)
    check_reads_agree(online)


def test_a_store_written_before_packing_reads_its_typed_fields(online):
    """The ranker reads an item's profile and vector metadata as one packed value each;
    where a store holds none (written by an older ppm), the direct reads fall back to the
    typed fields and still return what Feast's SDK returns. Where it holds them, a read
    is one stored value per item and view."""
    from feast.infra.online_stores.sqlite import _table_id

    from feature_repo.online_features import PACKED
    from tests.online_reads_check import check_reads_agree, fill

    fill(online)
    config = online.store.config
    conn = online.store.provider.online_store._get_conn(config)
    reads = []
    conn.set_trace_callback(reads.append)
    online.fetch_items(["i0", "i1"])
    conn.set_trace_callback(None)
    assert len(reads) == 1 and "'profile_packed'" in reads[0] and "'category'" not in reads[0]
    tables = {view: _table_id(config.project, online.store.get_feature_view(view), False)
              for view in PACKED}
    # Some keys packed and some not (one item's values first), then none.
    key = online.reader._binary("item_id", ["i1"])[0]
    for view in ("item_profile", "item_embedding"):
        deleted = conn.execute(f'DELETE FROM "{tables[view]}" WHERE feature_name = ? AND '
                               "entity_key = ?", [PACKED[view][0], key])
        assert deleted.rowcount == 1, view
    conn.commit()
    check_reads_agree(online)
    for view, (packed, _) in PACKED.items():
        deleted = conn.execute(f'DELETE FROM "{tables[view]}" WHERE feature_name = ?', [packed])
        assert deleted.rowcount > 0, view
    conn.commit()
    check_reads_agree(online)


def test_packed_values_come_back_as_written():
    """JSON for the scalars (newlines, any Unicode, None, numpy scalars), and a vector's
    float32 bytes after the first newline, whatever bytes those floats hold."""
    from feature_repo.online_features import _pack, _unpack

    scalars = ["a\nb", "é \u2028 \ud7ff", None, np.int64(7), np.bool_(True), 2**62]
    vector = np.array([np.float32(np.frombuffer(b"\n\n\n\n", "<f4")[0]), 1.5, -0.0],
                      np.float16)
    plain, none = _unpack([_pack(scalars), None], with_vector=False)
    with_vector, missing = _unpack([_pack(scalars[:2], vector), None], with_vector=True)
    assert plain == ["a\nb", "é \u2028 \ud7ff", None, 7, True, 2**62]
    assert with_vector[:2] == scalars[:2] and none is None and missing is None
    assert with_vector[2].dtype == np.float32
    assert np.array_equal(with_vector[2], vector.astype(np.float32), equal_nan=True)
