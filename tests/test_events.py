"""The event contracts and the decoder: any bytes in, an event or a dead letter out."""

from __future__ import annotations

import base64
import io
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ppm.config import ContractConfig
from ppm.events import (
    Action,
    BehaviorEvent,
    DeadLetter,
    ItemEvent,
    ItemOp,
    decode,
    decode_record,
    format_event_time,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def png_data_url(size: int = 8) -> str:
    buf = io.BytesIO()
    Image.new("L", (size, size), 128).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def item_dict(**overrides) -> dict:
    base = {
        "item_id": "i1",
        "title": "Acme black leather coat",
        "description": "warm",
        "category": "coat",
        "brand": "acme",
        "shop": "s1",
        "price": 49.5,
        "image": png_data_url(),
        "event_time": "2026-01-01T10:00:00Z",
        "op": "upsert",
    }
    return base | overrides


def behavior_dict(**overrides) -> dict:
    base = {
        "user_id": "u1",
        "item_id": "i1",
        "action": "click",
        "event_time": "2026-01-01T10:00:00.5+02:00",
        "request_id": "r1",
        "position": 3,
        "query": "black coat",
    }
    return base | overrides


def dec(obj, expected="item"):
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return decode(raw, expected, "test", now=NOW)


# ---------------------------------------------------------------- valid events


def test_item_round_trip():
    event = dec(item_dict())
    assert isinstance(event, ItemEvent)
    assert event.op is ItemOp.UPSERT and event.price == 49.5
    assert event.event_time == datetime(2026, 1, 1, 10, tzinfo=UTC)
    assert decode(event.to_json(), "item", "again") == event


def test_behavior_time_is_normalised_to_utc():
    event = dec(behavior_dict(), "behavior")
    assert isinstance(event, BehaviorEvent)
    assert event.action is Action.CLICK
    assert event.event_time == datetime(2026, 1, 1, 8, 0, 0, 500_000, tzinfo=UTC)
    assert b'"event_time":"2026-01-01T08:00:00.500000Z"' in event.to_json()
    assert decode(event.to_json(), "behavior", "again") == event


def test_delete_needs_only_id_and_time():
    event = dec({"item_id": "i9", "op": "delete", "event_time": "2026-01-02T00:00:00Z"})
    assert isinstance(event, ItemEvent) and event.op is ItemOp.DELETE and event.title is None


def test_unknown_fields_are_ignored_for_forward_compatibility():
    assert isinstance(dec(item_dict(colour="red")), ItemEvent)


@pytest.mark.parametrize("image", [None, "/srv/img/1.png", "file:///srv/img/1.png",
                                   "https://cdn.example/1.jpg"])
def test_image_references_are_kept_for_later_fetching(image):
    event = dec(item_dict(image=image))
    assert isinstance(event, ItemEvent) and event.image == image


# ---------------------------------------------------------------- dead letters


@pytest.mark.parametrize(
    ("payload", "expected", "reason"),
    [
        (b"{not json", "item", "not JSON"),
        (b"\xff\xfe\x00garbage", "item", "not UTF-8"),
        (b"[1, 2]", "item", "expected a JSON object"),
        (json.dumps(item_dict(title=None)).encode(), "item", "an upsert needs title"),
        (json.dumps(item_dict(category=None, title=None)).encode(), "item", "title, category"),
        (json.dumps(item_dict(price="cheap")).encode(), "item", "price"),
        (json.dumps(item_dict(price=-1)).encode(), "item", "price"),
        (b'{"item_id":"i","title":"t","category":"c","price":NaN,'
         b'"event_time":"2026-01-01T00:00:00Z"}', "item", "price"),
        (json.dumps(item_dict(op="merge")).encode(), "item", "op"),
        (json.dumps(item_dict(event_time="2026-01-01T10:00:00")).encode(), "item", "UTC offset"),
        (json.dumps(item_dict(event_time="yesterday")).encode(), "item", "ISO-8601"),
        (json.dumps(item_dict(event_time=1767225600)).encode(), "item", "ISO-8601"),
        (json.dumps(item_dict(event_time="1970-01-01T00:00:00Z")).encode(), "item", "outside"),
        (json.dumps(item_dict(item_id="")).encode(), "item", "item_id"),
        (json.dumps(item_dict(item_id="a\nb")).encode(), "item", "item_id"),
        (json.dumps(item_dict(title="x" * 20_000)).encode(), "item", "title: longer"),
        (json.dumps(item_dict(image="data:image/png;base64,!!!")).encode(), "item", "base64"),
        (json.dumps(item_dict(image="data:image/png;base64,"
                              + base64.b64encode(b"not a picture").decode())).encode(),
         "item", "not a readable picture"),
        (json.dumps(item_dict(image="data:text/plain;base64,aGk=")).encode(), "item", "inline"),
        (json.dumps(behavior_dict(action="like")).encode(), "behavior", "action"),
        (json.dumps(behavior_dict(position=-1)).encode(), "behavior", "position"),
        (json.dumps(behavior_dict(position=True)).encode(), "behavior", "position"),
        (json.dumps(behavior_dict(position=2.5)).encode(), "behavior", "position"),
        (json.dumps(item_dict(price=True)).encode(), "item", "price"),
        (json.dumps(behavior_dict(request_id=None)).encode(), "behavior", "request_id"),
        (json.dumps(item_dict()).encode(), "behavior", "user_id"),
        (json.dumps(behavior_dict(kind="item")).encode(), "behavior", "kind"),
    ],
)
def test_bad_input_becomes_a_dead_letter_with_a_reason(payload, expected, reason):
    out = decode(payload, expected, "topic/0@7", now=NOW)
    assert isinstance(out, DeadLetter), out
    assert reason in out.reason
    assert out.raw() == payload
    assert out.source == "topic/0@7" and out.received_at == NOW and out.expected == expected


def test_oversized_payload_and_inline_image():
    limits = ContractConfig(max_payload_bytes=1_000)
    out = decode(json.dumps(item_dict()).encode() + b" " * 1_000, "item", "t", limits)
    assert isinstance(out, DeadLetter) and "exceeds 1000" in out.reason
    big = item_dict(image=png_data_url(size=512))
    out = decode(json.dumps(big).encode(), "item", "t", max_image_bytes=100)
    assert isinstance(out, DeadLetter) and "larger than 100 bytes" in out.reason


def test_dead_letter_round_trips_as_json():
    dl = dec(b"\x80binary")
    assert isinstance(dl, DeadLetter) and dl.payload_encoding == "base64"
    again = DeadLetter.model_validate_json(dl.to_json())
    assert again == dl and again.raw() == b"\x80binary"


# ---------------------------------------------------------------- records of several events


def test_a_record_of_one_object_decodes_as_one_event():
    raw = json.dumps(behavior_dict()).encode()
    assert decode_record(raw, "behavior", "t", now=NOW) == [decode(raw, "behavior", "t",
                                                                  now=NOW)]


def test_a_record_array_gives_its_events_in_order_and_its_bad_ones_as_dead_letters():
    page = [behavior_dict(item_id=f"i{n}", action="impression", position=n) for n in range(3)]
    page[1]["position"] = -1
    page.append(behavior_dict(user_id="someone-else"))
    out = decode_record(json.dumps(page).encode(), "behavior", "behaviors:0:7", now=NOW)
    assert [type(e) for e in out] == [BehaviorEvent, DeadLetter, BehaviorEvent, DeadLetter]
    assert [out[0].item_id, out[2].item_id] == ["i0", "i2"]
    bad, foreign = out[1], out[3]
    assert bad.source == "behaviors:0:7[1]" and bad.reason.startswith("position:")
    assert json.loads(bad.payload) == page[1]  # the element, ready to replay on its own
    assert foreign.source.endswith("[3]") and "user_id: differs" in foreign.reason
    assert bad.received_at == foreign.received_at == NOW


@pytest.mark.parametrize("payload, reason", [
    (b"[", "not JSON"),
    (b"[]", "a record holds 1 to 3 events, got 0"),
    (json.dumps([behavior_dict()] * 4).encode(), "a record holds 1 to 3 events, got 4"),
    (json.dumps([behavior_dict(query="q" * 500)] * 3).encode(), "payload of 1"),
])
def test_a_bad_record_array_is_one_dead_letter(payload, reason):
    limits = ContractConfig(max_events_per_record=3, max_payload_bytes=1_000)
    out = decode_record(payload, "behavior", "t", limits, now=NOW)
    assert len(out) == 1 and isinstance(out[0], DeadLetter)
    assert out[0].reason.startswith(reason) and out[0].raw() == payload


def test_elements_that_are_not_objects_are_dead_letters_each():
    out = decode_record(json.dumps([behavior_dict(), 7, None]).encode(), "behavior", "t")
    assert isinstance(out[0], BehaviorEvent)
    assert [d.reason for d in out[1:]] == ["expected a JSON object, got int",
                                           "expected a JSON object, got NoneType"]


# ---------------------------------------------------------------- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(
    ["item_id", "user_id", "title", "category", "price", "event_time", "op", "action",
     "request_id", "position", "image", "kind", "description"]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=2_000), expected=st.sampled_from(["item", "behavior"]))
