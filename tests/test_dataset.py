"""Closed training windows as the union of their sources (the local runner's folder and one
per Kafka partition), on synthetic manifests and tiny window files."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppm.config import Config
from ppm.data_dir import DataDir, TrainingLogDir
from trainer.dataset import (
    ModalTable,
    WindowCounts,
    WindowDataset,
    closed_windows,
    id_vocabulary,
    taste_vocabulary_of,
    window_files,
    window_sources,
)
from trainer.model import RankerConfig
from trainer.train import IncrementalTrainer, split_windows

HOUR = timedelta(hours=1)
T0 = datetime(2026, 1, 1, tzinfo=UTC)
SAMPLES = pa.schema([
    ("sample_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string()),
    ("request_id", pa.string()), ("impression_time", pa.timestamp("us", tz="UTC")),
    ("click", pa.int8()), ("order", pa.int8()), ("collect", pa.int8()),
    ("seq_item_ids", pa.list_(pa.string())), ("seq_actions", pa.list_(pa.string())),
    ("seq_times_us", pa.list_(pa.int64())), ("item_encoder_version", pa.string()),
    ("item_category", pa.string()), ("item_brand", pa.string()), ("item_shop", pa.string()),
    ("item_price_bucket", pa.int32()), ("item_age_s", pa.float64()),
    ("item_clicks_before", pa.int32()), ("window_start", pa.timestamp("us", tz="UTC")),
])


def name(hour: int) -> str:
    return f"{(T0 + hour * HOUR):%Y%m%dT%H%M%SZ}.parquet"


def partition(paths: DataDir, p: int) -> TrainingLogDir:
    """The training-log folder of partition ``p``'s writer."""
    return TrainingLogDir(paths.training_partition(p))


def write_source(log: TrainingLogDir, samples: dict[int, int], one_pair: bool = False,
                 clicked: Callable[[int, int], int] | None = None) -> None:
    """A writer's ``windows/``: for each hour a window file with that many samples (sample
    ``i`` shows ``i<i>`` to ``u<i>``, or with ``one_pair`` ``i0`` to ``u0``; odd ones
    clicked, or where ``clicked(hour, i)`` says), and the manifest in the writer's format
    (see streams.training_log)."""
    folder = log.windows
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for hour, n in sorted(samples.items()):
        start = T0 + hour * HOUR
        rows = [{"sample_id": f"{log.folder.name}:{hour}:{i}",
                 "user_id": f"u{0 if one_pair else i}", "item_id": f"i{0 if one_pair else i}",
                 "request_id": f"r{hour}-{i}",
                 "impression_time": start + timedelta(seconds=i),
                 "click": clicked(hour, i) if clicked else i % 2, "order": 0,
                 "collect": 0, "seq_item_ids": ["i0"], "seq_actions": ["click"],
                 "seq_times_us": [int(start.timestamp() * 1e6) - 1], "item_encoder_version": None,
                 "item_category": "c", "item_brand": "b", "item_shop": "s",
                 "item_price_bucket": 1, "item_age_s": 60.0, "item_clicks_before": 0,
                 "window_start": start}
                for i in range(n)]
        pq.write_table(pa.Table.from_pylist(rows, SAMPLES), folder / name(hour))
        entries.append({"start": start.isoformat(), "end": (start + HOUR).isoformat(),
                        "path": name(hour), "samples": n,
                        "closed_at_watermark": (start + 2 * HOUR).isoformat()})
    log.manifest.write_text(json.dumps(entries))


@pytest.fixture
def partitions(tmp_path) -> DataDir:
    """Three partition writers: 0 has closed hours 0-4, 1 only 0-2 (it lags), and 2 started
    later, at hour 1, and has closed through hour 5."""
    paths = DataDir(tmp_path)
    write_source(partition(paths, 0), {h: 3 for h in range(5)})
    write_source(partition(paths, 1), {h: 2 for h in range(3)})
    write_source(partition(paths, 2), {h: 5 for h in range(1, 6)})
    return paths


