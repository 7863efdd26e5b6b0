"""Freshness figures: the histogram's percentiles against numpy's, constant memory, files
that stay small, per-item records appended in parts and every writer merged."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppm.data_dir import DataDir
from streams.freshness import (
    BUCKET_COUNT,
    FreshnessStats,
    bucket_bounds,
    bucket_of,
    read_freshness,
    read_freshness_by_writer,
    read_freshness_items,
)

lags = st.lists(st.one_of(st.floats(-5, 10, allow_nan=False),
                          st.floats(0, 1e9, allow_nan=False)), min_size=1, max_size=300)


def test_buckets_tile_the_line_in_quarter_doublings():
    assert bucket_of(-3) == bucket_of(0) == bucket_of(0.999) == 0 and bucket_of(1.0) == 1
    assert bucket_of(float("nan")) == 0 and bucket_of(1e300) == BUCKET_COUNT - 1
    for bucket in range(1, BUCKET_COUNT - 1):
        low, high = bucket_bounds(bucket)
        assert high / low == pytest.approx(2 ** 0.25)
        assert bucket_of(low * 1.0000001) == bucket == bucket_of(high * 0.9999999)
    assert bucket_bounds(BUCKET_COUNT - 1)[1] == float("inf")


@settings(max_examples=200, deadline=None)
@given(lags, st.sampled_from([0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 1.0]))
def test_a_percentile_is_within_one_bucket_of_numpys(values, q):
    stats = FreshnessStats()
    stats.add(values)
    estimate = stats.quantile(q)
    x = np.asarray(values)
    # numpy's (linear) percentile lies between these two order statistics.
    lower = np.percentile(x, q * 100, method="lower")
    higher = np.percentile(x, q * 100, method="higher")
    linear = np.percentile(x, q * 100)
    assert bucket_of(lower) - 1 <= bucket_of(estimate) <= bucket_of(higher) + 1
    if bucket_of(lower) == bucket_of(higher):
        assert abs(bucket_of(estimate) - bucket_of(linear)) <= 1
    assert x.min() <= estimate <= x.max()
    assert stats.max_ms == x.max() and stats.min_ms == x.min() and stats.count == len(x)


def test_dense_data_percentiles_are_within_the_buckets_resolution():
    x = np.random.default_rng(0).lognormal(mean=5, sigma=1.5, size=50_000)
    stats = FreshnessStats()
    stats.add(x.tolist())
    for q in (0.5, 0.95, 0.99):
        assert stats.quantile(q) == pytest.approx(np.percentile(x, q * 100), rel=0.1)


def test_a_million_items_take_no_more_memory_than_a_thousand(tmp_path):
    stats = FreshnessStats()
    batch = [f"i{i}" for i in range(1000)]
    arrived = list(range(1000))
    stats.record(batch, arrived, arrived, 5_000)  # every list exists before measuring
    size = len(json.dumps(stats.state_dict()))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(1000):
            stats.record(batch, arrived, [a * n for a in arrived], 10_000_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert stats.count == 1_001_000 and stats.pending_items == 0
    assert grown < 64_000, grown  # a few ints grow past a machine word; no rows are kept
    stats.save(tmp_path / "f.json")
    assert (tmp_path / "f.json").stat().st_size < 4 * size + 4096


def test_item_records_are_appended_in_parts_never_rewritten(tmp_path):
    paths = DataDir(tmp_path)
    folder = paths.freshness_items_of("w1")
    stats = FreshnessStats(keep_items=True)
    assert stats.write_items_part(folder) is None  # nothing kept yet: no part
    stats.record(["a", "b"], [1, 2], [10, 20], 1_000)
    first = stats.write_items_part(folder)
    written = first.read_bytes()
    stats.record(["c"], [3], [30], 2_000)
    second = stats.write_items_part(folder)
    assert first != second and first.read_bytes() == written
    assert stats.pending_items == 0 and stats.parts_written == 2
    table = read_freshness_items(tmp_path)
    assert table.column("item_id").to_pylist() == ["a", "b", "c"]
    assert [t.timestamp() * 1e6 for t in table.column("readable").to_pylist()] == [
        1_000, 1_000, 2_000]
    assert read_freshness_items(tmp_path / "none").num_rows == 0


def test_a_checkpoint_restores_the_part_number_so_a_replay_overwrites(tmp_path):
    stats = FreshnessStats(keep_items=True)
    stats.record(["a"], [1], [10], 1_000)
    stats.write_items_part(tmp_path)
    state = stats.state_dict()
    stats.record(["b"], [2], [20], 2_000)
    stats.write_items_part(tmp_path)  # a crash after this: the checkpoint has state
    again = FreshnessStats(keep_items=True)
    again.load_state_dict(state)
    again.record(["b"], [2], [20], 3_000)  # the replay
    again.write_items_part(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-000000.parquet",
                                                          "part-000001.parquet"]
    assert again.count == 2


def test_every_writers_histogram_is_read_and_merged(tmp_path):
    paths = DataDir(tmp_path)
    paths.freshness_dir.mkdir()
    for path, values in ((paths.freshness, [10, 20]), (paths.worker_freshness("w1"), [30]),
                         (paths.worker_freshness("w2"), [40, 50, 1000])):
        stats = FreshnessStats()
        stats.add(values)
        stats.save(path)
    by_writer = read_freshness_by_writer(tmp_path)
    assert {k: s.count for k, s in by_writer.items()} == {"local": 2, "w1": 1, "w2": 3}
    merged = read_freshness(tmp_path)
    assert merged.count == 6 and merged.min_ms == 10 and merged.max_ms == 1000
    assert merged.summary()["mean_ms"] == pytest.approx(1150 / 6)
    assert bucket_of(merged.quantile(0.5)) in (bucket_of(30), bucket_of(40))
    assert read_freshness(tmp_path / "none").percentiles() == {
        "p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}


def test_figures_of_another_version_are_refused(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"item_id": [], "arrived": []}))
    with pytest.raises(ValueError, match="another ppm version"):
        FreshnessStats.read(path)