def test_any_bytes_give_an_event_or_a_dead_letter(raw, expected):
    out = decode(raw, expected, "fuzz")
    assert isinstance(out, ItemEvent | BehaviorEvent | DeadLetter)
    if isinstance(out, DeadLetter):
        assert out.reason and out.raw() == raw


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(elements=st.lists(json_values, min_size=1, max_size=5))
def test_any_array_gives_one_outcome_per_element(elements):
    out = decode_record(json.dumps(elements).encode(), "behavior", "fuzz")
    assert len(out) == len(elements)
    for element, got in zip(elements, out, strict=True):
        if isinstance(got, DeadLetter):
            assert got.reason and json.loads(got.payload) == element


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from(["item", "behavior"]),
    field=field_names,
    value=json_values,
    drop=st.lists(field_names, max_size=3),
)
def test_wrong_types_and_missing_fields_never_raise(base, field, value, drop):
    obj = item_dict() if base == "item" else behavior_dict()
    obj[field] = value
    for name in drop:
        obj.pop(name, None)
    out = decode(json.dumps(obj).encode(), base, "fuzz")
    if isinstance(out, DeadLetter):
        assert out.reason
    else:
        # Whatever got through satisfies the contract and survives its own wire form.
        assert decode(out.to_json(), base, "again") == out


