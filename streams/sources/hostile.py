"""Hostile records: a seeded mix of records built to break a stream, among valid ones.

A data source, like :mod:`streams.sources.shop_simulator` (whose ``malformed_share`` spoils ordinary
fields): :func:`hostile_mix` takes wire records, e.g. ``ShopSimulator(...).records()``, and
inserts records that a careless catalog service or an attacker could publish, each next to
a valid record and stamped with its time, so ``items`` and ``behaviors`` each stay roughly
in event-time order and the local runner and a Faust worker can consume the result as it is.

Every kind of hostile record is a named case in :data:`HOSTILE_CASES`, and every record a
case makes has a fate that :class:`streams.intake.Intake` decides alone, the same way on
every run and in both drivers (:class:`Fate`):

* ``dead``: every event of the record is a dead letter (one for the record, or one per
  element of a packed record);
* ``applied``: every event is admitted (an item whose photo is refused still is: it gets a
  text-only vector and a warning, not a dead letter);
* ``split``: a packed record whose good elements are admitted and whose bad ones are dead
  letters, one per element.

Applied hostile events use ids of their own (``hostile-i…`` items, ``hostile-u…`` users,
``hostile-r…`` requests), so they never change a valid user's sequence or an item of the
valid world; their impressions are samples like any other.

:func:`labelled_mix` gives the same records with their case and fate (for tests), and
:func:`write_jsonl` writes a mix as the input of ``ppm stream --jsonl``. Example::

    from streams.sources.shop_simulator import ShopSimulator
    records = hostile_mix(list(ShopSimulator(world).records()), seed=7, share=0.05)
    LocalRunner(cfg).run(records, "hostile-world")

Costs: one record of :data:`OVERSIZED` is ``contracts.max_payload_bytes`` long (8 MB by
default), so a mix holds exactly one; Kafka takes it only on topics whose
``max.message.bytes`` allows it (:func:`streams.topics.ensure_topics` sets that) and from a
producer whose ``max_request_size`` does.
"""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from ppm.config import ContractConfig, SimulatorConfig
from ppm.events import format_event_time

Kind = Literal["item", "behavior"]
Fate = Literal["applied", "dead", "split"]


class MixedRecord(NamedTuple):
    """One record of a mix: the wire form, and where it came from."""

    kind: Kind
    raw: bytes
    case: str | None
    """The :class:`HostileCase` that made it; None for a record of the input."""
    fate: Fate | None
    """What :class:`streams.intake.Intake` makes of it; None for a record of the input."""


@dataclass(frozen=True)
class Spot:
    """Where a hostile record goes: what a case may take from its neighbourhood."""

    kind: Kind
    """The kind of the valid record it follows."""
    time: datetime
    """The newest event time at that point of the input (UTC): for item events."""
    behavior_time: datetime
    """The newest behavior time at that point (before the first behavior: the first one's).
    Behaviors keep to the behavior stream's own clock: one dated days earlier, among the
    catalog's first items, would be the clock that every later behavior is judged by."""
    item_id: str
    """An item of the valid world seen by then (impressions need one)."""
    serial: int
    """This case instance's number in the mix: makes its ids unique."""
    contracts: ContractConfig

    def id(self, prefix: str) -> str:
        return f"hostile-{prefix}{self.serial:06d}"

    def at(self, delta_ms: float = 0.0, kind: Kind = "item") -> str:
        when = self.time if kind == "item" else self.behavior_time
        return format_event_time(when + timedelta(milliseconds=delta_ms))


Made = list[tuple[Kind, bytes, Fate]]


@dataclass(frozen=True)
class HostileCase:
    """A named kind of hostile input: ``make(spot)`` gives its records, in order."""

    name: str
    make: Callable[[Spot], Made]
    weight: float = 1.0
    """Relative frequency among the cases drawn after each has appeared once."""
    once: bool = False
    """At most one per mix (a record of megabytes)."""


# --------------------------------------------------------------------------- building blocks

_FAR_FUTURE = datetime(2099, 6, 1, tzinfo=UTC)  # inside the decoder's 1990..2100


def _dumps(obj: object) -> bytes:
    # ensure_ascii: a lone surrogate is written as the escape "\ud800", as a JSON producer in
    # another language would; the bytes themselves stay valid UTF-8.
    return json.dumps(obj, separators=(",", ":")).encode()


def _item(item_id: str, when: str, **fields: object) -> dict:
    return {"kind": "item", "item_id": item_id, "event_time": when,
            "title": f"Hostile item {item_id}", "category": "hostile", **fields}