def test_a_window_is_closed_once_every_source_has_reached_it(partitions):
    windows = closed_windows(partitions.training)
    # The lagging partition 1 (last: hour 2) holds the union back.
    assert [w.name for w in windows] == [name(0), name(1), name(2)]
    first, second = windows[0], windows[1]
    # Partition 2 started later: no file for hour 0, and that does not hold hour 0 back.
    assert first.files == (partition(partitions, 0).windows / name(0),
                           partition(partitions, 1).windows / name(0))
    assert first.samples == 3 + 2 and second.samples == 3 + 2 + 5
    assert first.start_us == int(T0.timestamp() * 1e6)
    assert first.end_us - first.start_us == 3_600_000_000 == second.start_us - first.start_us
    assert window_files(partitions.training) == [f for w in windows for f in w.files]

    # Partition 1 catches up: the union moves to the earliest last window, now hour 4.
    write_source(partition(partitions, 1), {h: 2 for h in range(5)})
    assert [w.name for w in closed_windows(partitions.training)] == [name(h) for h in range(5)]


def test_the_local_runner_alone_reads_as_before_and_joins_the_union(tmp_path):
    paths = DataDir(tmp_path)
    training, local = paths.training, paths.training_log
    assert closed_windows(training) == [] and window_files(training) == []
    write_source(local, {h: 4 for h in range(3)})
    windows = closed_windows(training)
    assert [w.files for w in windows] == [(local.windows / name(h),) for h in range(3)]
    assert [w.samples for w in windows] == [4, 4, 4]

    # A worker's partition next to it: the local runner's file comes first in a window.
    write_source(partition(paths, 0), {0: 1, 1: 1})
    windows = closed_windows(training)
    assert [w.name for w in windows] == [name(0), name(1)]
    assert windows[0].files == (local.windows / name(0), partition(paths, 0).windows / name(0))


def test_sources_are_manifests_in_partition_folders_ordered_by_number(partitions):
    write_source(partition(partitions, 10), {h: 1 for h in range(6)})
    not_a_partition = TrainingLogDir(partitions.training / "partition-x")
    not_a_partition.windows.mkdir(parents=True)
    not_a_partition.manifest.write_text("not json")
    partition(partitions, 7).windows.mkdir(parents=True)  # nothing recorded yet
    sources = window_sources(partitions.training)
    assert list(sources) == ["partition-0/windows", "partition-1/windows",
                             "partition-2/windows", "partition-10/windows"]
    assert [w.name for w in sources["partition-2/windows"]] == [name(h) for h in range(1, 6)]
    assert all(len(w.files) == 1 for ws in sources.values() for w in ws)
    assert closed_windows(partitions.training)[1].files[-1] == (
        partition(partitions, 10).windows / name(1))


def test_a_source_with_an_empty_manifest_holds_everything_back(partitions):
    partition(partitions, 3).windows.mkdir(parents=True)
    partition(partitions, 3).manifest.write_text("[]")
    assert closed_windows(partitions.training) == []


def test_sources_with_different_window_sizes_are_an_error(partitions):
    manifest = partition(partitions, 2).manifest
    entries = json.loads(manifest.read_text())
    entries[0]["end"] = (T0 + 3 * HOUR).isoformat()  # hour 1 ends at 3 instead of 2
    manifest.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="disagree"):
        closed_windows(partitions.training)


def test_a_dataset_of_union_windows_reads_every_file(partitions):
    windows = closed_windows(partitions.training)
    modal = ModalTable.empty(8)
    data = WindowDataset(windows, modal, RankerConfig(variant="idrec", modal_dim=8))
    assert len(data) == sum(w.samples for w in windows) == 5 + 10 + 10
    # Windows and plain files are the same thing to the dataset.
    assert len(WindowDataset([windows[0].files[1], windows[1]], modal, data.config)) == 2 + 10


