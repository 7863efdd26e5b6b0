"""Event contracts: what catalog services and front ends put on the wire, as JSON.

Two events travel through ppm-stream:

* :class:`ItemEvent` (topic ``items``, key ``item_id``): a catalog item was created, changed
  (``op="upsert"``) or withdrawn (``op="delete"``).
* :class:`BehaviorEvent` (topic ``behaviors``, key ``user_id``): a user saw (``impression``),
  clicked, ordered or collected an item.

:func:`decode` turns *any* bytes into either a valid event or a :class:`DeadLetter` that keeps
the raw payload and says in words what was wrong. It never raises, so a stream can always go
on and nothing is dropped silently.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)

from ppm.config import ContractConfig

# Event times outside this range are almost always a unit mix-up (ms vs s) or a sentinel.
# 1990 leaves room for historical logs (MovieLens starts in 1995).
MIN_EVENT_TIME = datetime(1990, 1, 1, tzinfo=UTC)
MAX_EVENT_TIME = datetime(2100, 1, 1, tzinfo=UTC)


def _parse_event_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("not an ISO-8601 timestamp") from None
    else:
        raise ValueError("must be an ISO-8601 string with a UTC offset, e.g. 2026-01-01T12:00:00Z")
    if parsed.tzinfo is not UTC:  # the common spelling ("Z", "+00:00") skips this
        if parsed.tzinfo is None or parsed.utcoffset() is None:
            raise ValueError("timestamp has no UTC offset; add 'Z' or '+00:00'")
        parsed = parsed.astimezone(UTC)
    if not MIN_EVENT_TIME <= parsed < MAX_EVENT_TIME:
        raise ValueError(f"timestamp {parsed.isoformat()} is outside 1990..2100")
    return parsed


def format_event_time(value: datetime) -> str:
    """UTC, microseconds, ``Z`` suffix: one spelling so equal times give equal bytes."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


EventTime = Annotated[
    datetime,
    BeforeValidator(_parse_event_time),
    PlainSerializer(format_event_time, return_type=str, when_used="json"),
]


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")]
Text = Annotated[str, Field(max_length=10_000)]


class ItemOp(StrEnum):
    UPSERT = "upsert"
    DELETE = "delete"


class Action(StrEnum):
    IMPRESSION = "impression"
    CLICK = "click"
    ORDER = "order"
    COLLECT = "collect"


class _Event(BaseModel):
    # Unknown fields are ignored, so producers can add fields before consumers know them.
    model_config = ConfigDict(frozen=True, extra="ignore")

    def to_json(self) -> bytes:
        """The wire form: compact UTF-8 JSON."""
        return self.model_dump_json(exclude_none=True).encode()


class ItemEvent(_Event):
    """A catalog change. ``upsert`` needs title and category; ``delete`` needs only the id.

    ``image`` is a reference, not pixels: a local path, a ``file://`` or ``http(s)://`` URL
    (fetched later with a timeout and a size cap), or inline ``data:image/...;base64,...``.
    Inline images are checked here (decodable, within the size cap); references are checked
    when they are read (see ``encoders.image_source``).
    """

    kind: Literal["item"] = "item"
    item_id: Id
    op: ItemOp = ItemOp.UPSERT
    event_time: EventTime
    title: Annotated[Text, Field(min_length=1)] | None = None
    description: Text | None = None
    category: Id | None = None
    brand: Id | None = None
    shop: Id | None = None
    # strict: a JSON true is not a price of 1.
    price: Annotated[float, Field(ge=0, strict=True), AfterValidator(_finite)] | None = None
    image: str | None = None

    @model_validator(mode="after")
    def _upsert_needs_content(self) -> ItemEvent:
        if self.op is ItemOp.UPSERT:
            missing = [f for f in ("title", "category") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"an upsert needs {', '.join(missing)}")
        return self


class BehaviorEvent(_Event):
    """One user action on one item, as logged by the front end."""

    kind: Literal["behavior"] = "behavior"
    user_id: Id
    item_id: Id
    action: Action
    event_time: EventTime
    request_id: Id
    position: Annotated[int, Field(ge=0, le=100_000, strict=True)] | None = None
    query: Annotated[str, Field(max_length=1_000)] | None = None


