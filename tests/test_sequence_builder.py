"""SequenceBuilder: last-K interactions (and last-M impressions) in event-time order,
batched writes, retry-safe."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppm.clock import to_us
from ppm.config import Config
from ppm.events import Action, BehaviorEvent
from ppm.records import UserSequence
from streams.sequence_builder import SequenceBuilder

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def ev(user: str, item: str, action: str, seconds: float) -> BehaviorEvent:
    return BehaviorEvent(user_id=user, item_id=item, action=Action(action),
                         event_time=T0 + timedelta(seconds=seconds), request_id="r")


class Collect:
    def __init__(self):
        self.calls: list[list[UserSequence]] = []

    def write_sequences(self, sequences):
        self.calls.append(list(sequences))


def test_keeps_last_k_interactions_and_skips_impressions():
    sink = Collect()
    builder = SequenceBuilder(sink, k=3)
    events = [ev("u", f"i{n}", "click", n) for n in range(5)] + [ev("u", "x", "impression", 9)]
    changed = builder.process(events)
    assert len(sink.calls) == 1 and changed == sink.calls[0]
    seq = builder.state["u"]
    assert seq.item_ids == ("i2", "i3", "i4") and seq.actions == ("click",) * 3
    assert seq.times_us == tuple(to_us(T0 + timedelta(seconds=n)) for n in (2, 3, 4))


def test_with_sequence_impressions_the_last_m_impressions_are_kept_beside_the_interactions():
    cfg = Config().with_values({"features.sequence_length": 2,
                                "features.sequence_impressions": 3})
    sink = Collect()
    builder = SequenceBuilder.of(cfg, sink)
    events = [ev("u", f"i{n}", "impression", n) for n in range(6)]
    events += [ev("u", f"i{n}", "click", n + 0.5) for n in (0, 2, 4)]  # some shown are taken
    builder.process(events)
    seq = builder.state["u"]
    # The last two interactions and the last three impressions, in event-time order.
    assert list(zip(seq.item_ids, seq.actions, strict=True)) == [
        ("i2", "click"), ("i3", "impression"), ("i4", "impression"), ("i4", "click"),
        ("i5", "impression")]
    assert seq.kept(2, 0).actions == ("click", "click")  # what a model of none reads
    # One more impression pushes out the oldest impression only.
    builder.process([ev("u", "i6", "impression", 7)])
    assert builder.state["u"].item_ids == ("i2", "i4", "i4", "i5", "i6")
    assert SequenceBuilder.of(Config(), Collect()).process(
        [ev("u", "x", "impression", 1)]) == []  # the default keeps none


def test_late_event_is_inserted_in_place_and_duplicates_change_nothing():
    sink = Collect()
    builder = SequenceBuilder(sink)
    builder.process([ev("u", "a", "click", 10), ev("u", "c", "order", 30)])
    builder.process([ev("u", "b", "collect", 20)])
    assert builder.state["u"].item_ids == ("a", "b", "c")
    assert builder.process([ev("u", "b", "collect", 20)]) == []  # at-least-once redelivery
    assert len(sink.calls) == 2


def test_only_changed_users_are_written_in_one_batch():
    sink = Collect()
    builder = SequenceBuilder(sink)
    builder.process([ev("u1", "a", "click", 1), ev("u2", "b", "click", 2),
                     ev("u3", "c", "impression", 3)])
    assert {s.user_id for s in sink.calls[0]} == {"u1", "u2"}


def test_state_is_untouched_when_the_write_fails():
    class Broken:
        def write_sequences(self, sequences):
            raise ConnectionError("down")

    builder = SequenceBuilder(Broken())
    with pytest.raises(ConnectionError):
        builder.process([ev("u", "a", "click", 1)])
    assert builder.state == {}
    builder.sink = Collect()
    assert len(builder.process([ev("u", "a", "click", 1)])) == 1  # the retry still writes


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.sampled_from(["click", "order", "collect",
                                                               "impression"])),
                max_size=40), st.integers(1, 10), st.integers(0, 4), st.integers(0, 60))
def test_sequence_is_sorted_bounded_and_cut_by_before(times, k, m, cut):
    builder = SequenceBuilder(Collect(), k=k, impressions=m)
    builder.process([ev("u", f"i{n}", a, t) for n, (t, a) in enumerate(times)])
    seq = builder.state.get("u", UserSequence("u"))
    shown = sum(a == "impression" for a in seq.actions)
    assert shown <= m and len(seq.item_ids) - shown <= k
    assert list(seq.times_us) == sorted(seq.times_us)
    # Each kind keeps its latest: none of a kind left out is later than one kept.
    for kind, cap in ((True, m), (False, k)):
        kept = [t for t, a in zip(seq.times_us, seq.actions, strict=True)
                if (a == "impression") == kind]
        sent = sorted(to_us(T0 + timedelta(seconds=t)) for t, a in times
                      if (a == "impression") == kind)
        assert len(kept) == min(len(sent), cap)  # as many as the cap allows
        assert kept == sent[len(sent) - len(kept):]
    early = seq.before(to_us(T0 + timedelta(seconds=cut)))
    assert all(t < to_us(T0 + timedelta(seconds=cut)) for t in early.times_us)
    assert seq.times_us[: len(early.times_us)] == early.times_us


def test_sequences_round_trip_through_feast(online):
    builder = SequenceBuilder(online, k=50)
    builder.process([ev("u1", "a", "click", 1), ev("u1", "b", "order", 2),
                     ev("u2", "c", "collect", 3)])
    builder.process([ev("u1", "z", "click", 0.5)])  # late: same newest time, still written
    got = online.read_sequences(["u1", "u2", "nobody"])
    assert set(got) == {"u1", "u2"}
    assert got["u1"] == builder.state["u1"] and got["u1"].item_ids == ("z", "a", "b")