def test_the_trainer_steps_and_splits_over_union_windows(partitions):
    cfg = Config(data_dir=partitions.root, trainer={"warmup_windows": 1})
    trainer = IncrementalTrainer(cfg, variant="idrec")
    train, evaluate = trainer.next_step()
    assert [w.name for w in train] == [name(0)] and evaluate.name == name(1)
    assert evaluate.samples == 10

    trainer.registry.save_state({"trained_through": name(0)})
    train, evaluate = trainer.next_step()
    assert [w.name for w in train] == [name(1)] and evaluate.name == name(2)
    trainer.registry.save_state({"trained_through": name(1)})
    assert trainer.next_step() is None  # hour 3 is not closed by partition 1

    # A partition that shows up late can pull the closed windows back behind what was
    # trained on: the trainer waits rather than failing.
    trainer.registry.save_state({"trained_through": name(2)})
    write_source(partition(partitions, 4), {0: 1, 1: 1})
    assert trainer.next_step() is None
    trainer.registry.save_state({"trained_through": "20251231T000000Z.parquet"})
    with pytest.raises(RuntimeError, match="not a closed window"):
        trainer.next_step()

    split = split_windows(cfg, 0.5)
    assert [w.name for w in split.train] == [name(0)] and split.valid == []
    assert [w.name for w in split.test] == [name(1)]
    assert split.test_start_us == split.valid_start_us == int((T0 + HOUR).timestamp() * 1e6)


def test_the_split_is_train_then_validation_then_test_in_whole_windows(tmp_path):
    """Ten hourly windows: the test period is the last 20% of the time, validation the
    30% before it; a window cut by a boundary belongs to the earlier period."""
    paths = DataDir(tmp_path)
    write_source(paths.training_log, {h: 1 for h in range(10)})
    cfg = Config(data_dir=tmp_path)
    split = split_windows(cfg, test_share=0.2, valid_share=0.3)
    assert [w.name for w in split.train] == [name(h) for h in range(5)]
    assert [w.name for w in split.valid] == [name(h) for h in range(5, 8)]
    assert [w.name for w in split.test] == [name(8), name(9)]
    assert split.valid_start_us == split.valid[0].start_us
    assert split.test_start_us == split.test[0].start_us

    # Boundaries inside a window (test from 7.5 h, validation from 6.45 h): no window is
    # cut or dropped, and every period starts on a window.
    split = split_windows(cfg, test_share=0.25, valid_share=0.105)
    assert [len(split.train), len(split.valid), len(split.test)] == [7, 1, 2]
    assert split.train + split.valid + split.test == closed_windows(paths.training)

    none = split_windows(cfg, test_share=0.2, valid_share=0.0)
    assert none.valid == [] and len(none.train) == 8
    default = split_windows(cfg)  # test 20%, validation 10%
    assert [len(default.train), len(default.valid), len(default.test)] == [7, 1, 2]
    for test_share, valid_share in ((0.0, 0.1), (1.0, 0.0), (0.5, 0.5), (0.2, -0.1)):
        with pytest.raises(ValueError, match="share"):
            split_windows(cfg, test_share, valid_share)

    # One period back (to choose settings): the validation period is scored, the 30% before
    # it validates, the rest trains, and no window of the test period is in any of them.
    back = split_windows(cfg, test_share=0.2, valid_share=0.3, period="validation")
    assert back.test == split_windows(cfg, test_share=0.2, valid_share=0.3).valid
    assert [w.name for w in back.test] == [name(h) for h in range(5, 8)]
    assert [w.name for w in back.valid] == [name(h) for h in range(2, 5)]
    assert [w.name for w in back.train] == [name(0), name(1)]
    assert back.valid_start_us == back.valid[0].start_us
    assert back.test_start_us == back.test[0].start_us
    for valid_share in (0.0, 0.4):  # none to score, or none left to train on
        with pytest.raises(ValueError, match="validation period needs a valid_share"):
            split_windows(cfg, 0.2, valid_share, period="validation")
    with pytest.raises(ValueError, match="period must be"):
        split_windows(cfg, period="valid")


