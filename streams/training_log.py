"""Training log: behavior events in, labelled samples out, one parquet file per event-time window.

:class:`TrainingLogWriter` is a plain processor (no transport): the local replay loop and the
Faust agent both hand it batches of :class:`~ppm.events.BehaviorEvent` and checkpoint its
:meth:`~TrainingLogWriter.state_dict`.

Samples
-------
Every impression becomes one sample. A click, order or collect (a *follow-up*) labels the
impression of the same user, item and request whose time ``t`` satisfies
``t <= follow-up time < t + attribution_window_s`` (event time; the simulator's follow-ups
all fall in this half-open interval). When several impressions qualify, the latest one wins,
and a follow-up labels at most one sample. Features are taken when the impression is
processed, so a sample never holds anything from after its impression:

====================  =========================  =============================================
column                type                       meaning
====================  =========================  =============================================
sample_id             string                     ``f"{request_id}:{item_id}:{impression_us}"``
user_id               string
item_id               string
request_id            string
position              int32, nullable            slot in the request
query                 string, nullable           search query of the request
impression_time       timestamp[us, UTC]         the impression's real event time
click, order, collect int8                       1 when attributed, else 0
seq_item_ids          list<string>               the user's sequence as the store held it
seq_actions           list<string>               just before the impression
seq_times_us          list<int64>                (``SequenceBuilder.history``): its last
                                                 interactions, and impressions where
                                                 ``features.sequence_impressions`` keeps
                                                 some; oldest first; times in microseconds
                                                 since the epoch
item_encoder_version  string, nullable           the item's embedding version; None unless its
item_content_hash     string, nullable           ``content_time_us <= impression time``
item_category         string, nullable           from :class:`~ppm.records.ItemState`;
item_brand            string, nullable           all item_* columns are None for an item the
item_shop             string, nullable           ``items`` mapping does not know
item_price_bucket     int32, nullable
item_first_seen_us    int64, nullable
item_age_s            float64, nullable          impression time - first_seen, in seconds
item_clicks_before    int32                      clicks on the item this writer saw with event
                                                 time before the impression (exact for
                                                 event-time-ordered input; a Faust worker's
                                                 writer is per partition and counts only its
                                                 partition's clicks since it started)
window_start          timestamp[us, UTC]         the window the sample was written to
====================  =========================  =============================================

Rows in a window file are sorted by (impression_time, sample_id).

Watermark and windows
---------------------
The watermark is the largest event time seen. An impression is *final* (its labels fixed) once
``watermark >= impression time + attribution window``; a follow-up is forgotten at the same
point after its own time (no impression that could claim it can still be pending then).
Windows are ``[k * window_s, (k + 1) * window_s)`` in event time; the first one holds the
earliest event of the first batch. A window closes once ``watermark >= end + attribution
window``, so all its impressions are final, and closing writes
``out_dir/windows/<start as YYYYMMDDTHHMMSSZ>.parquet`` and an entry in
``out_dir/windows/manifest.json`` (a JSON list of ``{start, end, path, samples,
closed_at_watermark}``, times as ISO-8601 UTC, ``path`` relative to the manifest's folder).
Windows close in order and without gaps: a window with no samples is still written (0 rows),
so consumers see a contiguous sequence (a writer started on recorded windows continues after
the last one, or at its first event's window if that is later). A window already in the
manifest is never rewritten. The manifest exists (empty) from the writer's start.

Late and duplicate data
-----------------------
* An impression whose own window is closed goes into the earliest open window
  (``window_start`` says which; ``impression_time`` keeps its real value).
* A follow-up that labels nothing, because every impression it could belong to was already
  final when it arrived (``late``) or because there was none (``unmatched``), is appended to
  ``out_dir/late_events.jsonl`` as ``{"reason": ..., "event": <the event's wire JSON>}``.
* A repeated impression (same ``sample_id``) is dropped while its id is remembered: until the
  window after its own has closed. A repeated follow-up (same user, item, request, action and
  time) is dropped while it is remembered (one attribution window after its time).

* A writer started on a folder whose manifest already has windows (another process wrote
  them: a restarted worker, a partition that moved between workers) opens after the last
  recorded window. An impression whose own window is recorded is looked up in the recorded
  files (read when first needed): found, it is a replay and is dropped
  (``already_recorded_impressions``); not found, it is late like any other. A follow-up
  that labels nothing while a recorded sample it could label carries its label is a replay
  too (``already_recorded_followups``), not a late event.

Acknowledging what is durable
-----------------------------
A driver that must not acknowledge an input before its effect is on disk (the Faust agent:
Kafka offsets) passes a *tag* per event (``process(events, tags)``; any hashable, e.g. the
record). :meth:`TrainingLogWriter.take_done` returns the tags whose every event is durable:
an impression once the window file holding its sample is written (or it was a duplicate); a
follow-up once the sample it labelled is written, or once it is appended to
``late_events.jsonl``. So a late impression, placed in a later window, keeps its record
unacknowledged until that window is written.

Nothing is dropped silently; :attr:`TrainingLogWriter.counters` balances:
``impressions == samples_logged + pending_impressions`` and
``followups == attributed_followups + late_events + unresolved_followups +
already_recorded_followups``.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.parquet as pq

from ppm.atomic_file import size_of, truncate_to, write_atomically
from ppm.clock import to_us
from ppm.data_dir import TrainingLogDir
from ppm.events import INTERACTIONS, Action, BehaviorEvent, format_event_time
from ppm.records import ItemState, UserSequence

log = logging.getLogger(__name__)

_TS = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("position", pa.int32()),
    pa.field("query", pa.string()),
    pa.field("impression_time", _TS, nullable=False),
    pa.field("click", pa.int8(), nullable=False),
    pa.field("order", pa.int8(), nullable=False),
    pa.field("collect", pa.int8(), nullable=False),
    pa.field("seq_item_ids", pa.list_(pa.string()), nullable=False),
    pa.field("seq_actions", pa.list_(pa.string()), nullable=False),
    pa.field("seq_times_us", pa.list_(pa.int64()), nullable=False),
    pa.field("item_encoder_version", pa.string()),
    pa.field("item_content_hash", pa.string()),
    pa.field("item_category", pa.string()),
    pa.field("item_brand", pa.string()),
    pa.field("item_shop", pa.string()),
    pa.field("item_price_bucket", pa.int32()),
    pa.field("item_first_seen_us", pa.int64()),
    pa.field("item_age_s", pa.float64()),
    pa.field("item_clicks_before", pa.int32(), nullable=False),
    pa.field("window_start", _TS, nullable=False),
])
"""The columns of every window file (see the module docstring)."""

STATE_VERSION = 1
LATE = "late: every impression it could belong to was already final when it arrived"
UNMATCHED = "unmatched: no impression of this user, item and request within the attribution window"
_LABEL_INDEX = {action.value: i for i, action in enumerate(INTERACTIONS)}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = 1_000_000

_Key = tuple[str, str, str]
"""(user_id, item_id, request_id): what a follow-up must share with its impression."""


class _Impression(NamedTuple):
    """A pending impression with its features; fields in SCHEMA order, less labels and window."""

    sample_id: str
    user_id: str
    item_id: str
    request_id: str
    position: int | None
    query: str | None
    time_us: int
    seq_item_ids: tuple[str, ...]
    seq_actions: tuple[str, ...]
    seq_times_us: tuple[int, ...]
    encoder_version: str | None
    content_hash: str | None
    category: str | None
    brand: str | None
    shop: str | None
    price_bucket: int | None
    first_seen_us: int | None
    age_s: float | None
    clicks_before: int


@dataclass(slots=True)
class _FollowUp:
    time_us: int
    action: str
    json: str
    """The event's wire JSON, kept for late_events.jsonl."""
    claimed: bool = False
    tag: Any = None
    """The driver's tag, until the follow-up's fate is durable (see take_done)."""