def _impression(spot: Spot, user: str, request: str, position: int, **fields: object) -> dict:
    return {"kind": "behavior", "user_id": user, "item_id": spot.item_id,
            "action": "impression", "event_time": spot.at(kind="behavior"), "request_id": request,
            "position": position, **fields}


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _saved(fmt: str, **options: object) -> bytearray:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format=fmt, **options)
    return bytearray(buffer.getvalue())


def png_claiming(width: int, height: int) -> bytes:
    """A valid 8-bit grey PNG of ~70 bytes whose header claims ``width`` x ``height``."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 9)) + _png_chunk(b"IEND", b""))


def gif_claiming(width: int, height: int) -> bytes:
    """An 8x8 GIF whose logical screen claims ``width`` x ``height`` (at most 65,535)."""
    data = _saved("GIF")
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """An 8x8 JPEG whose SOF0 frame claims ``width`` x ``height`` (at most 65,535)."""
    data = _saved("JPEG")
    at = data.index(b"\xff\xc0") + 5  # marker, length, precision; then height, width
    data[at:at + 4] = struct.pack(">HH", height, width)
    return bytes(data)


def tiff_claiming(width: int, height: int) -> bytes:
    """A one-strip grey TIFF of ~120 bytes whose tags claim ``width`` x ``height``."""
    # (tag, type 3 short / 4 long, count, value): ImageWidth, ImageLength, BitsPerSample,
    # Compression, Photometric, StripOffsets, RowsPerStrip, StripByteCounts.
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
            (262, 3, 1, 1), (273, 4, 1, 8), (278, 4, 1, height), (279, 4, 1, 1)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *t) for t in tags)
    return b"II*\x00" + struct.pack("<I", 9) + b"\x00" + ifd + b"\x00" * 4


def webp_claiming(width: int, height: int) -> bytes:
    """An 8x8 lossless WebP whose VP8X canvas claims ``width`` x ``height``."""
    exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x00\x00"  # makes Pillow write a VP8X header
    data = _saved("WEBP", lossless=True, exif=exif)
    data[24:30] = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return bytes(data)


# Each claims billions of pixels, beyond twice Pillow's MAX_IMAGE_PIXELS (DecompressionBombError).
_BOMBS: dict[str, Callable[[], bytes]] = {
    "png": lambda: png_claiming(100_000, 100_000),
    "gif": lambda: gif_claiming(65_535, 65_535),
    "jpeg": lambda: jpeg_claiming(65_500, 65_500),
    "webp": lambda: webp_claiming(16_383, 16_383),
    "tiff": lambda: tiff_claiming(100_000, 100_000),
}


def _image_bomb(fmt: str) -> Callable[[Spot], Made]:
    def make(spot: Spot) -> Made:
        image = f"data:image/{fmt};base64,{base64.b64encode(_BOMBS[fmt]()).decode()}"
        return [("item", _dumps(_item(spot.id("i"), spot.at(), image=image)), "dead")]
    return make


# --------------------------------------------------------------------------- the cases


def _packed_surrogate(spot: Spot) -> Made:
    """A result page of one user whose middle impression's query holds a lone surrogate."""
    user, request = spot.id("u"), spot.id("r")
    page = [_impression(spot, user, request, 0),
            _impression(spot, user, request, 1, query="shoes \ud800"),
            _impression(spot, user, f"{request}b", 0)]
    return [("behavior", _dumps(page), "split")]


def _oversized(spot: Spot) -> Made:
    """An item one byte under ``max_payload_bytes`` whose title is escaped quotes: a dead
    letter (title too long) that JSON escaping makes twice as large again."""
    head = _dumps(_item(spot.id("i"), spot.at(), title=""))
    cut = head.index(b'"title":"') + len(b'"title":"')
    pairs = (spot.contracts.max_payload_bytes - 1 - len(head)) // 2
    raw = head[:cut] + b'\\"' * pairs + head[cut:]
    return [("item", raw, "dead")]


def _future_item(spot: Spot) -> Made:
    """An item, the same item dated 2099, then an update and a delete that must apply."""
    item_id = spot.id("i")
    return [
        ("item", _dumps(_item(item_id, spot.at())), "applied"),
        ("item", _dumps(_item(item_id, format_event_time(_FAR_FUTURE),
                              title="From the future")), "dead"),
        ("item", _dumps(_item(item_id, spot.at(1), title="Updated")), "applied"),
        ("item", _dumps({"kind": "item", "item_id": item_id, "op": "delete",
                         "event_time": spot.at(2)}), "applied"),
    ]