def test_item_ids_are_counted_from_training_windows_and_rare_ones_read_as_unknown(tmp_path):
    """Hours 0-1 show items i0..i3, hour 2 also i4 and i5: i0..i3 are seen twice in the
    first two windows, i4 and i5 not at all; at min_count 2 only i0..i3 keep a bucket, as
    targets and in sequences (every sample's sequence is [i0]; i0 is admitted here)."""
    paths = DataDir(tmp_path)
    write_source(paths.training_log, {0: 4, 1: 4, 2: 6})
    windows = closed_windows(paths.training)
    vocabulary = id_vocabulary(windows[:2], "item_id", min_count=2)
    assert vocabulary.counts == {f"i{i}": 2 for i in range(4)}
    assert id_vocabulary(windows[2:], "item_id", 2, base=vocabulary).counts == {
        **{f"i{i}": 3 for i in range(4)}, "i4": 1, "i5": 1}

    config = RankerConfig(variant="idrec", modal_dim=8, item_buckets=1024)
    modal = ModalTable.empty(8)
    plain = WindowDataset([windows[2]], modal, config)
    data = WindowDataset([windows[2]], modal, config, vocabulary=vocabulary)
    assert (plain.features["item_id"] > 0).all()
    assert (data.features["item_id"] == np.where(np.arange(6) < 4, plain.features["item_id"],
                                                 0)).all()
    assert (data.features["seq_item_id"] == plain.features["seq_item_id"]).all()
    rare = WindowDataset([windows[2]], modal, config,
                         vocabulary=id_vocabulary(windows[:1], "item_id", min_count=2))
    assert (rare.features["item_id"] == 0).all() and (rare.features["seq_item_id"] == 0).all()
    assert (rare.features["seq_mask"] == plain.features["seq_mask"]).all()  # still there


def test_window_counts_read_without_the_profile_fields_count_the_same_ids(tmp_path):
    """Read for item and user counts only, a window's counts are those of the full read;
    asked for tastes then, they say what they lack instead of counting nothing."""
    paths = DataDir(tmp_path)
    write_source(paths.training_log, {0: 4, 1: 4, 2: 6})
    windows = closed_windows(paths.training)
    full, lean = WindowCounts.read(windows), WindowCounts.read(windows, tastes=False)
    for column in ("item_id", "user_id"):
        assert lean.ids(column).counts == full.ids(column).counts
        assert lean.ids(column).clicks == full.ids(column).clicks
    assert full.tastes().counts
    with pytest.raises(ValueError, match="tastes=True"):
        lean.tastes()


def test_a_model_refuses_samples_not_built_with_its_vocabularies(tmp_path):
    """Built without the model's vocabularies, samples hash every id and read no click
    rates; built with another model's, they read that model's: ``predict`` says so
    instead of scoring them. Built with its own (or an equal copy), it scores."""
    from trainer.model import UnifiedRanker
    from trainer.train import predict

    paths = DataDir(tmp_path)
    write_source(paths.training_log, {0: 4, 1: 4, 2: 6})
    windows = closed_windows(paths.training)
    config = RankerConfig(variant="idrec", modal_dim=8, item_buckets=1024)
    model = UnifiedRanker(config)
    model.item_vocabulary = id_vocabulary(windows[:2], "item_id", min_count=2)
    modal = ModalTable.empty(8)
    with pytest.raises(ValueError, match=r"item vocabulary: build it with .*dataset_for"):
        predict(model, WindowDataset([windows[2]], modal, config))
    another = id_vocabulary(windows[:1], "item_id", min_count=1)  # another model's
    with pytest.raises(ValueError, match="item vocabulary"):
        predict(model, WindowDataset([windows[2]], modal, config, vocabulary=another))
    built = WindowDataset([windows[2]], modal, config, vocabulary=model.item_vocabulary)
    assert predict(model, built).shape == (6, len(config.tasks))
    # An equal copy is the same vocabulary (a deep-copied model scores its original's data).
    copied = WindowDataset([windows[2]], modal, config,
                           vocabulary=id_vocabulary(windows[:2], "item_id", min_count=2))
    assert np.array_equal(predict(model, copied), predict(model, built))


