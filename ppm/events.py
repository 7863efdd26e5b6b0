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
import functools
import hashlib
import io
import json
import math
import re
import warnings
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

from ppm.config import ContractConfig, ImageFetchConfig

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


INTERACTIONS = (Action.CLICK, Action.ORDER, Action.COLLECT)
"""The actions that enter a user's sequence and label an impression, in label order (the
ranker's tasks, ``trainer.features.TASKS``)."""


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


def _valid_unicode(text: str) -> bool:
    """False when ``text`` holds a lone surrogate (what JSON's ``"\\ud800"`` decodes to),
    which UTF-8, and so Parquet, Redis and the tokenizer, cannot encode."""
    if text.isascii():  # O(1) in CPython: the common case costs nothing
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str, most: int) -> str:
    """``text`` with lone surrogates escaped (``\\ud800``), cut to ``most`` characters."""
    if len(text) > most:
        text = text[: most - 1] + "…"
    if not _valid_unicode(text):
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        if len(text) > most:
            text = text[: most - 1] + "…"
    return text


MAX_REASON_CHARS = 2_000
MAX_LABEL_CHARS = 1_000
# A dead letter must always serialise, whatever text went into it (a file name with
# undecodable bytes, an exception message quoting the input): text fields are made safe here.
_Reason = Annotated[str, AfterValidator(lambda text: _printable(text, MAX_REASON_CHARS))]
_Label = Annotated[str, AfterValidator(lambda text: _printable(text, MAX_LABEL_CHARS))]


