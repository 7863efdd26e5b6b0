"""The event contracts and the decoder: any bytes in, an event or a dead letter out."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin
from pydantic import ValidationError

from ppm import events
from ppm.config import ContractConfig, KafkaConfig
from ppm.events import (
    Action,
    BehaviorEvent,
    DeadLetter,
    ItemEvent,
    ItemOp,
    check_inline_image,
    decode,
    decode_record,
    format_event_time,
)
from streams.sources.hostile import (
    gif_claiming,
    jpeg_claiming,
    png_claiming,
    tiff_claiming,
    webp_claiming,
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


# ---------------------------------------------------------------- image bombs
# Tiny files whose headers claim huge pictures (streams.sources.hostile makes them). Each is a valid
# small picture at 8x8, so a dead letter at a larger size is the size check speaking.


CLAIMING = {"png": png_claiming, "gif": gif_claiming, "jpeg": jpeg_claiming,
            "tiff": tiff_claiming, "webp": webp_claiming}


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


@pytest.mark.parametrize("fmt", CLAIMING)
def test_small_crafted_pictures_are_accepted(fmt):
    assert isinstance(dec(item_dict(image=data_url(CLAIMING[fmt](8, 8), fmt))), ItemEvent)


@pytest.mark.parametrize("fmt", CLAIMING)
def test_a_header_claiming_billions_of_pixels_is_a_dead_letter(fmt):
    # Beyond twice Pillow's MAX_IMAGE_PIXELS, where Image.open raises DecompressionBombError.
    side = 16_383 if fmt == "webp" else 65_500
    raw = json.dumps(item_dict(image=data_url(CLAIMING[fmt](side, side), fmt))).encode()
    assert len(raw) < 2_000  # a small record, a huge claim
    for out in (decode(raw, "item", "t", now=NOW), *decode_record(raw, "item", "t", now=NOW)):
        assert isinstance(out, DeadLetter) and out.reason.startswith("image: ")
        assert "more than 40000000 pixels (DecompressionBombError)" in out.reason
        assert out.raw() == raw


@pytest.mark.parametrize("fmt", ["png", "gif", "jpeg", "tiff"])
@pytest.mark.parametrize("side", [7_000, 10_000])  # under and over Pillow's warning limit
def test_a_header_over_max_pixels_is_a_dead_letter(fmt, side, recwarn):
    out = dec(item_dict(image=data_url(CLAIMING[fmt](side, side), fmt)))
    assert isinstance(out, DeadLetter)
    assert f"image of {side}x{side} has more than 40000000 pixels" in out.reason
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_max_pixels_is_the_callers():
    raw = json.dumps(item_dict(image=png_data_url(size=8))).encode()
    assert isinstance(decode(raw, "item", "t", max_pixels=64), ItemEvent)
    out = decode(raw, "item", "t", max_pixels=63)
    assert isinstance(out, DeadLetter) and "8x8 has more than 63 pixels" in out.reason


def test_formats_outside_the_common_ones_are_not_decoded():
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PPM")  # Pillow reads it, but not from the wire
    out = dec(item_dict(image=data_url(buf.getvalue())))
    assert isinstance(out, DeadLetter)
    assert "not a readable picture (UnidentifiedImageError)" in out.reason


@pytest.mark.parametrize("where", ["open", "verify"])
def test_any_exception_from_pillow_is_a_bad_picture(monkeypatch, where):
    class Surprise(Exception):
        pass

    def boom(*args, **kwargs):
        raise Surprise("decoder bug")

    if where == "open":
        monkeypatch.setattr(Image, "open", boom)
    else:
        monkeypatch.setattr(PngImagePlugin.PngImageFile, "verify", boom)
    with pytest.raises(ValueError, match=r"not a readable picture \(Surprise\)"):
        check_inline_image(png_data_url(), ContractConfig(), 4_000_000)
    out = dec(item_dict())
    assert isinstance(out, DeadLetter) and "(Surprise)" in out.reason


# ---------------------------------------------------------------- lone surrogates


def assert_serialises(letter: DeadLetter) -> None:
    wire = letter.to_json()
    wire.decode("utf-8")  # strict
    assert DeadLetter.model_validate_json(wire) == letter


@pytest.mark.parametrize(("obj", "expected", "where"), [
    (item_dict(title="coat \ud800"), "item", "title: not valid Unicode"),
    (item_dict(item_id="i\udfff"), "item", "item_id: not valid Unicode"),
    (behavior_dict(query="\udc80 coat"), "behavior", "query: not valid Unicode"),
    (behavior_dict(user_id="\ud83d"), "behavior", "user_id: not valid Unicode"),
    (item_dict(**{"colour\ud800": "red"}), "item", "event: a key is not valid Unicode"),
    (item_dict(extra={"tags": ["ok", "\udbff"]}), "item", "extra.tags.1: not valid Unicode"),
    (item_dict(extra={"\ud800": 1}), "item", "extra: a key is not valid Unicode"),
])
def test_a_lone_surrogate_anywhere_is_a_dead_letter(obj, expected, where):
    raw = json.dumps(obj).encode()  # ensure_ascii: the surrogate travels as a \u escape
    out = decode(raw, expected, "t", now=NOW)
    assert isinstance(out, DeadLetter) and out.reason.startswith(where), out
    assert out.raw() == raw
    assert_serialises(out)


def test_a_surrogate_escape_in_upper_case_is_found_too():
    raw = json.dumps(item_dict(title="x\ud800")).encode().replace(b"\\ud800", b"\\uD800")
    out = decode(raw, "item", "t", now=NOW)
    assert isinstance(out, DeadLetter) and "title: not valid Unicode" in out.reason


def test_an_escaped_surrogate_pair_is_a_character():
    raw = json.dumps(item_dict(title="coat \U0001f600")).encode()
    assert b"\\ud83d\\ude00" in raw
    out = decode(raw, "item", "t", now=NOW)
    assert isinstance(out, ItemEvent) and out.title == "coat \U0001f600"


def test_a_surrogate_in_a_packed_element_costs_only_that_element():
    page = [behavior_dict(item_id=f"i{n}") for n in range(3)]
    page[1]["query"] = "\ud800"
    out = decode_record(json.dumps(page).encode(), "behavior", "b:0:1", now=NOW)
    assert [type(e) for e in out] == [BehaviorEvent, DeadLetter, BehaviorEvent]
    bad = out[1]
    assert bad.source == "b:0:1[1]" and bad.reason.startswith("query: not valid Unicode")
    assert json.loads(bad.raw()) == page[1]  # \u-escaped, the same JSON value
    assert_serialises(bad)


def test_a_str_record_holding_a_surrogate_is_not_utf8():
    out = decode('{"item_id": "\ud800"}', "item", "t", now=NOW)
    assert isinstance(out, DeadLetter) and out.reason == "payload is not UTF-8"
    assert out.raw() == '{"item_id": "\ud800"}'.encode("utf-8", "surrogatepass")
    assert_serialises(out)


def test_a_dead_letter_always_serialises_whatever_text_it_is_given():
    letter = DeadLetter(expected="item\ud800", reason="bad \udc80" * 1_000,
                        source="file:caf\udce9.jsonl:3", received_at=NOW, payload="x\ud800",
                        error_type="Oops\ud800")
    assert letter.source == "file:caf\\udce9.jsonl:3" and letter.error_type == "Oops\\ud800"
    assert len(letter.reason) <= 2_000 and letter.reason.endswith("…")
    assert letter.payload_encoding == "base64"
    assert letter.raw() == "x\ud800".encode("utf-8", "surrogatepass")
    assert_serialises(letter)


surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
texts_with_surrogates = st.builds(lambda a, s, b: a + s + b, st.text(max_size=5), surrogates,
                                  st.text(max_size=5))


@settings(max_examples=200, deadline=None)
@given(base=st.sampled_from(["item", "behavior"]), field=field_names | st.text(max_size=5),
       value=texts_with_surrogates, as_key=st.booleans(), packed=st.booleans())
def test_surrogates_anywhere_give_dead_letters_that_serialise(base, field, value, as_key,
                                                              packed):
    obj = item_dict() if base == "item" else behavior_dict()
    if as_key:
        obj[value] = field
    else:
        obj[field] = value
    raw = json.dumps([obj, obj] if packed else obj).encode()
    out = decode_record(raw, base, "fuzz", now=NOW)
    assert len(out) == (2 if packed else 1)
    for got in out:
        assert isinstance(got, DeadLetter)  # a key differing from the first: also a letter
        assert_serialises(got)


# ---------------------------------------------------------------- nothing escapes decode

HOSTILE = [
    b"[" * 100_000,
    b'{"a":' * 100_000,
    b"[" * 100_000 + b"]" * 100_000,
    b'{"item_id": ' + b"9" * 5_000 + b"}",  # over int_max_str_digits
    b'{"position": 1e999999, "user_id": "u"}',
    json.dumps([behavior_dict(extra=json.loads("[" * 900 + "]" * 900))]).encode(),
    json.dumps([behavior_dict(), behavior_dict(user_id=json.loads("[" * 900 + "]" * 900))]
               ).encode(),
    json.dumps(item_dict(title="t" * 2_000_000)).encode(),
    json.dumps(item_dict(item_id="i" * 1_000_000)).encode(),
    json.dumps(item_dict(image="data:image/png;base64," + "A" * 5_000_000)).encode(),
    json.dumps(item_dict(extra={str(n): n for n in range(100_000)})).encode(),
    json.dumps([behavior_dict()] * 2_000).encode(),
    b"\x00" * 1_000,
    b"\xef\xbb\xbf{}",
]


@pytest.mark.parametrize("raw", HOSTILE, ids=lambda raw: raw[:20].decode("latin-1"))
@pytest.mark.parametrize("expected", ["item", "behavior"])
def test_hostile_records_never_raise(raw, expected):
    one = decode(raw, expected, "t", now=NOW)
    many = decode_record(raw, expected, "t", now=NOW)
    for out in (one, *many):
        assert isinstance(out, ItemEvent | BehaviorEvent | DeadLetter)
        if isinstance(out, DeadLetter):
            assert out.reason and not out.reason.startswith("internal"), out.reason
            assert_serialises(out.capped(KafkaConfig().dead_letter_max_bytes))


@pytest.mark.parametrize("raw", [None, 42, b"", bytearray(b"{}"), memoryview(b"[1]")])
def test_odd_values_never_raise(raw):
    for out in (decode(raw, "item", "t", now=NOW), *decode_record(raw, "item", "t", now=NOW)):
        assert isinstance(out, DeadLetter) and out.reason
        assert_serialises(out)


def test_an_unforeseen_exception_becomes_an_internal_dead_letter(monkeypatch):
    raw = json.dumps(item_dict()).encode()
    monkeypatch.setattr(events, "_load", lambda *a: 1 / 0)
    for out in (decode(raw, "item", "t", now=NOW), *decode_record(raw, "item", "t", now=NOW)):
        assert isinstance(out, DeadLetter) and out.raw() == raw
        assert out.reason.startswith("internal decode error: ZeroDivisionError: ")
        assert out.error_type == "ZeroDivisionError" and out.stage == "decode"


def test_an_unforeseen_exception_in_one_element_costs_only_that_element(monkeypatch):
    real = BehaviorEvent.model_validate.__func__

    def picky(cls, obj, *args, **kwargs):
        if obj.get("item_id") == "poison":
            raise KeyError("surprise")
        return real(cls, obj, *args, **kwargs)

    monkeypatch.setattr(BehaviorEvent, "model_validate", classmethod(picky))
    page = [behavior_dict(), behavior_dict(item_id="poison"), behavior_dict(item_id="i2")]
    out = decode_record(json.dumps(page).encode(), "behavior", "t", now=NOW)
    assert [type(e) for e in out] == [BehaviorEvent, DeadLetter, BehaviorEvent]
    assert out[1].reason == "internal decode error: KeyError: 'surprise'"
    assert out[1].error_type == "KeyError" and json.loads(out[1].payload) == page[1]


hostile_fragments = st.sampled_from([
    "[", "]", "{", "}", ",", ":", '"', '"\\ud800"', '"\\uDFFF"', '"\\ud83d\\ude00"', "\\",
    '"item_id"', '"user_id"', '"title"', '"kind"', '"u1"', '"2026-01-01T00:00:00Z"',
    "1" * 5_000, "1e999", "-0", "NaN", "true", "null", "\x00", "\u2028",
])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(hostile_fragments | st.text(max_size=5), max_size=40),
       prefix=st.sampled_from(["", "[", "{", json.dumps(behavior_dict())[:-1] + ","]),
       expected=st.sampled_from(["item", "behavior"]))
def test_hostile_json_never_raises_and_every_letter_serialises(parts, prefix, expected):
    raw = (prefix + "".join(parts)).encode("utf-8", "surrogatepass")
    for out in (decode(raw, expected, "fuzz"), *decode_record(raw, expected, "fuzz")):
        if isinstance(out, DeadLetter):
            assert out.reason and not out.reason.startswith("internal"), out.reason
            assert_serialises(out)
        else:
            out.to_json().decode("utf-8")  # strict: an event holds only valid Unicode


# ---------------------------------------------------------------- dead letters that fit


def test_old_dead_letter_json_still_validates():
    old = (b'{"kind":"dead_letter","expected":"item","reason":"r","source":"s",'
           b'"received_at":"2026-03-01T12:00:00.000000Z","payload":"abc",'
           b'"payload_encoding":"utf-8"}')
    letter = DeadLetter.model_validate_json(old)
    assert letter.stage == "decode" and letter.error_type is None
    assert letter.payload_bytes == 3 and not letter.payload_truncated
    assert letter.payload_sha256 == hashlib.sha256(b"abc").hexdigest()


def test_a_letter_that_fits_is_its_own_capped_copy():
    letter = dec(b"{not json")
    assert letter.capped(1_024) is letter
    assert letter.payload_bytes == 9 and letter.payload_sha256 == hashlib.sha256(
        b"{not json").hexdigest()


def test_the_issues_800kb_record_of_quotes_fits_the_broker():
    raw = b'{"item_id": "' + b'\\"' * 400_000 + b'"'  # 800 KB, 1.6 MB once escaped
    letter = decode(raw, "item", "t", now=NOW)
    assert isinstance(letter, DeadLetter) and len(letter.to_json()) > 1_500_000
    capped = letter.capped(KafkaConfig().dead_letter_max_bytes)
    assert len(capped.to_json()) <= 256_000 and capped.payload_truncated
    assert capped.payload_bytes == len(raw)
    assert capped.payload_sha256 == hashlib.sha256(raw).hexdigest()
    assert raw.startswith(capped.raw()) and len(capped.raw()) > 100_000


def test_capping_shortens_text_only_when_it_would_not_leave_room():
    letter = DeadLetter(expected="item", reason="\x01" * 5_000, source="s" * 5_000,
                        received_at=NOW, payload="p" * 10_000)
    capped = letter.capped(1_024)
    assert len(capped.to_json()) <= 1_024 and capped.reason.endswith("…")
    assert capped.raw() and letter.raw().startswith(capped.raw())
    with pytest.raises(ValueError, match="even without its payload"):
        letter.capped(100)


payloads = st.one_of(
    st.binary(max_size=3_000),
    st.text(max_size=3_000).map(str.encode),
    st.builds(lambda unit, n: unit * n,
              st.sampled_from([b'"', b"\x01", b"\\", b"\x7f", "é".encode(), "😀".encode(),
                               b"\xff", b"a"]),
              st.sampled_from([1, 1_000, 100_000, 800_000])),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(raw=payloads, max_bytes=st.integers(min_value=1_024, max_value=300_000),
       reason=st.sampled_from(["short", "\x01" * 2_000, "\ud800" * 10]))
def test_capped_always_fits_and_keeps_the_whole_records_digest(raw, max_bytes, reason):
    letter = events._DeadLetters("item", "kafka:items/0@1", NOW)(raw, reason)
    capped = letter.capped(max_bytes)
    wire = capped.to_json()
    assert len(wire) <= max_bytes
    assert capped.payload_bytes == len(raw)
    assert capped.payload_sha256 == hashlib.sha256(raw).hexdigest()
    assert raw.startswith(capped.raw())
    assert capped.payload_truncated == (capped.raw() != raw)
    assert DeadLetter.model_validate_json(wire) == capped
    if capped.payload_truncated and capped.reason == letter.reason:
        assert len(wire) > max_bytes - 16  # the longest prefix that fits, give or take a char
        assert capped.capped(max_bytes) is capped


def test_an_element_that_cannot_be_re_encoded_keeps_the_whole_record(monkeypatch):
    page = [behavior_dict(), behavior_dict(position=-1)]
    raw = json.dumps(page).encode()

    def too_deep(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(json, "dumps", too_deep)
    out = decode_record(raw, "behavior", "t", now=NOW)
    assert isinstance(out[1], DeadLetter) and out[1].raw() == raw
    assert out[1].reason.startswith("position:") and "the whole record" in out[1].reason


def test_processing_and_production_failures_are_letters_too():
    letter = DeadLetter(expected="item", reason="image: timed out", source="kafka:items/0@3",
                        received_at=NOW, payload="{}", stage="process",
                        error_type="ImageLoadError")
    assert_serialises(letter)
    with pytest.raises(ValidationError):
        DeadLetter(expected="item", reason="r", source="s", received_at=NOW, payload="",
                   stage="elsewhere")
    with pytest.raises(ValidationError):
        KafkaConfig(dead_letter_max_bytes=1_000)