def test_a_training_sample_reads_only_earlier_click_history_never_its_own_label(tmp_path):
    """Every hour shows i0..i3 to u0..u3; odd ones are clicked. Counted over hours 0-2, a
    sample of hour h reads h earlier impressions of its item and user (all clicked for odd
    ones, none for even); scored after training, it reads all three."""
    paths = DataDir(tmp_path)
    write_source(paths.training_log, {0: 4, 1: 4, 2: 4})
    windows = closed_windows(paths.training)
    items = id_vocabulary(windows, "item_id", min_count=1)
    users = id_vocabulary(windows, "user_id", min_count=1)
    assert items.counts == {f"i{i}": 3 for i in range(4)}
    assert items.clicks == {"i1": 3, "i3": 3}
    config = RankerConfig(variant="idrec", modal_dim=8, item_buckets=1024)
    modal = ModalTable.empty(8)

    def history(data):  # (n, 2): impressions and clicks before, from log1p and the lift
        return np.expm1(data.features["item_rates"][:, 1]).round()

    train = WindowDataset(windows, modal, config, vocabulary=items, user_vocabulary=users,
                          training=True)
    hour = np.repeat([0, 1, 2], 4)
    assert history(train).tolist() == hour.tolist()
    assert (train.features["user_rates"] == train.features["item_rates"]).all()  # u_i, i_i
    lift = train.features["item_rates"][:, 0]
    clicked = train.labels[:, 0] > 0
    assert (lift[hour == 0] == 0).all()  # nothing before: the prior
    assert (lift[(hour > 0) & clicked] > 0).all() and (lift[(hour > 0) & ~clicked] < 0).all()
    # Fine-tuning on the last window alone reads the same history for it.
    last = WindowDataset(windows[2:], modal, config, vocabulary=items, user_vocabulary=users,
                         training=True)
    assert np.allclose(last.features["item_rates"], train.features["item_rates"][8:])
    # Replayed in a fine-tuning step on the later windows: those are not its history.
    replay = WindowDataset(windows[:1], modal, config, vocabulary=items, user_vocabulary=users,
                           training=True, counted_later=windows[1:])
    assert history(replay).tolist() == [0] * 4
    # After training: everything counted is history.
    after = WindowDataset(windows[2:], modal, config, vocabulary=items, user_vocabulary=users)
    assert history(after).tolist() == [3] * 4
    # The user's taste: u_i saw one item of category c (brand b, ...) an hour, as i_i.
    tastes = taste_vocabulary_of(windows)
    train = WindowDataset(windows, modal, config, vocabulary=items, user_vocabulary=users,
                          taste_vocabulary=tastes, training=True)
    assert np.allclose(train.features["taste_rates"], lift[:, None].repeat(4, axis=1))
    after = WindowDataset(windows[2:], modal, config, vocabulary=items, user_vocabulary=users,
                          taste_vocabulary=tastes)
    assert np.allclose(after.features["taste_rates"], after.features["item_rates"][:, :1])
    # Windows the vocabulary never counted cannot be training data.
    with pytest.raises(ValueError, match="did not count"):
        WindowDataset(windows, modal, config, vocabulary=id_vocabulary(windows[:1], "item_id",
                                                                       1), training=True)