def _future_behavior(spot: Spot) -> Made:
    page = _impression(spot, spot.id("u"), spot.id("r"), 0,
                       event_time=format_event_time(_FAR_FUTURE))
    return [("behavior", _dumps(page), "dead")]


def _deep_nesting(spot: Spot) -> Made:
    """Valid JSON nested 20,000 deep: past any recursive parser's stack."""
    body = _dumps({"kind": spot.kind, "user_id": spot.id("u"), "item_id": spot.id("i"),
                   "event_time": spot.at(kind=spot.kind), "nested": None})
    depth = 20_000
    raw = body.replace(b"null", b"[" * depth + b"]" * depth)
    return [(spot.kind, raw, "dead")]


def _not_utf8(spot: Spot) -> Made:
    raw = (b'{"kind":"' + spot.kind.encode() + b'","item_id":"\xff\xfe\xc3(","user_id":"'
           + spot.id("u").encode() + b'","event_time":"' + spot.at(kind=spot.kind).encode()
           + b'"}')
    return [(spot.kind, raw, "dead")]


def _not_json(spot: Spot) -> Made:
    return [(spot.kind, b"<html><head><title>502 Bad Gateway</title></head></html>", "dead")]


def _image_reference(ref: str) -> Callable[[Spot], Made]:
    """An item whose photo must not be read: applied, with a text-only vector."""
    def make(spot: Spot) -> Made:
        return [("item", _dumps(_item(spot.id("i"), spot.at(), image=ref)), "applied")]
    return make


def _packed_foreign_key(spot: Spot) -> Made:
    """A page of one user whose last element is another user's: that element alone is a
    dead letter (the record's key, and so its partition, is the first user's)."""
    user, request = spot.id("u"), spot.id("r")
    page = [_impression(spot, user, request, 0), _impression(spot, user, request, 1),
            _impression(spot, spot.id("v"), request, 2)]
    return [("behavior", _dumps(page), "split")]


def _packed_too_many(spot: Spot) -> Made:
    """1,001 valid impressions of one user in one record: one over the limit, one letter."""
    user, request = spot.id("u"), spot.id("r")
    count = spot.contracts.max_events_per_record + 1
    page = [_impression(spot, user, f"{request}-{i}", 0) for i in range(count)]
    return [("behavior", _dumps(page), "dead")]


def _empty_value(spot: Spot) -> Made:
    """No bytes at all, as a Kafka tombstone carries (bench/fuzz.py sends a real one)."""
    return [(spot.kind, b"", "dead")]


def _kind_mismatch(spot: Spot) -> Made:
    """A valid event of the other kind on this kind's topic."""
    if spot.kind == "item":
        other = _impression(spot, spot.id("u"), spot.id("r"), 0)
    else:
        other = _item(spot.id("i"), spot.at(kind="behavior"))
    return [(spot.kind, _dumps(other), "dead")]


OVERSIZED = "oversized_letter"
EMPTY_VALUE = "empty_value"

HOSTILE_CASES: tuple[HostileCase, ...] = (
    *(HostileCase(f"image_bomb_{fmt}", _image_bomb(fmt)) for fmt in _BOMBS),
    HostileCase("packed_surrogate", _packed_surrogate),
    HostileCase(OVERSIZED, _oversized, weight=0.0, once=True),
    HostileCase("future_item", _future_item),
    HostileCase("future_behavior", _future_behavior),
    HostileCase("deep_nesting", _deep_nesting),
    HostileCase("not_utf8", _not_utf8),
    HostileCase("not_json", _not_json),
    HostileCase("image_proc_environ", _image_reference("/proc/self/environ")),
    HostileCase("image_loopback", _image_reference("http://127.0.0.1:1/x")),
    HostileCase("packed_foreign_key", _packed_foreign_key),
    HostileCase("packed_too_many", _packed_too_many, weight=0.1),  # 200 KB each
    HostileCase(EMPTY_VALUE, _empty_value),
    HostileCase("kind_mismatch", _kind_mismatch),
)
"""Every hostile case, by name; a mix holds each at least once."""


# --------------------------------------------------------------------------- the mix

_TIME = re.compile(rb'"event_time":"([^"]{10,40})"')
_ITEM_ID = re.compile(rb'"item_id":"([^"\\]{1,128})"')


