"""TrainingLogWriter: labels, point-in-time features, windows, late data, duplicates, restore."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppm.clock import to_us
from ppm.config import SimulatorConfig
from ppm.data_dir import TrainingLogDir
from ppm.events import Action, BehaviorEvent, ItemEvent, ItemOp
from ppm.records import ItemState, UserSequence, price_bucket
from streams.sequence_builder import SequenceBuilder
from streams.sources.shop_simulator import ShopSimulator
from streams.training_log import LATE, SCHEMA, UNMATCHED, ClosedWindow, TrainingLogWriter

T0 = datetime(2026, 1, 1, tzinfo=UTC)  # a window boundary
T0_US = to_us(T0)
HOUR_US = 3_600_000_000
W = 1800.0  # attribution window, seconds


class ListSink:
    def __init__(self) -> None:
        self.written: list[UserSequence] = []

    def write_sequences(self, sequences: Sequence[UserSequence]) -> None:
        self.written.extend(sequences)


def behavior(action: str, at_s: float, user: str = "u1", item: str = "i1",
             request: str = "r1") -> BehaviorEvent:
    return BehaviorEvent(user_id=user, item_id=item, action=Action(action), request_id=request,
                         event_time=T0 + timedelta(seconds=at_s), position=0)


def tick(at_s: float) -> BehaviorEvent:
    """An impression of a bystander: moves the watermark (read_samples leaves it out)."""
    return behavior("impression", at_s, user="clock", item="tick", request=f"tick-{at_s}")


def writer_for(out: Path, sequences: dict[str, UserSequence] | SequenceBuilder | None = None,
               items: dict[str, ItemState] | None = None) -> TrainingLogWriter:
    return TrainingLogWriter(out, sequences or {}, items or {}, attribution_window_s=W,
                             window_s=3600.0)


def read_samples(out: Path) -> list[dict[str, Any]]:
    return [row for path in sorted(TrainingLogDir(out).windows.glob("*.parquet"))
            for row in pq.read_table(path).to_pylist() if row["user_id"] != "clock"]


def by_key(out: Path) -> dict[tuple[str, str, str, int], dict[str, Any]]:
    """Samples keyed by (user, item, request, seconds after T0)."""
    return {(s["user_id"], s["item_id"], s["request_id"],
             round((to_us(s["impression_time"]) - T0_US) / 1e6)): s for s in read_samples(out)}


def late_lines(out: Path) -> list[dict[str, Any]]:
    path = TrainingLogDir(out).late_events
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def assert_balanced(writer: TrainingLogWriter) -> None:
    c = writer.counters
    assert c["impressions"] == c["samples_logged"] + c["pending_impressions"]
    assert c["followups"] == (c["attributed_followups"] + c["late_events"]
                              + c["unresolved_followups"] + c["already_recorded_followups"])
    assert c["events"] == (c["impressions"] + c["duplicate_impressions"]
                           + c["already_recorded_impressions"] + c["followups"]
                           + c["duplicate_followups"])


# ---------------------------------------------------------------------------- labels


def test_labels_count_follow_ups_within_the_attribution_window(tmp_path: Path) -> None:
    writer = writer_for(tmp_path)
    writer.process([
        behavior("impression", 0, item="i1"),
        behavior("click", 100, item="i1"),
        behavior("order", W - 1e-6, item="i1"),  # the last microsecond inside
        behavior("impression", 0, item="i2"),
        behavior("click", W, item="i2"),  # exactly one window later: outside
        behavior("impression", 10, item="i3"),
        behavior("collect", 5, item="i3"),  # before its impression
    ])
    writer.process([tick(2 * 3600 + W)])

    samples = by_key(tmp_path)
    assert (samples["u1", "i1", "r1", 0]["click"], samples["u1", "i1", "r1", 0]["order"],
            samples["u1", "i1", "r1", 0]["collect"]) == (1, 1, 0)
    assert samples["u1", "i2", "r1", 0]["click"] == 0
    assert samples["u1", "i3", "r1", 10]["collect"] == 0
    late = late_lines(tmp_path)
    assert sorted((e["event"]["item_id"], e["reason"]) for e in late) == [
        ("i2", UNMATCHED), ("i3", UNMATCHED)]
    assert_balanced(writer)


def test_follow_ups_match_user_request_and_the_latest_earlier_impression(tmp_path: Path) -> None:
    writer = writer_for(tmp_path)
    writer.process([
        behavior("impression", 0, request="r1"),
        behavior("impression", 10, request="r2"),
        behavior("click", 20, request="r2"),
        behavior("click", 25, user="u2", request="r1"),  # another user: labels nothing
        # The same request shows i1 twice: each follow-up goes to the latest earlier one.
        behavior("impression", 0, request="r3"),
        behavior("impression", 100, request="r3"),
        behavior("click", 50, request="r3"),
        behavior("order", 150, request="r3"),
    ])
    writer.close_all()

    samples = by_key(tmp_path)
    assert samples["u1", "i1", "r1", 0]["click"] == 0
    assert samples["u1", "i1", "r2", 10]["click"] == 1
    assert (samples["u1", "i1", "r3", 0]["click"], samples["u1", "i1", "r3", 0]["order"]) == (1, 0)
    assert (samples["u1", "i1", "r3", 100]["click"],
            samples["u1", "i1", "r3", 100]["order"]) == (0, 1)
    assert [e["event"]["user_id"] for e in late_lines(tmp_path)] == ["u2"]


def test_a_follow_up_may_arrive_before_its_impression(tmp_path: Path) -> None:
    writer = writer_for(tmp_path)
    writer.process([behavior("click", 30, request="r1"), behavior("impression", 0, request="r1")])
    # Across batches too, while the impression could not yet be final.
    writer.process([behavior("click", 40, request="r2")])
    writer.process([behavior("impression", 20, request="r2")])
    writer.close_all()

    samples = by_key(tmp_path)
    assert samples["u1", "i1", "r1", 0]["click"] == 1
    assert samples["u1", "i1", "r2", 20]["click"] == 1
    assert late_lines(tmp_path) == []


# ---------------------------------------------------------------------------- features


def test_sequence_holds_only_interactions_before_the_impression(tmp_path: Path) -> None:
    batch = [behavior("click", 10, item="a"), behavior("impression", 20, item="b"),
             behavior("click", 20, item="b"), behavior("order", 30, item="b")]
    sequences: dict[str, UserSequence] = {}
    SequenceBuilder(ListSink(), sequences).process(batch)  # the caller updates first
    writer = writer_for(tmp_path, sequences)
    writer.process(batch)
    writer.close_all()

    [sample] = read_samples(tmp_path)
    assert sample["seq_item_ids"] == ["a"]
    assert sample["seq_actions"] == ["click"]
    assert sample["seq_times_us"] == [T0_US + 10_000_000]


def test_with_sequence_impressions_a_sample_holds_the_earlier_impressions(tmp_path: Path
                                                                         ) -> None:
    batch = [behavior("impression", 10, item="a"), behavior("click", 11, item="a"),
             behavior("impression", 20, item="b"), behavior("impression", 30, item="c")]
    sequences: dict[str, UserSequence] = {}
    SequenceBuilder(ListSink(), sequences, impressions=5).process(batch)
    writer = writer_for(tmp_path, sequences)
    writer.process(batch)
    writer.close_all()

    samples = {s["item_id"]: s for s in read_samples(tmp_path)}
    assert samples["c"]["seq_item_ids"] == ["a", "a", "b"]  # never its own impression
    assert samples["c"]["seq_actions"] == ["impression", "click", "impression"]
    assert samples["a"]["seq_item_ids"] == []


@pytest.mark.parametrize("batch_size", [1, 7, 1_000])
def test_a_sample_holds_what_the_store_held_at_its_impression_whatever_the_batch(
        tmp_path: Path, batch_size: int) -> None:
    """One user, more impressions and clicks than the sequence keeps: each sample's history
    is the last K interactions and M impressions before it, whether its batch holds one
    event or all of them (later events of the batch push earlier ones out of the kept
    sequence, not out of the history an earlier impression saw)."""
    events = []
    for n in range(40):
        events.append(behavior("impression", 10 * n, item=f"i{n}", request=f"r{n}"))
        if n % 3 == 0:
            events.append(behavior("click", 10 * n + 1, item=f"i{n}", request=f"r{n}"))
    builder = SequenceBuilder(ListSink(), k=3, impressions=4)
    writer = writer_for(tmp_path / str(batch_size), builder)
    for start in range(0, len(events), batch_size):
        batch = events[start:start + batch_size]
        builder.process(batch)
        writer.process(batch)
    writer.close_all()

    whole = UserSequence("u1")
    for event in events:
        whole = whole.with_event(event)
    samples = read_samples(tmp_path / str(batch_size))
    assert len(samples) == 40
    for sample in samples:
        want = whole.before(to_us(sample["impression_time"])).kept(3, 4)
        assert sample["seq_item_ids"] == list(want.item_ids), sample["item_id"]
        assert sample["seq_actions"] == list(want.actions)
    assert sum(len(s["seq_item_ids"]) == 7 for s in samples) > 30  # full from early on


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(Action)), st.integers(0, 600),
                          st.sampled_from(["i1", "i2"])), min_size=1, max_size=30),
       st.sampled_from([0, 50]))
def test_sequence_never_reaches_the_impression(
        tmp_path_factory: pytest.TempPathFactory, raw: list[tuple[Action, int, str]],
        impressions: int) -> None:
    events = [behavior(action, at, item=item) for action, at, item in raw]
    sequences: dict[str, UserSequence] = {}
    SequenceBuilder(ListSink(), sequences, impressions=impressions).process(events)
    out = tmp_path_factory.mktemp("log")
    writer = writer_for(out, sequences)
    writer.process(events)
    writer.close_all()

    interactions = {(action, at, item) for action, at, item in raw
                    if impressions or action is not Action.IMPRESSION}
    samples = read_samples(out)
    assert len(samples) == len({(at, item) for action, at, item in raw
                                if action is Action.IMPRESSION})
    for sample in samples:
        t = to_us(sample["impression_time"])
        assert all(x < t for x in sample["seq_times_us"])
        expected = sorted(T0_US + at * 1_000_000 for _, at, _ in interactions
                          if T0_US + at * 1_000_000 < t)
        assert sample["seq_times_us"] == expected


def item(item_id: str, content_time_us: int | None, first_seen_us: int = T0_US) -> ItemState:
    return ItemState(item_id, "coat", "acme", "shop1", price_bucket(40.0), first_seen_us,
                     first_seen_us, encoder_version="enc-1", content_hash="h1",
                     content_time_us=content_time_us)


def test_item_features_never_come_from_the_future(tmp_path: Path) -> None:
    impression_us = T0_US + 100_000_000
    items = {"later": item("later", impression_us + 1),
             "ready": item("ready", impression_us, first_seen_us=T0_US - 3_600_000_000)}
    writer = writer_for(tmp_path, items=items)
    writer.process([behavior("impression", 100, item=i) for i in ("later", "ready", "unknown")])
    writer.close_all()

    samples = by_key(tmp_path)
    later = samples["u1", "later", "r1", 100]
    assert (later["item_encoder_version"], later["item_content_hash"]) == (None, None)
    assert (later["item_category"], later["item_brand"], later["item_shop"]) == (
        "coat", "acme", "shop1")
    assert later["item_price_bucket"] == price_bucket(40.0)
    ready = samples["u1", "ready", "r1", 100]
    assert (ready["item_encoder_version"], ready["item_content_hash"]) == ("enc-1", "h1")
    assert ready["item_first_seen_us"] == T0_US - 3_600_000_000
    assert ready["item_age_s"] == 3700.0
    unknown = samples["u1", "unknown", "r1", 100]
    assert [unknown[c] for c in ("item_encoder_version", "item_category", "item_price_bucket",
                                 "item_first_seen_us", "item_age_s")] == [None] * 5
    assert unknown["item_clicks_before"] == 0


def test_item_clicks_before_counts_earlier_clicks_once(tmp_path: Path) -> None:
    writer = writer_for(tmp_path)
    writer.process([
        behavior("click", 10, user="a"),
        behavior("click", 10, user="a"),  # the same click delivered twice
        behavior("click", 20, user="b"),
        behavior("order", 25, user="b"),  # not a click
        behavior("click", 30, user="c"),  # at the impression's time: not before it
        behavior("impression", 30, user="d"),
    ])
    writer.close_all()
    assert by_key(tmp_path)["d", "i1", "r1", 30]["item_clicks_before"] == 2


# ---------------------------------------------------------------------------- windows


def test_window_closes_only_after_its_end_plus_the_attribution_window(tmp_path: Path) -> None:
    writer = writer_for(tmp_path)
    assert writer.process([behavior("impression", 100), behavior("click", 200)]) == []
    assert writer.process([tick(3600 + W - 1e-6)]) == []
    assert not (TrainingLogDir(tmp_path).windows / "20260101T000000Z.parquet").exists()

    closed = writer.process([tick(3600 + W)])
    path = TrainingLogDir(tmp_path).windows / "20260101T000000Z.parquet"
    assert closed == [ClosedWindow(T0_US, T0_US + HOUR_US, path, 1)]
    table = pq.read_table(path)
    assert table.schema == SCHEMA
    [row] = table.to_pylist()
    assert (row["sample_id"], row["click"]) == (f"r1:i1:{T0_US + 100_000_000}", 1)
    assert to_us(row["window_start"]) == T0_US
    manifest = json.loads(TrainingLogDir(tmp_path).manifest.read_text())
    assert manifest == [{"start": "2026-01-01T00:00:00.000000Z",
                         "end": "2026-01-01T01:00:00.000000Z",
                         "path": "20260101T000000Z.parquet", "samples": 1,
                         "closed_at_watermark": "2026-01-01T01:30:00.000000Z"}]
    assert writer.watermark_us == T0_US + HOUR_US + 1_800_000_000


def test_empty_windows_are_written_so_the_sequence_has_no_gaps(tmp_path: Path) -> None:
    writer = writer_for(tmp_path)
    writer.process([behavior("impression", 0)])
    closed = writer.process([tick(3 * 3600 + W)])
    assert [(w.start_us - T0_US) // HOUR_US for w in closed] == [0, 1, 2]
    assert [w.samples for w in closed] == [1, 0, 0]
    assert all(pq.read_table(w.path).schema == SCHEMA for w in closed)
    manifest = json.loads(TrainingLogDir(tmp_path).manifest.read_text())
    assert [m["end"] for m in manifest[:-1]] == [m["start"] for m in manifest[1:]]


def test_window_file_depends_on_its_samples_not_their_arrival(tmp_path: Path) -> None:
    one, other = writer_for(tmp_path / "one"), writer_for(tmp_path / "other")
    # The impression at 100 s is final on arrival in "one", after the one at 500 s.
    for batch in ([behavior("impression", 500), tick(500 + W)], [behavior("impression", 100)],
                  [tick(3600 + W)]):
        one.process(batch)
    for batch in ([behavior("impression", 100), behavior("impression", 500)], [tick(500 + W)],
                  [tick(3600 + W)]):
        other.process(batch)
    name = "20260101T000000Z.parquet"
    assert (TrainingLogDir(tmp_path / "one").windows / name).read_bytes() == (
        TrainingLogDir(tmp_path / "other").windows / name).read_bytes()


def test_closing_a_window_again_changes_nothing(tmp_path: Path) -> None:
    first = writer_for(tmp_path)
    first.process([behavior("impression", 0), behavior("click", 60)])
    state = first.state_dict()
    first.process([tick(3600 + W)])
    before = snapshot(tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in TrainingLogDir(tmp_path).windows.iterdir()}

    again = writer_for(tmp_path)  # e.g. restarted from the older checkpoint
    again.load_state_dict(state)
    [window] = again.process([tick(3600 + W)])
    assert window.samples == 1
    assert snapshot(tmp_path) == before
    assert {p: p.stat().st_mtime_ns for p in TrainingLogDir(tmp_path).windows.iterdir()} == stamps
    assert again.counters["windows_already_recorded"] == 1


# ---------------------------------------------------------------------------- late data, duplicates


def test_late_impression_goes_to_the_earliest_open_window(tmp_path: Path) -> None:
    writer = writer_for(tmp_path)
    writer.process([behavior("impression", 0, request="r0")])
    writer.process([tick(3600 + W)])  # closes window 0
    writer.process([behavior("impression", 100, request="late"),
                    behavior("click", 120, request="late")])
    writer.close_all()

    late = by_key(tmp_path)["u1", "i1", "late", 100]
    assert to_us(late["window_start"]) == T0_US + HOUR_US
    assert to_us(late["impression_time"]) == T0_US + 100_000_000
    assert late["click"] == 1  # its follow-up came with it
    assert writer.counters["late_impressions"] == 1
    assert_balanced(writer)


def test_late_follow_up_goes_to_late_events(tmp_path: Path) -> None:
    writer = writer_for(tmp_path)
    writer.process([behavior("impression", 0)])
    writer.process([tick(W + 200)])  # the impression is final
    click = behavior("click", 100)
    writer.process([click])
    writer.close_all()

    assert by_key(tmp_path)["u1", "i1", "r1", 0]["click"] == 0
    [line] = late_lines(tmp_path)
    assert line["reason"] == LATE
    assert BehaviorEvent.model_validate(line["event"]) == click
    assert writer.counters["late_events"] == 1
    assert_balanced(writer)


def test_duplicates_make_no_second_sample_or_label(tmp_path: Path) -> None:
    writer = writer_for(tmp_path)
    impression, click = behavior("impression", 0), behavior("click", 10)
    writer.process([impression, impression, click])
    writer.process([impression, click, click])
    writer.close_all()

    [sample] = read_samples(tmp_path)
    assert sample["click"] == 1
    c = writer.counters
    assert (c["impressions"], c["duplicate_impressions"]) == (1, 2)
    assert (c["followups"], c["duplicate_followups"], c["attributed_followups"]) == (1, 2, 1)
    assert late_lines(tmp_path) == []


def test_a_repeated_impression_is_dropped_however_late_it_comes(tmp_path: Path) -> None:
    writer = writer_for(tmp_path)
    impression = behavior("impression", 0)
    writer.process([impression])
    writer.process([tick(3600 + W)])  # window 0 closed
    writer.process([impression])
    assert writer.counters["duplicate_impressions"] == 1
    writer.process([tick(2 * 3600 + W)])  # window 1 closed: window 0's ids are forgotten...
    writer.process([impression])  # ...and window 0's file is looked up instead
    c = writer.counters
    assert (c["already_recorded_impressions"], c["late_impressions"]) == (1, 0)
    writer.close_all()
    assert len(read_samples(tmp_path)) == 1


def test_tags_are_done_only_when_their_samples_are_in_written_windows(tmp_path: Path) -> None:
    writer = writer_for(tmp_path)
    writer.process([behavior("impression", 10), behavior("impression", 20, item="i2")],
                   tags=["page", "page"])
    writer.process([behavior("click", 30)], tags=["click"])
    writer.process([behavior("click", 40, item="nothing")], tags=["stray"])
    writer.process([tick(W + 100)], tags=["tick1"])
    # Final (labelled) but window 0 is still open: in memory only, not done; the stray
    # click is in late_events.jsonl, done.
    assert writer.take_done() == ["stray"]
    # A late impression (its window closes below) waits for the window it is put in.
    writer.process([tick(3600 + W)], tags=["tick2"])
    done = writer.take_done()
    assert {"page", "click", "tick1"} <= set(done)  # window 0 is written
    writer.process([behavior("impression", 50, user="late")], tags=["late"])
    assert writer.counters["late_impressions"] == 1  # in window 1, still open
    assert "late" not in writer.take_done()
    writer.process([tick(2 * 3600 + W)], tags=["tick3"])
    assert "late" in writer.take_done()  # window 1 (where it went) is written now
    late = [s for s in read_samples(tmp_path) if s["user_id"] == "late"]
    assert len(late) == 1
    writer.close_all()
    assert writer._outstanding == {}


def test_a_replayed_follow_up_of_a_written_sample_is_not_a_late_event(tmp_path: Path) -> None:
    first = writer_for(tmp_path)
    batch = [behavior("impression", 10), behavior("click", 20), tick(3600 + W)]
    first.process(batch)  # window 0 written, its sample labelled
    again = writer_for(tmp_path)  # e.g. the partition's next owner, replaying
    again.process(batch, tags=["imp", "click", "tick"])
    again.close_all()
    assert late_lines(tmp_path) == []
    assert again.counters["already_recorded_followups"] == 1
    assert set(again.take_done()) == {"imp", "click", "tick"}
    assert_balanced(again)
    late = writer_for(tmp_path / "late")  # a click that truly comes too late is still logged
    late.process([behavior("impression", 10), tick(3600 + W)])
    late.process([behavior("click", 20)])
    assert [line["reason"] for line in late_lines(tmp_path / "late")] == [LATE]


def test_a_new_writer_on_recorded_windows_continues_after_them(tmp_path: Path) -> None:
    """A restarted worker, or a partition that moved: replayed events that are already in
    recorded windows (late ones included) are not written twice, the rest is written."""
    events = [behavior("impression", at, item=f"i{at}") for at in range(0, 3 * 3600, 600)]
    late = behavior("impression", 300, item="late")  # arrives after window 0 closed
    first = writer_for(tmp_path)
    first.process(events[:10])  # up to 1:30: window 0 closes
    first.process([late])
    first.process(events[10:])
    assert first.counters["late_impressions"] == 1
    recorded = {s["sample_id"] for s in read_samples(tmp_path)}
    assert recorded and len(first._manifest) == 2
    # The replay starts somewhere before the end of what was recorded.
    again = writer_for(tmp_path)
    again.process(events[7:10], tags=[1, 2, 3])
    again.process([late], tags=[4])
    again.process(events[10:], tags=list(range(5, 5 + len(events[10:]))))
    again.close_all()
    assert again.counters["already_recorded_impressions"] >= 3
    assert set(again.take_done()) == set(range(1, 5 + len(events[10:])))
    ids = [s["sample_id"] for s in read_samples(tmp_path)]
    assert len(ids) == len(set(ids)) == len(events) + 1


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(list(Action)), st.integers(0, 7199),
                       st.sampled_from(["u1", "u2"]), st.sampled_from(["i1", "i2"]),
                       st.sampled_from(["r1", "r2"])), min_size=1, max_size=60),
    st.lists(st.integers(1, 20), min_size=1, max_size=10),
)
def test_nothing_is_lost_in_any_arrival_order(
        tmp_path_factory: pytest.TempPathFactory,
        raw: list[tuple[Action, int, str, str, str]], cuts: list[int]) -> None:
    events = [behavior(a, at, user=u, item=i, request=r) for a, at, u, i, r in raw]
    out = tmp_path_factory.mktemp("log")
    writer = writer_for(out)
    start = 0
    for size in [*cuts, len(events)]:
        writer.process(events[start:start + size])
        assert_balanced(writer)
        start += size
    writer.close_all()
    assert_balanced(writer)

    c = writer.counters
    assert c["pending_impressions"] == c["unresolved_followups"] == 0
    samples = read_samples(out)
    ids = [s["sample_id"] for s in samples]
    assert len(ids) == len(set(ids)) == c["samples_logged"]
    # The times span two windows, so every id is still remembered: exact dedup.
    assert len(ids) == len({(r, i, at) for a, at, _, i, r in raw if a is Action.IMPRESSION})
    assert len(late_lines(out)) == c["late_events"]
    labels = sum(s["click"] + s["order"] + s["collect"] for s in samples)
    assert labels <= c["attributed_followups"]


# ---------------------------------------------------------------------------- simulated, restore


@pytest.fixture(scope="module")
def stream() -> tuple[list[list[BehaviorEvent]], list[dict[str, UserSequence]],
                      dict[str, ItemState]]:
    """A small simulated day in batches of 100, with late and repeated events mixed in,
    plus the sequences mapping as the caller has it at each batch."""
    config = SimulatorConfig(n_users=100, days=1, initial_items=50, items_per_day=50)
    items: dict[str, ItemState] = {}
    behaviors: list[BehaviorEvent] = []
    for event in ShopSimulator(config).events():
        if isinstance(event, ItemEvent):
            if event.op is ItemOp.UPSERT:
                t = to_us(event.event_time)
                first = items[event.item_id].first_seen_us if event.item_id in items else t
                items[event.item_id] = ItemState(
                    event.item_id, event.category, event.brand, event.shop,
                    price_bucket(event.price), first, t, encoder_version="enc-1",
                    content_hash=f"h-{t}", content_time_us=t + 60_000_000)
        else:
            behaviors.append(event)
    batches = [behaviors[i:i + 100] for i in range(0, len(behaviors), 100)]
    early = next(e for e in batches[1] if e.action is Action.IMPRESSION)
    batches[6] += [
        early.model_copy(update={"request_id": "late-request"}),  # a late impression
        early.model_copy(update={"action": Action.CLICK,  # a late click
                                 "event_time": early.event_time + timedelta(seconds=60)}),
        # Redelivered: an impression from the batch before, two events of this batch.
        [e for e in batches[5] if e.action is Action.IMPRESSION][-1], batches[6][0], batches[6][1],
    ]
    sequences: dict[str, UserSequence] = {}
    builder = SequenceBuilder(ListSink(), sequences)
    views = []
    for batch in batches:
        builder.process(batch)
        views.append(dict(sequences))
    return batches, views, items


def run(writer: TrainingLogWriter, sequences: dict[str, UserSequence],
        stream: Any, batches: range) -> None:
    all_batches, views, _ = stream
    for n in batches:
        sequences.clear()
        sequences.update(views[n])
        writer.process(all_batches[n])
        assert_balanced(writer)


def run_through(out: Path, sequences: dict[str, UserSequence], stream: Any
                ) -> TrainingLogWriter:
    """A writer into ``out`` that processed every batch without a break, all closed: what a
    restored or replayed writer must match."""
    writer = TrainingLogWriter(out, sequences, stream[2], W, 3600.0)
    run(writer, sequences, stream, range(len(stream[0])))
    writer.close_all()
    return writer


def test_simulated_day_logs_every_impression_once(tmp_path: Path, stream: Any) -> None:
    batches, _, items = stream
    sequences: dict[str, UserSequence] = {}
    writer = TrainingLogWriter(tmp_path, sequences, items, W, 3600.0)
    run(writer, sequences, stream, range(len(batches)))
    writer.close_all()

    c = writer.counters
    distinct = {(e.request_id, e.item_id, to_us(e.event_time))
                for batch in batches for e in batch if e.action is Action.IMPRESSION}
    samples = read_samples(tmp_path)
    assert len(samples) == len(distinct) == c["impressions"] == c["samples_logged"]
    assert len({s["sample_id"] for s in samples}) == len(samples)
    assert (c["late_impressions"], c["late_events"]) == (1, 1)
    assert c["duplicate_impressions"] + c["duplicate_followups"] == 3
    assert sum(s["click"] for s in samples) > 0
    manifest = json.loads(TrainingLogDir(tmp_path).manifest.read_text())
    assert sum(m["samples"] for m in manifest) == len(samples)
    assert [m["end"] for m in manifest[:-1]] == [m["start"] for m in manifest[1:]]


def test_restored_writer_writes_identical_files(tmp_path: Path, stream: Any) -> None:
    batches, _, items = stream
    sequences: dict[str, UserSequence] = {}
    straight = run_through(tmp_path / "straight", sequences, stream)

    first = TrainingLogWriter(tmp_path / "first", sequences, items, W, 3600.0)
    run(first, sequences, stream, range(4))
    state = json.loads(json.dumps(first.state_dict()))
    shutil.copytree(tmp_path / "first", tmp_path / "restored")  # the checkpoint's files
    restored = TrainingLogWriter(tmp_path / "restored", sequences, items, W, 3600.0)
    restored.load_state_dict(state)
    run(restored, sequences, stream, range(4, len(batches)))
    restored.close_all()

    assert snapshot(tmp_path / "restored") == snapshot(tmp_path / "straight")
    assert restored.counters == straight.counters


def test_replay_after_a_crash_rewrites_nothing_and_duplicates_nothing(
        tmp_path: Path, stream: Any) -> None:
    batches, _, items = stream
    sequences: dict[str, UserSequence] = {}
    run_through(tmp_path / "straight", sequences, stream)

    # Checkpoint after batch 3, then windows and late events written up to batch 7, then a crash.
    crashed = TrainingLogWriter(tmp_path / "log", sequences, items, W, 3600.0)
    run(crashed, sequences, stream, range(4))
    state = json.loads(json.dumps(crashed.state_dict()))
    run(crashed, sequences, stream, range(4, 8))
    assert crashed.counters["late_events"] > state["counters"]["late_events"]
    assert crashed.counters["windows_closed"] > state["counters"]["windows_closed"]
    written = {p: p.stat().st_mtime_ns
               for p in TrainingLogDir(tmp_path / "log").windows.glob("*.parquet")}

    rerun = TrainingLogWriter(tmp_path / "log", sequences, items, W, 3600.0)
    rerun.load_state_dict(state)
    run(rerun, sequences, stream, range(4, len(batches)))
    rerun.close_all()

    assert snapshot(tmp_path / "log") == snapshot(tmp_path / "straight")
    assert {p: p.stat().st_mtime_ns for p in written} == written
    assert rerun.counters["windows_already_recorded"] > 0


def test_rejects_settings_it_cannot_honour(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whole number"):
        TrainingLogWriter(tmp_path, {}, {}, window_s=1.5)
    state = writer_for(tmp_path).state_dict()
    other = TrainingLogWriter(tmp_path, {}, {}, attribution_window_s=60.0)
    with pytest.raises(ValueError, match="attribution window"):
        other.load_state_dict(state)