def test_shuffled_vectors_move_between_items_and_missing_stays_missing():
    rng = np.random.default_rng(0)
    vectors = np.r_[np.zeros((1, 3)), rng.normal(size=(50, 3))].astype(np.float32)
    modal = ModalTable.of("enc-1", [f"i{k:02d}" for k in range(50)], vectors[1:],
                          np.arange(1, 51, dtype=np.int64))
    assert (modal.vectors == vectors).all()
    shuffled = modal.shuffled(seed=3)
    assert (shuffled.item_ids == modal.item_ids).all() and shuffled.encoder_version == "enc-1"
    np.testing.assert_array_equal(shuffled.content_time_us, modal.content_time_us)
    assert (shuffled.vectors[0] == 0).all()  # row 0 is "missing" in both
    # Every item's vector is some item's vector, and almost none is its own.
    rows = [int(np.flatnonzero((vectors == v).all(axis=1))[0]) for v in shuffled.vectors[1:]]
    assert sorted(rows) == list(range(1, 51))
    assert sum(r == k for k, r in enumerate(rows, start=1)) <= 3
    np.testing.assert_array_equal(modal.shuffled(seed=3).vectors, shuffled.vectors)
    assert not np.array_equal(modal.shuffled(seed=4).vectors, shuffled.vectors)


@settings(max_examples=100, deadline=None)
@given(versions=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 20)),
                         max_size=12),
       queries=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d", None]),
                                  st.integers(-1, 22)), max_size=12))
def test_the_as_of_lookup_finds_the_newest_vector_available_then(versions, queries):
    """Brute force: the row of an item's vector with the latest ``available_us`` at or
    before the query time; none (0) before its first, for an unknown id or for None."""
    versions = list(dict(((i, t), None) for i, t in versions))  # one per (item, time)
    modal = ModalTable.of("enc", [i for i, _ in versions],
                          np.arange(len(versions), dtype=np.float32).reshape(-1, 1),
                          [t for _, t in versions])
    got = modal.rows_as_of([i for i, _ in queries], np.array([t for _, t in queries],
                                                             np.int64))
    for (item, at), row in zip(queries, got, strict=True):
        seen = [(t, k) for k, (i, t) in enumerate(versions) if i == item and t <= at]
        if not seen:
            assert row == 0
        else:
            assert modal.item_ids[row] == item
            assert modal.vectors[row, 0] == max(seen)[1]  # the version made last
            assert modal.available_us[row] <= at


def test_a_training_sample_reads_no_history_of_its_own_window(tmp_path):
    """u0 is shown i0 twice in hour 0 and three times in hour 1, every second time
    clicked. A training sample counts the hours before its own, never the earlier
    impressions of its hour: a model serving that hour had not counted them yet either."""
    paths = DataDir(tmp_path)
    write_source(paths.training_log, {0: 2, 1: 3}, one_pair=True)
    windows = closed_windows(paths.training)
    config = RankerConfig(variant="idrec", modal_dim=8, item_buckets=1024)
    train = WindowDataset(windows, ModalTable.empty(8), config,
                          vocabulary=id_vocabulary(windows, "item_id", 1),
                          user_vocabulary=id_vocabulary(windows, "user_id", 1),
                          taste_vocabulary=taste_vocabulary_of(windows), training=True)
    for key in ("item_rates", "user_rates"):
        assert np.expm1(train.features[key][:, 1]).round().tolist() == [0, 0, 2, 2, 2], key
    lift = train.features["item_rates"][:, 0]  # hour 1 reads 1 click in 2 (the prior: 2 in 5)
    assert (lift[:2] == 0).all() and (lift[2:] == lift[2]).all() and lift[2] > 0
    assert np.allclose(train.features["taste_rates"], lift[:, None].repeat(4, axis=1))


