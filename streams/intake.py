"""Intake: the rules every driver applies to wire records before any processor sees them.

Both drivers, the local runner (``streams/local_runner.py``) and the Faust worker
(``streams/app.py``), hand each record to :meth:`Intake.admit` and get back, in order, the
events to process and the dead letters to route. The rules, stated once:

* **Decoding** (:func:`ppm.events.decode_record`): a record is one event or a JSON array of
  one key's events; anything else, and any element that is not a valid event, is a dead
  letter with its reason. It never raises.
* **Clock guards**, with ``J = pipeline.max_clock_jump_s``: any event more than J ahead of
  the wall clock (or, in a world dated ahead of it, of the newest event of its kind) is a
  dead letter; so is a behavior more than J ahead of the newest behavior admitted so far
  while it is itself more than J behind the wall clock (a replay of history, where a wrong
  timestamp would still be in the past). One far-future event would otherwise close every
  training window (behaviors) or make every later update and delete of an item look
  "older" (items). Items are not held to the item stream's own clock, nor live behaviors
  (within J of the wall clock) to the behavior stream's: a catalog, or a shop, may be quiet
  for days. A simulated world dated more than J in the future needs a larger J.
* **Counters**: records, events and dead letters by failure class (``stage``), so every
  event has a fate: processed, or a dead letter with its reason.

Dead letters of the other two failure classes are made here too, so they read alike:
:func:`processing_dead_letter` (one record failed in a processor; the rest of its batch
went on) and the ``stage="produce"`` field a driver sets when it had to cap a letter.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any, Literal

from ppm.config import Config
from ppm.events import BehaviorEvent, DeadLetter, ItemEvent, decode_record
from streams.online_features import now_us
from streams.sequence_builder import to_us

Kind = Literal["item", "behavior"]
Admitted = ItemEvent | BehaviorEvent | DeadLetter


class Intake:
    """Decodes records and applies the clock guards; keeps the counts.

    Args:
        cfg: the configuration (``contracts``, ``images.max_bytes``,
            ``pipeline.max_clock_jump_s``).
        wall_clock_us: the wall clock, µs since the epoch (a parameter for tests).
    """

    def __init__(self, cfg: Config, wall_clock_us=now_us):
        self.cfg = cfg
        self.wall_clock_us = wall_clock_us
        self.clock_us: dict[str, int] = {"item": 0, "behavior": 0}
        """The newest admitted event time per kind, µs; 0 before the first."""
        self.counts: Counter[str] = Counter()
        """``records``, ``item_events``, ``behavior_events`` (admitted) and
        ``dead_letters:<stage>``."""

    def admit(self, kind: Kind, raw: bytes | str, source: str) -> list[Admitted]:
        """The events and dead letters of one record, in the record's order. Never raises.

        ``source`` names the record (``items:3:1042`` for topic, partition, offset; or
        ``item:17`` for a file position); an element of a packed record is ``source[i]``.
        """
        self.counts["records"] += 1
        out = decode_record(raw, kind, source, self.cfg.contracts, self.cfg.images.max_bytes)
        jump_us = self.cfg.pipeline.max_clock_jump_s * 1e6
        # The element sources decode_record gives: "[i]" whenever the record is an array.
        packed = isinstance(raw, bytes | bytearray | str) and raw[:1] in (b"[", "[")
        for i, event in enumerate(out):
            if isinstance(event, DeadLetter):
                self.counts["dead_letters:decode"] += 1
                continue
            t = to_us(event.event_time)
            clock = self.clock_us[kind]
            wall = self.wall_clock_us()
            if t > max(wall, clock) + jump_us:
                ahead_of = "the wall clock" if wall >= clock else "the stream"
                base = max(wall, clock)
            elif kind == "behavior" and clock and t > clock + jump_us and t < wall - jump_us:
                ahead_of, base = "the stream", clock
            else:
                ahead_of = None
            if ahead_of is not None:
                out[i] = DeadLetter(
                    expected=kind, source=f"{source}[{i}]" if packed else source,
                    received_at=datetime.now(UTC), payload=event.to_json().decode(),
                    reason=(f"event_time: {(t - base) / 1e6:,.0f}s ahead of {ahead_of} "
                            f"(limit pipeline.max_clock_jump_s = "
                            f"{self.cfg.pipeline.max_clock_jump_s:,.0f}s)"))
                self.counts["dead_letters:decode"] += 1
                continue
            if t > clock:
                self.clock_us[kind] = t
            self.counts[f"{kind}_events"] += 1
        return out

    def count_dead_letter(self, letter: DeadLetter) -> None:
        """Count a dead letter made after intake (processing, production)."""
        self.counts[f"dead_letters:{letter.stage}"] += 1

    @property
    def dead_letters(self) -> int:
        return sum(n for k, n in self.counts.items() if k.startswith("dead_letters:"))

    def state_dict(self) -> dict[str, Any]:
        """Clocks and counts as JSON-ready data (for the local runner's checkpoint)."""
        return {"clock_us": dict(self.clock_us), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clock_us = {"item": 0, "behavior": 0, **state["clock_us"]}
        self.counts = Counter(state["counts"])


def processing_dead_letter(event: ItemEvent | BehaviorEvent, source: str, reason: str,
                           error: BaseException | str | None = None) -> DeadLetter:
    """The dead letter of an event a processor could not process (the rest of its batch
    was): ``stage="process"``, the reason and the exception's type."""
    error_type = (error if isinstance(error, str) or error is None
                  else type(error).__name__)
    return DeadLetter(expected=event.kind, source=source, received_at=datetime.now(UTC),
                      payload=event.to_json().decode(), reason=reason, stage="process",
                      error_type=error_type)
