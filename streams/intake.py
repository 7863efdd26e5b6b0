"""Intake: the rules every driver applies to wire records before any processor sees them.

Both drivers, the local runner (``streams/local_runner.py``) and the Faust worker
(``streams/app.py``), hand each record to :meth:`Intake.admit` and get back, in order, the
events to process and the dead letters to route. The rules, stated once:

* **Decoding** (:func:`ppm.events.decode_record`): a record is one event or a JSON array of
  one key's events; anything else, and any element that is not a valid event, is a dead
  letter with its reason. It never raises.
* **Clock guards**, with ``J = pipeline.max_clock_jump_s``: an event more than J ahead of
  when its record was received is a dead letter: the Kafka record's timestamp (the
  producer's clock, never later than this worker's), so a replay decides the same; for a
  file, the wall clock. One far-future event would otherwise close every training window
  (behaviors) or make every later update and delete of an item look "older" (items). A
  driver that reads one ordered stream (the local runner) also holds behaviors to the
  stream's own clock (``stream_clock``): one more than J ahead of the newest behavior so
  far is a dead letter, as a wrong timestamp in a replay of history would still be in the
  past. The Faust worker does not: its clock would depend on which partitions a worker
  happens to own, and the same record could be applied by one worker and dead-lettered by
  another. A simulated world dated more than J in the future needs a larger J.
* **Counters**: records, events and dead letters by failure class (``stage``), so every
  event has a fate: processed, or a dead letter with its reason.

The dead letters of a processing failure are made here too, so they read alike:
:func:`processing_dead_letter` (one record failed in a processor; the rest of its batch
went on). A failure to produce a dead letter has no letter: it is retried, or the worker
stops.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any, Literal

from ppm.clock import now_us, to_us
from ppm.config import Config
from ppm.events import BehaviorEvent, DeadLetter, ItemEvent, decode_record

Kind = Literal["item", "behavior"]
Admitted = ItemEvent | BehaviorEvent | DeadLetter


class Intake:
    """Decodes records and applies the clock guards; keeps the counts.

    Args:
        cfg: the configuration (``contracts``, ``images.max_bytes``,
            ``pipeline.max_clock_jump_s``).
        stream_clock: also hold behaviors to the newest behavior admitted so far (for a
            driver that reads one ordered stream; see the module docstring).
        wall_clock_us: the wall clock, µs since the epoch (a parameter for tests).
    """

    def __init__(self, cfg: Config, stream_clock: bool = False, wall_clock_us=now_us):
        self.cfg = cfg
        self.stream_clock = stream_clock
        self.wall_clock_us = wall_clock_us
        self.clock_us: dict[str, int] = {"item": 0, "behavior": 0}
        """The newest admitted event time per kind, µs; 0 before the first."""
        self.counts: Counter[str] = Counter()
        """``records``, ``item_events``, ``behavior_events`` (admitted) and
        ``dead_letters:<stage>``."""

    def admit(self, kind: Kind, raw: bytes | str | None, source: str,
              received_us: int | None = None) -> list[Admitted]:
        """The events and dead letters of one record, in the record's order. Never raises.

        ``source`` names the record (``items:3:1042`` for topic, partition, offset; or
        ``item:17`` for a file position); an element of a packed record is ``source[i]``.
        ``received_us``: the Kafka record's timestamp (µs); None: now.
        """
        return [event for _, event in self.admit_with_sources(kind, raw, source, received_us)]

    def admit_with_sources(self, kind: Kind, raw: bytes | str | None, source: str,
                           received_us: int | None = None) -> list[tuple[str, Admitted]]:
        """As :meth:`admit`, each event or dead letter with its own source (``source``, or
        ``source[i]`` for the elements of an array)."""
        self.counts["records"] += 1
        out = decode_record(raw, kind, source, self.cfg.contracts, self.cfg.images.max_bytes)
        jump_us = self.cfg.pipeline.max_clock_jump_s * 1e6
        received = self.wall_clock_us()
        if received_us is not None:
            received = min(received, received_us)  # a producer's clock may be wrong, too
        # The element sources decode_record gives: "[i]" whenever the record is an array.
        packed = isinstance(raw, bytes | bytearray | str) and raw.lstrip()[:1] in (b"[", "[")
        sources = [f"{source}[{i}]" if packed else source for i in range(len(out))]
        for i, event in enumerate(out):
            if isinstance(event, DeadLetter):
                self.counts["dead_letters:decode"] += 1
                continue
            t = to_us(event.event_time)
            clock = self.clock_us[kind]
            if t > received + jump_us:
                ahead = f"{(t - received) / 1e6:,.0f}s ahead of when it was received"
            elif (self.stream_clock and kind == "behavior" and clock
                  and t > clock + jump_us):
                ahead = f"{(t - clock) / 1e6:,.0f}s ahead of the stream"
            else:
                self.clock_us[kind] = max(clock, t)
                self.counts[f"{kind}_events"] += 1
                continue
            out[i] = DeadLetter(
                expected=kind, source=sources[i], received_at=datetime.now(UTC),
                payload=event.to_json().decode(),
                reason=(f"event_time: {ahead} (limit pipeline.max_clock_jump_s = "
                        f"{self.cfg.pipeline.max_clock_jump_s:,.0f}s)"))
            self.counts["dead_letters:decode"] += 1
        return list(zip(sources, out, strict=True))

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