def test_a_sample_never_sees_a_vector_that_became_available_after_its_impression(tmp_path):
    """Items i0..i3 were embedded at hour 0 and again, with new content, at hour 1 (i1 also
    at hour 2). Samples of hour 0 read the first vectors, as targets and in sequences
    (every sequence is [i0]), those of hour 1 the second: a later upsert never leaks
    back. A refresh policy that makes the second vectors available only at hour 5 keeps
    hour 1 on the first ones."""
    paths = DataDir(tmp_path)
    write_source(paths.training_log, {0: 4, 1: 4})
    windows = closed_windows(paths.training)
    us = int(T0.timestamp() * 1e6)
    hour_us = 3_600 * 10**6
    log = [(f"i{k}", 0) for k in range(4)] + [(f"i{k}", hour_us) for k in range(4)] + [
        ("i1", 2 * hour_us)]
    vectors = np.array([[10 * (t // hour_us) + int(i[1:])] for i, t in log], np.float32)
    modal = ModalTable.of("enc", [i for i, _ in log], vectors, [us + t for _, t in log])
    config = RankerConfig(variant="modal", modal_dim=1, item_buckets=64)
    data = WindowDataset(windows, modal, config, as_recorded=False)

    def vectors_read(d):  # (target's vector, the sequence item i0's vector) per sample
        batch = d.batch(np.arange(len(d)))
        table = batch["modal_table"][:, 0]
        return list(zip(table[batch["target_modal_row"]].tolist(),
                        table[batch["seq_modal_row"][:, -1]].tolist(), strict=True))

    # Sample k of hour h: item i_k, impression h hours + k seconds after T0.
    assert vectors_read(data) == [(k, 0.0) for k in range(4)] + [(10 + k, 10.0)
                                                                  for k in range(4)]
    # A sample records whether the stream had embedded its target; these say no.
    assert (WindowDataset(windows, modal, config).features["target_modal_row"] == 0).all()
    late = modal.available_from(np.where(modal.content_time_us >= us + hour_us,
                                         us + 5 * hour_us, modal.available_us))
    assert vectors_read(WindowDataset(windows, late, config, as_recorded=False)) == [
        (k, 0.0) for k in range(4)] * 2
    # Served through an item cache of 4 hours, hour 1 reads what hour 0's requests read
    # (an entry lives 2 to 4 hours): the new vectors reach scoring only when it expires.
    # One store read per item while cached; without a cache, one per request and item.
    cached = WindowDataset(windows, modal, config, as_recorded=False, serving_cache_s=4 * 3600.0)
    assert vectors_read(cached) == [(k, 0.0) for k in range(4)] * 2
    assert (cached.store_reads, cached.requests) == (4, 8)
    uncached = WindowDataset(windows, modal, config, as_recorded=False, serving_cache_s=0.0)
    assert vectors_read(uncached) == vectors_read(data)
    assert (uncached.store_reads, data.store_reads) == (14, None)


def test_a_model_without_vectors_gets_batches_without_them(tmp_path):
    """idrec reads no vectors, so its batches carry row 0 alone and every modal row 0,
    while a ppm model's batches of the same samples carry the vectors they read; every
    other key is the same."""
    paths = DataDir(tmp_path)
    write_source(paths.training_log, {0: 4})
    windows = closed_windows(paths.training)
    us = int(T0.timestamp() * 1e6)
    modal = ModalTable.of("enc", [f"i{k}" for k in range(4)],
                          np.arange(1, 5, dtype=np.float32)[:, None], [us] * 4)
    batches = {v: WindowDataset(windows, modal, RankerConfig(variant=v, modal_dim=1,
                                                             item_buckets=64),
                                as_recorded=False).batch(np.arange(4))
               for v in ("idrec", "ppm")}
    ids, ppm = batches["idrec"], batches["ppm"]
    assert ids["modal_table"].shape == (1, 1) and ids["modal_table"].abs().sum() == 0
    assert (ids["target_modal_row"] == 0).all() and (ids["seq_modal_row"] == 0).all()
    assert ppm["modal_table"][ppm["target_modal_row"], 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert set(ids) == set(ppm)
    for key in set(ids) - {"modal_table", "target_modal_row", "seq_modal_row"}:
        assert torch.equal(ids[key], ppm[key]), key