@dataclass(frozen=True)
class ClosedWindow:
    """A window file that is complete: ``[start_us, end_us)`` in event time (us, UTC)."""

    start_us: int
    end_us: int
    path: Path
    samples: int


@dataclass(frozen=True)
class _Recorded:
    """What a replay needs of a recorded window file: its sample ids, and per (user, item,
    request) the impressions' times and labels."""

    ids: frozenset[str]
    labels: dict[_Key, list[tuple[int, tuple[int, int, int]]]]

    @classmethod
    def read(cls, path: Path) -> _Recorded:
        table = pq.read_table(path, columns=["sample_id", "user_id", "item_id", "request_id",
                                             "impression_time", "click", "order", "collect"])
        times = table["impression_time"].cast(pa.int64()).to_pylist()
        labels: dict[_Key, list[tuple[int, tuple[int, int, int]]]] = {}
        for user, item, request, t, c, o, k in zip(
                *(table[n].to_pylist() for n in ("user_id", "item_id", "request_id")), times,
                *(table[n].to_pylist() for n in ("click", "order", "collect")), strict=True):
            labels.setdefault((user, item, request), []).append((t, (c, o, k)))
        return cls(frozenset(table["sample_id"].to_pylist()), labels)


def sample_id_of(request_id: str, item_id: str, impression_us: int) -> str:
    """The sample id of an impression (``impression_us``: its event time, µs)."""
    return f"{request_id}:{item_id}:{impression_us}"