def labelled_mix(records: Sequence[tuple[str, bytes]], seed: int, share: float = 0.05,
                 contracts: ContractConfig | None = None) -> list[MixedRecord]:
    """``records`` with hostile records inserted, each labelled with its case and fate.

    About ``share`` of the case instances in the output are hostile (a case may make more
    than one record), and every case of :data:`HOSTILE_CASES` appears at least once when
    ``records`` is not empty and ``share`` > 0. Each instance goes right after a randomly
    chosen input record and takes that point's event time. The same arguments give the
    same output, byte for byte.
    """
    if not 0 <= share < 1:
        raise ValueError(f"share must be in [0, 1), got {share}")
    contracts = contracts or ContractConfig()
    out = [MixedRecord(kind, raw, None, None) for kind, raw in records]  # type: ignore[arg-type]
    if not records or share == 0:
        return out
    rng = np.random.default_rng(seed)
    count = max(len(HOSTILE_CASES), round(len(records) * share / (1 - share)))
    drawn = [c for c in HOSTILE_CASES if not c.once and c.weight > 0]
    weights = np.array([c.weight for c in drawn])
    cases = list(HOSTILE_CASES) + [drawn[i] for i in rng.choice(
        len(drawn), size=count - len(HOSTILE_CASES), p=weights / weights.sum())]
    order = rng.permutation(len(cases))
    positions = np.sort(rng.integers(0, len(records), size=len(cases))).tolist()
    spots = _Neighbourhoods(records, contracts)
    after: dict[int, list[MixedRecord]] = {}
    for serial, (case_index, position) in enumerate(zip(order, positions, strict=True)):
        case = cases[case_index]
        after.setdefault(position, []).extend(
            MixedRecord(kind, raw, case.name, fate)
            for kind, raw, fate in case.make(spots.at(position, serial)))
    mixed: list[MixedRecord] = []
    for position, record in enumerate(out):
        mixed.append(record)
        mixed.extend(after.get(position, ()))
    return mixed


def hostile_mix(records: Sequence[tuple[str, bytes]], seed: int, share: float = 0.05,
                contracts: ContractConfig | None = None) -> list[tuple[str, bytes]]:
    """:func:`labelled_mix` as plain ``(kind, raw)`` records, ready for a runner or a
    publisher."""
    return [(r.kind, r.raw) for r in labelled_mix(records, seed, share, contracts)]


class _Neighbourhoods:
    """The newest readable event time (any kind, and behaviors only) and the last item id
    at every position of the input, read with regular expressions in one pass (malformed
    records are looked past)."""

    def __init__(self, records: Sequence[tuple[str, bytes]], contracts: ContractConfig):
        self.records = records
        self.contracts = contracts
        start = SimulatorConfig().start
        self.times: list[datetime] = []
        self.behavior_times: list[datetime | None] = []
        self.item_ids: list[str] = []
        newest = newest_behavior = None
        item_id = "hostile-none"
        for kind, raw in records:
            when = _time_of(raw)
            if when is not None:
                newest = max(newest or when, when)
                if kind == "behavior":
                    newest_behavior = max(newest_behavior or when, when)
            if m := _ITEM_ID.search(raw):
                item_id = m.group(1).decode("utf-8", "replace")
            self.times.append(newest or start)
            self.behavior_times.append(newest_behavior)
            self.item_ids.append(item_id)
        first_behavior = next((t for t in self.behavior_times if t is not None), None)
        self.first_behavior = first_behavior or self.times[-1]

    def at(self, position: int, serial: int) -> Spot:
        kind = self.records[position][0]
        return Spot(kind="behavior" if kind == "behavior" else "item",
                    time=self.times[position],
                    behavior_time=self.behavior_times[position] or self.first_behavior,
                    item_id=self.item_ids[position], serial=serial, contracts=self.contracts)


def _time_of(raw: bytes) -> datetime | None:
    m = _TIME.search(raw)
    if m is None:
        return None
    try:
        parsed = datetime.fromisoformat(m.group(1).decode())
    except (ValueError, UnicodeDecodeError):
        return None
    if parsed.tzinfo is None or not 1990 <= parsed.year < 2100:
        return None
    return parsed.astimezone(UTC)


def write_jsonl(records: Iterable[tuple[str, bytes]], out_dir: Path) -> dict[str, int]:
    """Write records as ``out_dir/items.jsonl`` and ``behaviors.jsonl`` (the input of
    ``ppm stream --jsonl``), one a line, in the given order; returns the lines by kind.

    Raises ValueError for a record holding a newline byte (it would be two lines).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"item": 0, "behavior": 0}
    with (open(out_dir / "items.jsonl", "wb") as items,
          open(out_dir / "behaviors.jsonl", "wb") as behaviors):
        files = {"item": items, "behavior": behaviors}
        for kind, raw in records:
            if b"\n" in raw:
                raise ValueError(f"a {kind} record holds a newline byte: {raw[:80]!r}")
            files[kind].write(raw + b"\n")
            counts[kind] += 1
    return counts