@settings(max_examples=150, deadline=None)
@given(
    item_id=st.text(min_size=1, max_size=128).filter(lambda s: not any(ord(c) < 32 for c in s)),
    title=st.text(min_size=1, max_size=300),
    price=st.floats(min_value=0, max_value=1e9, allow_nan=False),
    when=st.datetimes(min_value=datetime(2000, 1, 2), max_value=datetime(2099, 12, 30),
                      timezones=st.just(UTC)),
    offset_minutes=st.integers(min_value=-12 * 60, max_value=14 * 60),
)
def test_valid_items_round_trip(item_id, title, price, when, offset_minutes):
    local = when.astimezone(timezone(timedelta(minutes=offset_minutes)))
    obj = item_dict(item_id=item_id, title=title, price=price, event_time=local.isoformat())
    out = dec(obj)
    assert isinstance(out, ItemEvent), getattr(out, "reason", out)
    assert out.event_time == when and out.item_id == item_id and out.title == title
    assert decode(out.to_json(), "item", "again") == out
    assert format_event_time(out.event_time).endswith("Z")


@settings(max_examples=50, deadline=None)
@given(n=st.integers(min_value=10_001, max_value=50_000), field=st.sampled_from(
    ["title", "description", "item_id", "brand"]))
def test_huge_strings_are_refused_with_a_reason(n, field):
    out = dec(item_dict(**{field: "x" * n}))
    assert isinstance(out, DeadLetter) and field in out.reason