Event = ItemEvent | BehaviorEvent
EVENT_TYPES: dict[str, type[ItemEvent] | type[BehaviorEvent]] = {
    "item": ItemEvent,
    "behavior": BehaviorEvent,
}


class DeadLetter(BaseModel):
    """A record that could not become an event. Keeps the payload so it can be replayed.

    ``payload`` is the raw text when it was valid UTF-8; otherwise it is base64 and
    ``payload_encoding`` says so.
    """

    model_config = ConfigDict(frozen=True)

    kind: Literal["dead_letter"] = "dead_letter"
    expected: str
    """The event kind the source promised (``item`` or ``behavior``)."""
    reason: str
    source: str
    """Where the record came from, e.g. ``kafka:items/3@1042`` or ``file:items.jsonl:17``."""
    received_at: EventTime
    payload: str
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"

    def raw(self) -> bytes:
        if self.payload_encoding == "base64":
            return base64.b64decode(self.payload)
        return self.payload.encode()

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


def _describe(error: ValidationError) -> str:
    parts = []
    for err in error.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "event"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def check_inline_image(image: str, limits: ContractConfig, max_image_bytes: int) -> None:
    """Raise ValueError unless a ``data:`` image decodes to a readable picture within limits."""
    header, sep, body = image.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ValueError("inline image must be 'data:image/<type>;base64,<data>'")
    if len(body) > (max_image_bytes * 4) // 3 + 4:
        raise ValueError(f"inline image larger than {max_image_bytes} bytes")
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("inline image is not valid base64") from None
    from PIL import Image, UnidentifiedImageError  # Pillow is heavy-ish; only when needed

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"inline image is not a readable picture ({type(exc).__name__})") from None


def decode(
    raw: bytes | str,
    expected: Literal["item", "behavior"],
    source: str,
    limits: ContractConfig | None = None,
    max_image_bytes: int = 4_000_000,
    now: datetime | None = None,
) -> ItemEvent | BehaviorEvent | DeadLetter:
    """Turn one wire record into an event of the ``expected`` kind, or a dead letter.

    Never raises for any input: every failure comes back as a :class:`DeadLetter` whose
    ``reason`` names the field and the problem.
    """
    limits = limits or ContractConfig()
    data, dead, obj = _load(raw, expected, source, limits, now)
    if isinstance(obj, DeadLetter):
        return obj
    return _validate(obj, expected, lambda reason: dead(data, reason), limits,
                     max_image_bytes)


def decode_record(
    raw: bytes | str,
    expected: Literal["item", "behavior"],
    source: str,
    limits: ContractConfig | None = None,
    max_image_bytes: int = 4_000_000,
    now: datetime | None = None,
) -> list[ItemEvent | BehaviorEvent | DeadLetter]:
    """Turn one Kafka record into its events and dead letters, in order.

    A record holds one event (a JSON object, as :func:`decode`) or several events of one
    key (a JSON array of objects, at most ``limits.max_events_per_record``, and at most
    ``limits.max_payload_bytes`` in all, like any record): a front end sends a result
    page's impressions in one record, for instance. Each element is checked on its own and
    becomes an event or a dead letter (source ``<source>[i]``, payload the element); an
    element whose key field (``user_id``, ``item_id``) differs from the first element's is
    a dead letter too, since the record's key, and so its partition, is the first one's. A
    record that is not such an array at all is one dead letter. Never raises.
    """
    limits = limits or ContractConfig()
    data, dead, elements = _load(raw, expected, source, limits, now)
    if isinstance(elements, DeadLetter):
        return [elements]
    if not isinstance(elements, list):  # one event (or not an event at all)
        return [_validate(elements, expected, lambda reason: dead(data, reason), limits,
                          max_image_bytes)]
    most = limits.max_events_per_record
    if not 1 <= len(elements) <= most:
        return [dead(data, f"a record holds 1 to {most} events, got {len(elements)}")]
    key_field = KEY_FIELDS[expected]
    key = elements[0].get(key_field) if isinstance(elements[0], dict) else None
    out: list[ItemEvent | BehaviorEvent | DeadLetter] = []
    for i, element in enumerate(elements):
        def fail(reason: str, element: Any = element, i: int = i) -> DeadLetter:
            # The element's own JSON is its payload: only a dead letter needs it.
            payload = json.dumps(element, ensure_ascii=False).encode()
            return dead.at(f"{source}[{i}]")(payload, reason)

        if isinstance(element, dict) and element.get(key_field) != key:
            out.append(fail(f"{key_field}: differs from the record's first event "
                            f"({str(key)[:50]!r}); a record carries one key's events"))
        else:
            out.append(_validate(element, expected, fail, limits, max_image_bytes))
    return out