def _row(values: Sequence[Any]) -> tuple[Any, ...]:
    """A window row read back from JSON: the sequence columns as tuples again."""
    return (*values[:10], *(tuple(v) for v in values[10:13]), *values[13:])


def _datetime(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _micros(value: datetime) -> int:
    # Exact integer arithmetic (no float round trip) for times read back from the manifest.
    return (value - _EPOCH) // timedelta(microseconds=1)


@runtime_checkable
class SequenceHistory(Protocol):
    """What a user's sequence was just before an impression (``SequenceBuilder``)."""

    def history(self, user_id: str, time_us: int) -> UserSequence | None: ...


def _history_of(sequences: Mapping[str, UserSequence], user_id: str, time_us: int
                ) -> UserSequence | None:
    # The caller applied this batch already: cut what happened at or after the impression.
    sequence = sequences.get(user_id)
    return None if sequence is None else sequence.before(time_us)


class TrainingLogWriter:
    """Turns behavior events into labelled samples, one parquet file per closed window.

    Args:
        out_dir: owned by this writer: ``windows/`` (window files and manifest.json) and
            ``late_events.jsonl`` go here. An existing manifest is read and respected.
        sequences: where an impression's history comes from, read (never written) when
            the impression is processed: the :class:`~streams.sequence_builder.SequenceBuilder`
            that applied the batch (its ``history``, which an impression early in a big
            batch needs: the kept sequence no longer holds all it saw), or a plain
            ``user_id -> UserSequence`` mapping, cut before the impression here. Either
            way the caller applies a batch before calling :meth:`process`.
        items: ``item_id -> ItemState``, read when an impression is processed.
        attribution_window_s: ``pipeline.attribution_window_s``.
        window_s: ``pipeline.log_window_s``; a whole number of seconds (file names have
            second resolution).

    Example::

        writer = TrainingLogWriter(Path("ppm-data/training"), sequences, items)
        for batch in batches:
            builder.process(batch)          # sequences first
            for window in writer.process(batch):
                print(window.path, window.samples)
        writer.close_all()
    """

    def __init__(
        self,
        out_dir: Path,
        sequences: SequenceHistory | Mapping[str, UserSequence],
        items: Mapping[str, ItemState],
        attribution_window_s: float = 1800.0,
        window_s: float = 3600.0,
    ) -> None:
        if attribution_window_s <= 0:
            raise ValueError("attribution_window_s must be positive")
        if window_s <= 0 or window_s != int(window_s):
            raise ValueError("window_s must be a positive whole number of seconds")
        self.out_dir = Path(out_dir)
        files = TrainingLogDir(self.out_dir)
        self.windows_dir = files.windows
        self.windows_dir.mkdir(parents=True, exist_ok=True)
        self.manifest_path = files.manifest
        self.late_events_path = files.late_events
        self._history = (sequences.history if isinstance(sequences, SequenceHistory)
                         else functools.partial(_history_of, sequences))
        self._items = items
        self._attribution_us = round(attribution_window_s * _US)
        self._window_us = int(window_s) * _US

        self._manifest: dict[int, dict[str, Any]] = {}
        if self.manifest_path.exists():
            for entry in json.loads(self.manifest_path.read_text()):
                self._manifest[_micros(datetime.fromisoformat(entry["start"]))] = entry
        else:
            # An empty manifest from the start: readers of several writers' windows
            # (trainer.windows) then wait for this one before calling a window closed.
            write_atomically(self.manifest_path, lambda fh: fh.write(b"[]\n"))
        self._late_bytes = size_of(self.late_events_path)

        self._watermark_us = 0
        self._open_from_us: int | None = None
        """Start of the earliest window not yet closed; None before the first event."""
        self._pending: dict[str, _Impression] = {}
        self._due: list[tuple[int, str]] = []
        """Heap of (impression time, sample_id) over ``_pending``: finalisation order."""
        self._pending_times: dict[_Key, list[int]] = {}
        """Sorted times of the pending impressions per key: which one is the latest."""
        self._followups: dict[_Key, list[_FollowUp]] = {}
        self._expiry: list[tuple[int, str, str, str, str]] = []
        """Heap of (time, user, item, request, action) over ``_followups``."""
        self._windows: dict[int, list[tuple[Any, ...]]] = {}
        """Open window start -> its final samples as rows in SCHEMA order (less window_start)."""
        self._seen: dict[int, set[str]] = {}
        """Sample ids by the start of the impression's own window, for duplicate detection."""
        self._item_clicks: dict[str, int] = {}
        self._recorded: dict[int, _Recorded] = {}
        """Recorded windows' samples, read from their files when a replay needs them."""
        # Durable acknowledgement (see the module docstring): tags not yet durable, with
        # how many of their events are outstanding; where each outstanding event waits.
        self._outstanding: dict[Any, int] = {}
        self._done: list[Any] = []
        self._sample_tags: dict[str, list[Any]] = {}
        self._window_tags: dict[int, list[Any]] = {}
        self._counters = dict.fromkeys(
            ("events", "impressions", "duplicate_impressions", "late_impressions",
             "already_recorded_impressions", "followups", "duplicate_followups",
             "attributed_followups", "already_recorded_followups", "late_events",
             "samples_logged", "windows_closed",
             "windows_already_recorded"), 0)

    # ------------------------------------------------------------------ public API

    @property
    def watermark_us(self) -> int:
        """The largest event time seen (us since the epoch, UTC); 0 before any event."""
        return self._watermark_us

    @property
    def open_from_us(self) -> int | None:
        """Start of the earliest window not yet closed (None before any event): every event
        before it is in a written window, or was late and logged as such."""
        return self._open_from_us

    @property
    def counters(self) -> dict[str, int]:
        """Running totals, plus what is still in memory (``pending_*``, ``unresolved_*``).

        ``windows_closed`` counts every close; ``windows_already_recorded`` the ones found in
        the manifest (a replay after a restore) and left as they were.
        """
        return {
            **self._counters,
            "pending_impressions": len(self._pending),
            "unresolved_followups": sum(
                not f.claimed for entries in self._followups.values() for f in entries),
            "open_window_samples": sum(len(rows) for rows in self._windows.values()),
        }

    def process(self, events: Sequence[BehaviorEvent],
                tags: Sequence[Any] | None = None) -> list[ClosedWindow]:
        """Apply one batch (any order inside); return the windows it closed, oldest first.

        ``tags[i]`` (optional, hashable, not None) names the input ``events[i]`` came from;
        :meth:`take_done` says when it is durable.
        """
        if not events:
            return []
        if tags is None:
            tags = [None] * len(events)
        previous_watermark = self._watermark_us
        # Labels are set at finalisation, so arrival order does not matter for them; this
        # order (event time, impressions first at equal times) makes item_clicks_before count
        # exactly the batch's clicks strictly before each impression.
        batch = sorted(
            ((to_us(e.event_time), e.action is not Action.IMPRESSION, i)
             for i, e in enumerate(events)),
            key=itemgetter(0, 1, 2),
        )
        if self._open_from_us is None:
            self._open_from_us = self._window_of(batch[0][0])
            if self._manifest:  # written by an earlier writer: continue after it
                self._open_from_us = max(self._open_from_us,
                                         max(self._manifest) + self._window_us)
        self._watermark_us = max(self._watermark_us, batch[-1][0])
        self._counters["events"] += len(batch)
        for time_us, is_followup, i in batch:
            tag = tags[i]
            if tag is not None:
                self._outstanding[tag] = self._outstanding.get(tag, 0) + 1
            if is_followup:
                self._add_followup(time_us, events[i], tag)
            else:
                self._add_impression(time_us, events[i], tag)
        final_us = self._watermark_us - self._attribution_us
        self._finalise(final_us)
        self._expire(final_us, late_until_us=previous_watermark - self._attribution_us)
        return self._close(through_end_us=final_us)

    def take_done(self) -> list[Any]:
        """Tags (of :meth:`process`) whose every event is now durable, each once, in the
        order they became so; forgets them."""
        done, self._done = self._done, []
        return done

    def _release(self, tags: Sequence[Any]) -> None:
        for tag in tags:
            if tag is None:
                continue
            left = self._outstanding[tag] - 1
            if left:
                self._outstanding[tag] = left
            else:
                del self._outstanding[tag]
                self._done.append(tag)

    def close_all(self) -> list[ClosedWindow]:
        """End of stream: finalise everything and close every window up to the watermark's.

        Labels of the last impressions are fixed with the follow-ups seen so far, so call this
        only when no more events will come.
        """
        if self._open_from_us is None:
            return []
        self._finalise(self._watermark_us)
        self._expire(self._watermark_us, late_until_us=-1)
        return self._close(through_end_us=self._window_of(self._watermark_us) + self._window_us)

    def state_dict(self) -> dict[str, Any]:
        """Everything in memory as plain JSON-ready data (copies; safe to keep). Tags are
        not in it: a driver that tags restores from its input, not from a state.

        The files under ``out_dir`` are not in it: closed windows are recognised by the
        manifest, and ``late_events.jsonl`` is cut back to its length at this point by
        :meth:`load_state_dict`.
        """
        return {
            "version": STATE_VERSION,
            "attribution_us": self._attribution_us,
            "window_us": self._window_us,
            "watermark_us": self._watermark_us,
            "open_from_us": self._open_from_us,
            "pending": [list(self._pending[sid]) for _, sid in sorted(self._due)],
            "followups": [[f.time_us, *key, f.action, f.json, f.claimed]
                          for key, entries in self._followups.items() for f in entries],
            # JSON object keys are strings: lists of [start, ...] pairs instead.
            "windows": [[start, [list(r) for r in rows]] for start, rows in self._windows.items()],
            "seen": [[start, sorted(ids)] for start, ids in self._seen.items()],
            "item_clicks": dict(self._item_clicks),
            "counters": dict(self._counters),
            "late_events_bytes": self._late_bytes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: feeding the batches that followed it then gives
        the same files as a writer that never stopped.

        Truncates ``late_events.jsonl`` to its length when the state was taken, so lines
        appended after that checkpoint (and about to be replayed) are not written twice.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported training-log state version {state.get('version')!r}")
        if (state["attribution_us"], state["window_us"]) != (self._attribution_us,
                                                             self._window_us):
            raise ValueError("state was taken with another attribution window or window length")
        self._watermark_us = state["watermark_us"]
        self._open_from_us = state["open_from_us"]
        self._pending = {}
        self._pending_times = {}
        for fields in state["pending"]:
            imp = _Impression(*fields[:7], *(tuple(f) for f in fields[7:10]), *fields[10:])
            self._pending[imp.sample_id] = imp
            key = (imp.user_id, imp.item_id, imp.request_id)
            bisect.insort(self._pending_times.setdefault(key, []), imp.time_us)
        # Any layout of a heap pops in the same order (entries are unique), so rebuild freely.
        self._due = sorted((imp.time_us, sid) for sid, imp in self._pending.items())
        self._followups = {}
        self._expiry = []
        for time_us, user, item, request, action, text, claimed in state["followups"]:
            self._followups.setdefault((user, item, request), []).append(
                _FollowUp(time_us, action, text, claimed))
            self._expiry.append((time_us, user, item, request, action))
        heapq.heapify(self._expiry)
        self._windows = {start: [_row(r) for r in rows] for start, rows in state["windows"]}
        self._seen = {start: set(ids) for start, ids in state["seen"]}
        self._item_clicks = dict(state["item_clicks"])
        self._counters = dict(state["counters"])
        truncate_to(self.late_events_path, state["late_events_bytes"])
        self._late_bytes = size_of(self.late_events_path)

    # ------------------------------------------------------------------ ingest

    def _window_of(self, time_us: int) -> int:
        return time_us - time_us % self._window_us

    def _add_impression(self, time_us: int, event: BehaviorEvent, tag: Any = None) -> None:
        sample_id = sample_id_of(event.request_id, event.item_id, time_us)
        own_window = self._window_of(time_us)
        seen = self._seen.setdefault(own_window, set())
        if sample_id in seen:
            self._counters["duplicate_impressions"] += 1
            self._release((tag,))
            return
        if self._open_from_us is not None and own_window < self._open_from_us and (
                self._in_recorded_window(sample_id, own_window)):
            self._counters["already_recorded_impressions"] += 1
            self._release((tag,))
            return
        seen.add(sample_id)
        self._counters["impressions"] += 1

        sequence = self._history(event.user_id, time_us)
        if sequence is None:
            history: tuple[tuple[Any, ...], ...] = ((), (), ())
        else:
            history = (sequence.item_ids, sequence.actions, sequence.times_us)
        item = self._items.get(event.item_id)
        if item is None:
            features: tuple[Any, ...] = (None,) * 8
        else:
            # The embedding version only if it existed at impression time: no future leaks.
            known = item.content_time_us is not None and item.content_time_us <= time_us
            features = (
                item.encoder_version if known else None, item.content_hash if known else None,
                item.category, item.brand, item.shop, item.price_bucket, item.first_seen_us,
                (time_us - item.first_seen_us) / _US,
            )
        imp = _Impression(
            sample_id, event.user_id, event.item_id, event.request_id, event.position,
            event.query, time_us, *history, *features, self._item_clicks.get(event.item_id, 0),
        )
        self._pending[sample_id] = imp
        if tag is not None:
            self._sample_tags[sample_id] = [tag]
        heapq.heappush(self._due, (time_us, sample_id))
        key = (event.user_id, event.item_id, event.request_id)
        bisect.insort(self._pending_times.setdefault(key, []), time_us)

    def _recorded_from(self, window: int) -> Iterator[_Recorded]:
        """The recorded windows from ``window`` on (a late sample lands in a later window
        than its own), read when first needed."""
        for start in sorted(s for s in self._manifest if s >= window):
            recorded = self._recorded.get(start)
            if recorded is None:
                recorded = self._recorded[start] = _Recorded.read(
                    self.windows_dir / self._manifest[start]["path"])
            yield recorded

    def _in_recorded_window(self, sample_id: str, own_window: int) -> bool:
        """Whether a recorded window holds ``sample_id``: a replay of a written sample."""
        return any(sample_id in r.ids for r in self._recorded_from(own_window))

    def _labelled_in_recorded_window(self, key: _Key, time_us: int, action: str) -> bool:
        """Whether a recorded sample of ``key`` that a follow-up at ``time_us`` could label
        is labelled with ``action``: a replay of a follow-up that labelled it."""
        label = _LABEL_INDEX[action]
        for recorded in self._recorded_from(self._window_of(time_us - self._attribution_us)):
            for impression_us, labels in recorded.labels.get(key, ()):
                if impression_us <= time_us < impression_us + self._attribution_us and (
                        labels[label]):
                    return True
        return False

    def _add_followup(self, time_us: int, event: BehaviorEvent, tag: Any = None) -> None:
        key = (event.user_id, event.item_id, event.request_id)
        action = event.action.value
        entries = self._followups.setdefault(key, [])
        if any(f.time_us == time_us and f.action == action for f in entries):
            self._counters["duplicate_followups"] += 1
            self._release((tag,))
            return
        entries.append(_FollowUp(time_us, action, event.to_json().decode(), tag=tag))
        heapq.heappush(self._expiry, (time_us, *key, action))
        self._counters["followups"] += 1
        if action == Action.CLICK.value:
            self._item_clicks[event.item_id] = self._item_clicks.get(event.item_id, 0) + 1

    # ------------------------------------------------------------------ finalise, expire, close

    def _finalise(self, final_us: int) -> None:
        """Label every pending impression with time <= final_us and put it in its window."""
        while self._due and self._due[0][0] <= final_us:
            time_us, sample_id = heapq.heappop(self._due)
            imp = self._pending.pop(sample_id)
            key = (imp.user_id, imp.item_id, imp.request_id)
            # The heap pops in time order, so this is the key's earliest pending impression;
            # follow-ups at or after the next one belong to that one.
            times = self._pending_times[key]
            times.pop(0)
            until_us = time_us + self._attribution_us
            if times:
                until_us = min(until_us, times[0])
            else:
                del self._pending_times[key]
            labels = [0, 0, 0]
            tags = self._sample_tags.pop(sample_id, [])
            for f in self._followups.get(key, ()):
                if not f.claimed and time_us <= f.time_us < until_us:
                    f.claimed = True
                    labels[_LABEL_INDEX[f.action]] = 1
                    self._counters["attributed_followups"] += 1
                    if f.tag is not None:  # durable with the sample it labels
                        tags.append(f.tag)
                        f.tag = None
            own_window = self._window_of(time_us)
            assert self._open_from_us is not None  # set by the first batch
            window = max(own_window, self._open_from_us)
            if window != own_window:
                self._counters["late_impressions"] += 1
            self._windows.setdefault(window, []).append((*imp[:7], *labels, *imp[7:]))
            if tags:
                self._window_tags.setdefault(window, []).extend(tags)
            self._counters["samples_logged"] += 1

    def _expire(self, final_us: int, late_until_us: int) -> None:
        """Forget follow-ups with time <= final_us; log the ones that labelled nothing.

        A follow-up with time <= late_until_us expired in the batch it arrived in: it was
        late. Any other one had its chance and found no impression.
        """
        lines = []
        logged_tags = []
        while self._expiry and self._expiry[0][0] <= final_us:
            time_us, user, item, request, action = heapq.heappop(self._expiry)
            key = (user, item, request)
            entries = self._followups[key]
            index = next(i for i, f in enumerate(entries)
                         if f.time_us == time_us and f.action == action)
            f = entries.pop(index)
            if not entries:
                del self._followups[key]
            if not f.claimed and self._manifest and self._labelled_in_recorded_window(
                    key, time_us, action):
                # Replayed (a restarted worker, a partition that moved): it labelled a
                # sample already written. Not late, not unmatched.
                self._counters["already_recorded_followups"] += 1
                self._release((f.tag,))
            elif not f.claimed:
                reason = LATE if time_us <= late_until_us else UNMATCHED
                lines.append(f'{{"reason":{json.dumps(reason)},"event":{f.json}}}\n')
                logged_tags.append(f.tag)
        if lines:
            data = "".join(lines).encode()
            with open(self.late_events_path, "ab") as fh:
                fh.write(data)
                fh.flush()
            self._late_bytes += len(data)
            self._counters["late_events"] += len(lines)
            self._release(logged_tags)

    def _close(self, through_end_us: int) -> list[ClosedWindow]:
        """Close, in order, every open window that ends at or before through_end_us."""
        closed: list[ClosedWindow] = []
        released: list[Any] = []
        new_entries = False
        while self._open_from_us is not None and (
                self._open_from_us + self._window_us <= through_end_us):
            start = self._open_from_us
            window, written = self._write_window(start, self._windows.pop(start, []))
            closed.append(window)
            new_entries |= written
            released.extend(self._window_tags.pop(start, ()))
            self._open_from_us = start + self._window_us
        if new_entries:
            entries = [self._manifest[start] for start in sorted(self._manifest)]
            payload = json.dumps(entries, indent=2).encode() + b"\n"
            write_atomically(self.manifest_path, lambda fh: fh.write(payload))
        # A window counts once the manifest has it (a file without an entry is rewritten).
        self._release(released)
        if closed:
            # Remember sample ids until the window after theirs has closed.
            forget_before = self._open_from_us - self._window_us
            for start in [s for s in self._seen if s < forget_before]:
                del self._seen[start]
            for start in [s for s in self._recorded if s < forget_before]:
                del self._recorded[start]
        return closed

    def _write_window(self, start: int, rows: list[tuple[Any, ...]]) -> tuple[ClosedWindow, bool]:
        """Write one window file unless the manifest has it; True when it was written."""
        end = start + self._window_us
        name = _datetime(start).strftime("%Y%m%dT%H%M%SZ") + ".parquet"
        path = self.windows_dir / name
        self._counters["windows_closed"] += 1
        recorded = self._manifest.get(start)
        if recorded is not None:
            # Replay after a restore: the file consumers may already have read stays.
            self._counters["windows_already_recorded"] += 1
            if recorded["samples"] != len(rows):
                log.warning("window %s is recorded with %d samples; replay made %d, kept the "
                            "recorded file", name, recorded["samples"], len(rows))
            return ClosedWindow(start, end, path, recorded["samples"]), False

        # A fixed row order makes the file a function of its samples, not of arrival order.
        rows.sort(key=itemgetter(6, 0))
        columns = list(zip(*rows, strict=True)) if rows else [()] * (len(SCHEMA) - 1)
        columns.append((start,) * len(rows))  # window_start
        arrays = [pa.array(column, type=field.type)
                  for column, field in zip(columns, SCHEMA, strict=True)]
        table = pa.Table.from_arrays(arrays, schema=SCHEMA)
        write_atomically(path, lambda fh: pq.write_table(table, fh))
        self._manifest[start] = {
            "start": format_event_time(_datetime(start)),
            "end": format_event_time(_datetime(end)),
            "path": name,
            "samples": len(rows),
            "closed_at_watermark": format_event_time(_datetime(self._watermark_us)),
        }
        return ClosedWindow(start, end, path, len(rows)), True