class DeadLetter(BaseModel):
    """A record that could not become an event. Keeps the payload so it can be replayed.

    ``payload`` is the raw text when it was valid UTF-8; otherwise it is base64 and
    ``payload_encoding`` says so (a ``payload`` string given with a lone surrogate is
    stored as base64 of its ``surrogatepass`` bytes). Lone surrogates in the text fields
    are escaped (``\\ud800``), ``reason`` is cut to 2,000 characters and ``source``,
    ``expected`` and ``error_type`` to 1,000. So :meth:`to_json` never fails.

    ``payload_bytes`` and ``payload_sha256`` always describe the whole raw record: they are
    computed on construction unless given (old letters without them get them on loading).
    A letter can be larger than a Kafka message may be (records of up to
    ``contracts.max_payload_bytes``, and JSON escaping can grow a payload up to 6x):
    :meth:`capped` makes one that fits by keeping a prefix of the payload.
    """

    model_config = ConfigDict(frozen=True)

    kind: Literal["dead_letter"] = "dead_letter"
    expected: _Label
    """The event kind the source promised (``item`` or ``behavior``)."""
    reason: _Reason
    source: _Label
    """Where the record came from, e.g. ``kafka:items/3@1042`` or ``file:items.jsonl:17``."""
    received_at: EventTime
    payload: str
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"
    payload_bytes: int | None = None
    """Size in bytes of the whole raw record, also when ``payload`` holds only a prefix."""
    payload_sha256: str | None = None
    """Hex SHA-256 of the whole raw record: names it when only a prefix is kept."""
    payload_truncated: bool = False
    """``payload`` holds only the first bytes of the record (see :meth:`capped`)."""
    stage: Literal["decode", "process", "produce"] = "decode"
    """What failed, after Kafka Streams' three error classes: ``decode`` (the bytes are not
    a valid event), ``process`` (a valid event failed in a processor, e.g. its image could
    not be fetched) or ``produce`` (writing a result failed)."""
    error_type: _Label | None = None
    """Class name of the exception behind the letter (e.g. ``ImageLoadError``); None for a
    contract violation the decoder found."""

    @model_validator(mode="before")
    @classmethod
    def _describe_whole_payload(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("payload"), str):
            return data  # let field validation report it
        data = dict(data)
        raw = None
        if data.get("payload_encoding", "utf-8") == "utf-8":
            try:
                raw = data["payload"].encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates: keep them, as bytes
                raw = data["payload"].encode("utf-8", "surrogatepass")
                data["payload"] = base64.b64encode(raw).decode()
                data["payload_encoding"] = "base64"
        if not data.get("payload_truncated") and (
            data.get("payload_bytes") is None or data.get("payload_sha256") is None
        ):
            raw = base64.b64decode(data["payload"]) if raw is None else raw
            data["payload_bytes"] = len(raw)
            data["payload_sha256"] = hashlib.sha256(raw).hexdigest()
        return data

    def raw(self) -> bytes:
        """The payload's bytes: the record as received, or only its first
        ``len(raw())`` bytes when ``payload_truncated``."""
        if self.payload_encoding == "base64":
            return base64.b64decode(self.payload)
        return self.payload.encode()

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    def capped(self, max_bytes: int) -> DeadLetter:
        """This letter if its :meth:`to_json` fits in ``max_bytes`` bytes, else a copy that does.

        The copy keeps the longest prefix of the payload that fits (UTF-8 cut on a
        character boundary, JSON escaping counted), sets ``payload_truncated``, and keeps
        ``payload_bytes`` and ``payload_sha256`` of the whole record. Text fields are
        shortened too (ending in ``…``), but only while they alone take more than half of
        ``max_bytes``. Any ``max_bytes`` of 1024 or more works; raises ValueError when
        even an empty payload does not fit.
        """
        if len(self.to_json()) <= max_bytes:
            return self
        raw = self.raw()
        if self.payload_truncated:
            size, digest = self.payload_bytes, self.payload_sha256
        else:
            size, digest = len(raw), hashlib.sha256(raw).hexdigest()
        letter = self.model_copy(update={"payload": "", "payload_truncated": True,
                                         "payload_bytes": size, "payload_sha256": digest})
        while len(letter.to_json()) > max_bytes // 2:
            name = max(_CUTTABLE_FIELDS, key=lambda field: len(getattr(letter, field) or ""))
            text = getattr(letter, name) or ""
            if len(text) <= 16:
                break
            letter = letter.model_copy(update={name: text[: len(text) // 2] + "…"})

        def with_prefix(n: int) -> DeadLetter:
            part = raw[:n]
            if self.payload_encoding == "base64":
                return letter.model_copy(update={"payload": base64.b64encode(part).decode()})
            # raw is valid UTF-8, so "ignore" drops only a character the cut split.
            return letter.model_copy(update={"payload": part.decode("utf-8", "ignore")})

        def fits(n: int) -> bool:
            return len(with_prefix(n).to_json()) <= max_bytes

        if not fits(0):
            raise ValueError(f"a dead letter needs more than {max_bytes} bytes "
                             "even without its payload")
        # Binary search: escaping makes the size of a prefix's JSON hard to predict, but it
        # grows with the prefix and is never below the prefix's own size.
        lo, hi = 0, min(len(raw), max_bytes)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        capped = with_prefix(lo)
        if lo == len(raw) and not self.payload_truncated:  # only the text fields had to go
            capped = capped.model_copy(update={"payload_truncated": False})
        return capped


# The text fields DeadLetter.capped may shorten, when they alone fill half the room.
_CUTTABLE_FIELDS = ("reason", "source", "expected", "error_type")


def _describe(error: ValidationError) -> str:
    parts = []
    for err in error.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "event"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


#: The formats an inline image may have. Pillow's other decoders (dozens, some for formats
#: nobody sends on the web, each a chance of a parser bug) never see untrusted bytes.
INLINE_IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = ImageFetchConfig().max_pixels


@functools.cache
def _inline_image_formats() -> tuple[str, ...]:
    from PIL import Image

    Image.init()
    # Image.open raises KeyError for a format this Pillow build lacks (WebP without libwebp).
    return tuple(f for f in INLINE_IMAGE_FORMATS if f in Image.OPEN)


def check_inline_image(image: str, limits: ContractConfig, max_image_bytes: int,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Raise ValueError unless a ``data:`` image is a readable picture within limits.

    Reads the header only (size, format among :data:`INLINE_IMAGE_FORMATS`) and checks the
    file's structure; no pixel is decoded, so a small file claiming a huge picture is
    refused by its header. Any exception Pillow raises on the bytes becomes a ValueError
    naming the exception's type.
    """
    header, sep, body = image.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ValueError("inline image must be 'data:image/<type>;base64,<data>'")
    if len(body) > (max_image_bytes * 4) // 3 + 4:
        raise ValueError(f"inline image larger than {max_image_bytes} bytes")
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("inline image is not valid base64") from None
    from PIL import Image  # Pillow is heavy-ish; only when needed

    try:
        # Pillow warns between MAX_IMAGE_PIXELS and twice that (and raises above); the
        # max_pixels check below is the one that speaks. catch_warnings is process-wide,
        # so another thread's warning of this one category may go unseen meanwhile.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_inline_image_formats())
    except Image.DecompressionBombError:
        raise ValueError(f"inline image has more than {max_pixels} pixels "
                         "(DecompressionBombError)") from None
    except Exception as exc:  # whatever a decoder raises on untrusted bytes: a bad picture
        raise ValueError(f"inline image is not a readable picture ({type(exc).__name__})"
                         ) from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise ValueError(f"inline image of {width}x{height} has more than "
                             f"{max_pixels} pixels")
        try:
            img.verify()
        except Exception as exc:
            raise ValueError(f"inline image is not a readable picture ({type(exc).__name__})"
                             ) from None


def decode(
    raw: bytes | str,
    expected: Literal["item", "behavior"],
    source: str,
    limits: ContractConfig | None = None,
    max_image_bytes: int = 4_000_000,
    now: datetime | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ItemEvent | BehaviorEvent | DeadLetter:
    """Turn one wire record into an event of the ``expected`` kind, or a dead letter.

    Never raises for any input: every failure comes back as a :class:`DeadLetter` whose
    ``reason`` names the field and the problem. Text holding a lone surrogate (a JSON
    ``"\\ud800"``) anywhere, even in a field this version ignores, is refused: UTF-8
    cannot encode it, so it would crash whatever stores the event. An exception no check
    foresaw becomes a letter whose reason starts ``internal decode error:`` and whose
    ``error_type`` names the exception. ``max_image_bytes`` and ``max_pixels`` limit an
    inline (``data:``) image.
    """
    dead = _DeadLetters(expected, source, now)
    try:
        limits = limits or ContractConfig()
        data, obj, suspect = _load(raw, dead, limits)
        if isinstance(obj, DeadLetter):
            return obj
        return _validate(obj, expected, functools.partial(dead, data), limits,
                         max_image_bytes, max_pixels, suspect)
    except Exception as exc:
        return dead.internal_error(raw, exc)


def decode_record(
    raw: bytes | str,
    expected: Literal["item", "behavior"],
    source: str,
    limits: ContractConfig | None = None,
    max_image_bytes: int = 4_000_000,
    now: datetime | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
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
    dead = _DeadLetters(expected, source, now)
    try:
        limits = limits or ContractConfig()
        data, elements, suspect = _load(raw, dead, limits)
        if isinstance(elements, DeadLetter):
            return [elements]
        if not isinstance(elements, list):  # one event (or not an event at all)
            return [_validate(elements, expected, functools.partial(dead, data), limits,
                              max_image_bytes, max_pixels, suspect)]
        most = limits.max_events_per_record
        if not 1 <= len(elements) <= most:
            return [dead(data, f"a record holds 1 to {most} events, got {len(elements)}")]
        key_field = KEY_FIELDS[expected]
        key = elements[0].get(key_field) if isinstance(elements[0], dict) else None
        out: list[ItemEvent | BehaviorEvent | DeadLetter] = []
        for i, element in enumerate(elements):
            fail = functools.partial(_element_letter, dead, i, element, data)
            try:
                if isinstance(element, dict) and element.get(key_field) != key:
                    out.append(fail(f"{key_field}: differs from the record's first event "
                                    f"({str(key)[:50]!r}); a record carries one key's events"))
                else:
                    out.append(_validate(element, expected, fail, limits, max_image_bytes,
                                         max_pixels, suspect))
            except Exception as exc:  # one element's surprise must not cost the others
                out.append(fail(_internal_reason(exc), type(exc).__name__))
        return out
    except Exception as exc:
        return [dead.internal_error(raw, exc)]


#: The field each kind of event is keyed (and partitioned) by.
KEY_FIELDS = {"item": "item_id", "behavior": "user_id"}


def _internal_reason(exc: BaseException) -> str:
    try:
        message = str(exc)
    except Exception:  # an exception whose __str__ itself fails
        message = "(no message)"
    return f"internal decode error: {type(exc).__name__}: {message[:500]}"


class _DeadLetters:
    """Makes the dead letters of one source, ``dead(payload, reason)``, all received at
    ``now`` (default: the first one's making)."""

    def __init__(self, expected: str, source: str, now: datetime | None):
        self.expected, self.source, self.received_at = expected, source, now

    def at(self, source: str) -> _DeadLetters:
        """The same for a part of the source (an element of a record)."""
        return _DeadLetters(self.expected, source, self._received_at())

    def __call__(self, data: bytes, reason: str, error_type: str | None = None) -> DeadLetter:
        try:
            payload, encoding = data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            payload, encoding = base64.b64encode(data).decode(), "base64"
        return DeadLetter(expected=self.expected, reason=reason, source=self.source,
                          received_at=self._received_at(), payload=payload,
                          payload_encoding=encoding, payload_bytes=len(data),
                          payload_sha256=hashlib.sha256(data).hexdigest(),
                          error_type=error_type)

    def internal_error(self, raw: Any, exc: Exception) -> DeadLetter:
        """The letter of a record whose decoding raised ``exc``: a bug, or input that no
        check foresaw."""
        if isinstance(raw, str):
            data = raw.encode("utf-8", "surrogatepass")
        elif isinstance(raw, bytes | bytearray | memoryview):
            data = bytes(raw)
        else:
            data = b""
        return self(data, _internal_reason(exc), type(exc).__name__)

    def _received_at(self) -> datetime:
        if self.received_at is None:
            self.received_at = datetime.now(UTC)
        return self.received_at


def _element_letter(dead: _DeadLetters, i: int, element: Any, record: bytes, reason: str,
                    error_type: str | None = None) -> DeadLetter:
    """The dead letter of element ``i`` of a record: its own JSON is its payload."""
    try:
        payload = json.dumps(element, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate; \u-escaped it is the same JSON value
        payload = json.dumps(element).encode()
    except (ValueError, RecursionError):  # nested deeper than json.dumps goes
        payload = record
        reason += " (payload: the whole record; the element alone cannot be re-encoded)"
    return dead.at(f"{dead.source}[{i}]")(payload, reason, error_type)


def _load(raw: bytes | str, dead: _DeadLetters, limits: ContractConfig
          ) -> tuple[bytes, Any, bool]:
    """(the record's bytes, its parsed JSON value or the dead letter of a record too large
    or not JSON, whether the value may hold a lone surrogate)."""
    if isinstance(raw, str):
        data = raw.encode("utf-8", "surrogatepass")
    elif isinstance(raw, bytes | bytearray | memoryview):
        data = bytes(raw)
    else:  # e.g. None: a Kafka tombstone
        return b"", dead(b"", f"expected bytes or str, got {type(raw).__name__}"), False
    if len(data) > limits.max_payload_bytes:
        return data, dead(data, f"payload of {len(data)} bytes exceeds "
                                f"{limits.max_payload_bytes}"), False
    try:
        # Decode explicitly: json.loads(bytes) would also guess UTF-16/32, but the wire is UTF-8.
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        return data, dead(data, "payload is not UTF-8"), False
    except (ValueError, RecursionError) as exc:  # also int_max_str_digits, deep nesting
        return data, dead(data, f"not JSON: {str(exc)[:200]}"), False
    # Valid UTF-8 holds no surrogate, so only a \u escape makes one: most records can skip
    # the walk over every string (_lone_surrogate), which the behaviors' rate cannot afford.
    return data, value, _SURROGATE_ESCAPE.search(data) is not None


# \uD800 to \uDFFF, any case; one regex pass is cheaper than two substring searches.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD]")


def _lone_surrogate(value: Any) -> str | None:
    """Where a parsed JSON value holds a lone surrogate, as a dead letter's reason, or None."""
    # Iterative: the value may be nested as deep as the JSON parser went.
    stack: list[tuple[Any, tuple | None]] = [(value, None)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            if not _valid_unicode(node):
                return f"{_render_path(path)}: not valid Unicode (lone surrogate)"
        elif isinstance(node, dict):
            for key, child in node.items():
                if not _valid_unicode(key):
                    return f"{_render_path(path)}: a key is not valid Unicode (lone surrogate)"
                stack.append((child, (path, key)))
        elif isinstance(node, list):
            stack.extend((child, (path, i)) for i, child in enumerate(node))
    return None


def _render_path(path: tuple | None) -> str:
    """``title`` or ``tags.2`` from ``_lone_surrogate``'s linked path; ``event`` for the root."""
    parts = []
    while path is not None:
        path, key = path
        parts.append(str(key)[:50])
    return ".".join(reversed(parts)) or "event"


# The string fields of each kind with a configurable limit: (name, is an id).
_LIMITED_FIELDS = {
    "item": (("item_id", True), ("category", True), ("brand", True), ("shop", True),
             ("title", False), ("description", False)),
    "behavior": (("user_id", True), ("item_id", True), ("request_id", True)),
}


def _validate(obj: Any, expected: Literal["item", "behavior"],
              fail: Callable[..., DeadLetter], limits: ContractConfig, max_image_bytes: int,
              max_pixels: int, may_hold_surrogates: bool
              ) -> ItemEvent | BehaviorEvent | DeadLetter:
    """The event a parsed JSON value describes, or ``fail(reason[, error_type])``."""
    try:
        return _event_of(obj, expected, fail, limits, max_image_bytes, max_pixels,
                         may_hold_surrogates)
    except Exception as exc:
        return fail(_internal_reason(exc), type(exc).__name__)


def _event_of(obj: Any, expected: Literal["item", "behavior"],
              fail: Callable[..., DeadLetter], limits: ContractConfig, max_image_bytes: int,
              max_pixels: int, may_hold_surrogates: bool
              ) -> ItemEvent | BehaviorEvent | DeadLetter:
    if not isinstance(obj, dict):
        return fail(f"expected a JSON object, got {type(obj).__name__}")
    if may_hold_surrogates and (reason := _lone_surrogate(obj)) is not None:
        return fail(reason)
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
            check_inline_image(event.image, limits, max_image_bytes, max_pixels)
        except ValueError as exc:
            return fail(f"image: {exc}")
    return event