#: The field each kind of event is keyed (and partitioned) by.
KEY_FIELDS = {"item": "item_id", "behavior": "user_id"}


class _DeadLetters:
    """Makes the dead letters of one source, ``dead(payload, reason)``, all received at
    ``now`` (default: the first one's making)."""

    def __init__(self, expected: str, source: str, now: datetime | None):
        self.expected, self.source, self.received_at = expected, source, now

    def at(self, source: str) -> _DeadLetters:
        """The same for a part of the source (an element of a record)."""
        return _DeadLetters(self.expected, source, self._received_at())

    def __call__(self, data: bytes, reason: str) -> DeadLetter:
        received_at = self._received_at()
        try:
            return DeadLetter(expected=self.expected, reason=reason, source=self.source,
                              received_at=received_at, payload=data.decode("utf-8"))
        except UnicodeDecodeError:
            return DeadLetter(expected=self.expected, reason=reason, source=self.source,
                              received_at=received_at,
                              payload=base64.b64encode(data).decode(), payload_encoding="base64")

    def _received_at(self) -> datetime:
        if self.received_at is None:
            self.received_at = datetime.now(UTC)
        return self.received_at


def _load(raw: bytes | str, expected: str, source: str, limits: ContractConfig,
          now: datetime | None) -> tuple[bytes, _DeadLetters, Any]:
    """(the record's bytes, its dead-letter maker, its parsed JSON value or the dead letter
    of a record too large or not JSON)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    dead = _DeadLetters(expected, source, now)
    if len(data) > limits.max_payload_bytes:
        return data, dead, dead(data, f"payload of {len(data)} bytes exceeds "
                                      f"{limits.max_payload_bytes}")
    try:
        # Decode explicitly: json.loads(bytes) would also guess UTF-16/32, but the wire is UTF-8.
        return data, dead, json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        return data, dead, dead(data, "payload is not UTF-8")
    except (ValueError, RecursionError) as exc:
        return data, dead, dead(data, f"not JSON: {str(exc)[:200]}")


# The string fields of each kind with a configurable limit: (name, is an id).
_LIMITED_FIELDS = {
    "item": (("item_id", True), ("category", True), ("brand", True), ("shop", True),
             ("title", False), ("description", False)),
    "behavior": (("user_id", True), ("item_id", True), ("request_id", True)),
}


def _validate(obj: Any, expected: Literal["item", "behavior"],
              fail: Callable[[str], DeadLetter], limits: ContractConfig, max_image_bytes: int
              ) -> ItemEvent | BehaviorEvent | DeadLetter:
    """The event a parsed JSON value describes, or ``fail(reason)``."""
    if not isinstance(obj, dict):
        return fail(f"expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind", expected)
    if kind != expected:
        return fail(f"kind: expected {expected!r}, got {str(kind)[:50]!r}")
    for field, is_id in _LIMITED_FIELDS[expected]:
        value = obj.get(field)
        most = limits.max_id_chars if is_id else limits.max_text_chars
        if isinstance(value, str) and len(value) > most:
            return fail(f"{field}: longer than {most} characters")
    try:
        event = EVENT_TYPES[expected].model_validate(obj)
    except ValidationError as exc:
        return fail(_describe(exc))
    except (ValueError, TypeError, RecursionError) as exc:  # defensive: odd nested input
        return fail(f"invalid event: {str(exc)[:200]}")
    if isinstance(event, ItemEvent) and event.image and event.image.startswith("data:"):
        try:
            check_inline_image(event.image, limits, max_image_bytes)
        except ValueError as exc:
            return fail(f"image: {exc}")
    return event
