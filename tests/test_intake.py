"""Intake: decoding, clock guards and counts, the rules both drivers share."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from ppm.clock import to_us
from ppm.config import Config
from ppm.events import BehaviorEvent, DeadLetter, ItemEvent
from streams.intake import Intake, processing_dead_letter

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def intake(stream_clock: bool = False) -> Intake:
    return Intake(Config(), stream_clock=stream_clock, wall_clock_us=lambda: to_us(NOW))


def item(at: datetime, item_id: str = "i1", op: str = "upsert") -> bytes:
    body = {"kind": "item", "item_id": item_id, "op": op, "event_time": at.isoformat()}
    if op == "upsert":
        body |= {"title": "a coat", "category": "coat"}
    return json.dumps(body).encode()


def behavior(at: datetime, user: str = "u1") -> dict:
    return {"kind": "behavior", "user_id": user, "item_id": "i1", "action": "impression",
            "request_id": "r1", "event_time": at.isoformat()}


def test_a_far_future_item_is_a_dead_letter_and_later_updates_and_deletes_apply() -> None:
    gate = intake()
    [future] = gate.admit("item", item(datetime(2099, 1, 1, tzinfo=UTC)), "items:0:0")
    assert isinstance(future, DeadLetter) and "ahead of when it was received" in future.reason
    [update] = gate.admit("item", item(NOW - timedelta(days=1)), "items:0:1")
    [delete] = gate.admit("item", item(NOW, op="delete"), "items:0:2")
    assert isinstance(update, ItemEvent) and isinstance(delete, ItemEvent)


def test_only_a_driver_of_one_ordered_stream_holds_behaviors_to_its_clock() -> None:
    old = NOW - timedelta(days=30)
    jump = json.dumps(behavior(old + timedelta(days=3))).encode()
    for stream_clock in (False, True):
        gate = intake(stream_clock)
        assert isinstance(gate.admit("item", item(old), "a")[0], ItemEvent)
        assert isinstance(gate.admit("item", item(NOW, "i2"), "b")[0], ItemEvent)  # quiet month
        assert isinstance(gate.admit("behavior", json.dumps(behavior(old)).encode(), "c")[0],
                          BehaviorEvent)
        [after] = gate.admit("behavior", jump, "d")
        if stream_clock:  # the local runner: a replay's wrong timestamp is caught
            assert isinstance(after, DeadLetter) and "ahead of the stream" in after.reason
        else:  # the Faust worker: the same decision whichever worker owns the partition
            assert isinstance(after, BehaviorEvent)


def test_the_kafka_record_time_is_the_reference_but_never_later_than_now() -> None:
    gate = intake()
    two_days = json.dumps(behavior(NOW + timedelta(days=2))).encode()
    assert isinstance(gate.admit("behavior", two_days, "a")[0], DeadLetter)
    # A record timestamp two days ahead (a producer's clock ahead of ours) is not believed.
    later = to_us(NOW + timedelta(days=2))
    assert isinstance(gate.admit("behavior", two_days, "b", received_us=later)[0], DeadLetter)
    earlier = to_us(NOW - timedelta(days=5))
    one_day = json.dumps(behavior(NOW - timedelta(days=3))).encode()
    assert isinstance(gate.admit("behavior", one_day, "c", received_us=earlier)[0], DeadLetter)


def test_a_packed_record_is_admitted_element_by_element_and_counted() -> None:
    gate = intake()
    good = behavior(NOW - timedelta(hours=1))
    record = json.dumps([good, {**good, "query": "\ud800"},
                         {**good, "event_time": "2099-01-01T00:00:00Z"}])
    out = gate.admit("behavior", record.encode(), "behaviors:1:7")
    assert [type(e) for e in out] == [BehaviorEvent, DeadLetter, DeadLetter]
    assert [e.source for e in out[1:]] == ["behaviors:1:7[1]", "behaviors:1:7[2]"]
    assert all(json.loads(e.to_json()) for e in out[1:])
    assert gate.counts == {"records": 1, "behavior_events": 1, "dead_letters:decode": 2}


def test_a_processing_dead_letter_names_the_stage_and_the_exception() -> None:
    event = ItemEvent.model_validate_json(item(NOW))
    letter = processing_dead_letter(event, "items:0:3", "encoder failed: boom", KeyError("x"))
    assert (letter.stage, letter.error_type, letter.source) == ("process", "KeyError",
                                                                 "items:0:3")
    assert ItemEvent.model_validate_json(letter.raw()) == event
    gate = intake()
    gate.count_dead_letter(letter)
    assert gate.dead_letters == 1 and gate.counts["dead_letters:process"] == 1


def test_clocks_and_counts_survive_a_json_round_trip() -> None:
    gate = intake()
    gate.admit("behavior", json.dumps(behavior(NOW)).encode(), "a")
    again = intake()
    again.load_state_dict(json.loads(json.dumps(gate.state_dict())))
    assert again.clock_us == gate.clock_us and again.counts == gate.counts
