"""The local runner: replays an event stream through the processors, with no servers.

It admits wire records through :class:`streams.intake.Intake`, as the Faust worker does
(malformed ones, and events too far ahead of the stream's clock, go to
``dead_letters.jsonl`` with their reason; so does an item the encoder fails on alone),
micro-batches item events into :class:`ItemEmbedder` and behavior events into
:class:`SequenceBuilder` then :class:`TrainingLogWriter`, at full speed or at N x real time.

**Clock.** Batches are bounded in *event time*: an item batch closes when it is full, when
the stream has moved ``item_batch_wait_s`` past its first event, or with the next behavior
batch (``behavior_batch_size`` events). For a live stream that is the wall clock; for a
replay it keeps the pipeline's behaviour (how long a new item waits to be embedded, measured
in the stream's own time) independent of replay speed.

**Checkpoints.** Every ``pipeline.checkpoint_every`` records, and at the end, the runner
flushes its batches and writes ``checkpoint.json`` atomically: the input position and every
processor's state (JSON: loading a checkpoint runs no code). A restarted runner resumes
from it: records before the position are skipped, files it appends to are cut back to their
checkpointed size, and work redone after the checkpoint is idempotent (guarded online
writes, window files by name).
"""

from __future__ import annotations

import contextlib
import heapq
import json
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from feature_repo.item_log import ItemLog
from feature_repo.online_features import OnlineFeatures
from ppm.atomic_file import append_line, size_of, truncate_to, write_atomically
from ppm.clock import iso, now_us, to_us
from ppm.config import Config
from ppm.events import BehaviorEvent, DeadLetter, ItemEvent
from ppm.records import ItemState, UserSequence
from streams.freshness import FreshnessStats
from streams.intake import Intake, processing_dead_letter
from streams.item_embedder import EmbedResult, ItemEmbedder
from streams.sequence_builder import SequenceBuilder
from streams.sources.catalog_import import refuse_existing_run
from streams.training_log import TrainingLogWriter

CHECKPOINT_VERSION = 3  # 3: freshness as a histogram (streams.freshness)
Record = tuple[Literal["item", "behavior"], bytes]


@dataclass
class RunSummary:
    """Counts of one run (cumulative over restarts: they live in the checkpoint)."""

    records: int = 0
    item_events: int = 0
    behavior_events: int = 0
    dead_letters: int = 0
    items_embedded: int = 0
    items_unchanged: int = 0
    items_deleted: int = 0
    item_events_ignored: int = 0
    """Older-than-stored or duplicate item events (no-ops by design)."""
    image_errors: int = 0
    sequences_written: int = 0
    windows_closed: int = 0
    resumed_from: int = 0
    """Input position this run started at (0 for a fresh run)."""
    source: str = ""
    """What was streamed (checked on resume: a checkpoint only fits its own input)."""
    finished: bool = False
    training_log: dict = field(default_factory=dict)
    freshness: dict = field(default_factory=dict)
    intake: dict = field(default_factory=dict)
    """Records, admitted events and dead letters by failure class (``streams.intake``)."""


class LocalRunner:
    """Streams records through the pipeline into ``cfg.data_dir``.

    Layout of ``cfg.data_dir``: ``feast/`` (the online store), ``offline/item_embedding/``
    (item log parts), ``training/windows/`` (labelled windows), ``dead_letters.jsonl``,
    ``item_warnings.jsonl`` (photos that could not be used), ``freshness.json`` (a histogram
    of arrival-to-readable lags) and ``freshness-items/local/`` (per embedded item: event
    time, arrival, readable online; appended in parts), ``checkpoint.json`` and its
    readable twin ``summary.json`` (named by ``cfg.paths``: :class:`ppm.data_dir.DataDir`).

    Args:
        cfg: the configuration.
        encoder: an ``ItemEncoder``; built from ``cfg`` when None (loading takes seconds).
        resume: continue from ``checkpoint.json`` when there is one.
    """

    def __init__(self, cfg: Config, encoder=None, resume: bool = True):
        from encoders.item_encoder import ItemEncoder  # torch: only when a runner is built

        self.cfg = cfg
        self.root = Path(cfg.data_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        paths = cfg.paths
        self.store = OnlineFeatures.open(cfg)
        self.encoder = encoder or ItemEncoder.from_config(cfg)
        self.freshness = FreshnessStats(keep_items=True)
        self.embedder = ItemEmbedder(
            self.encoder, self.store, ItemLog(paths.item_log),
            freshness=self.freshness,
        )
        self.sequences = SequenceBuilder.of(cfg, self.store)
        self.training_log = TrainingLogWriter(
            paths.training,
            sequences=self.sequences,
            items=self.embedder.state,
            attribution_window_s=cfg.pipeline.attribution_window_s,
            window_s=cfg.pipeline.log_window_s,
        )
        self.intake = Intake(cfg, stream_clock=True)  # one ordered stream: its own clock
        self.summary = RunSummary()
        self.dead_letter_path = paths.dead_letters
        self.warning_path = paths.item_warnings
        self.checkpoint_path = paths.checkpoint
        self.summary_path = paths.summary
        self.freshness_path = paths.freshness
        self.freshness_items = paths.freshness_items_of("local")
        self._items: list[tuple[ItemEvent, int, str]] = []  # (event, arrived, source)
        self._behaviors: list[BehaviorEvent] = []
        self._clock_us = 0  # the stream's clock: the newest event time seen
        if resume and self.checkpoint_path.exists():
            self._restore()
        else:
            for path in (self.dead_letter_path, self.warning_path):
                path.unlink(missing_ok=True)
            shutil.rmtree(self.freshness_items, ignore_errors=True)

    # ------------------------------------------------------------------ the loop

    def run(
        self,
        records: Iterable[Record],
        source: str,
        speed: float | None = None,
        progress: bool = True,
        stop_after: int | None = None,
    ) -> RunSummary:
        """Process ``records`` (wire bytes, in event-time order) from the checkpointed position.

        ``source`` names the input (e.g. ``jsonl:/path``); resuming a checkpoint of another
        source is an error. ``speed``: None replays as fast as possible; N paces events at
        N x real time. ``stop_after``: stop (without finishing the windows) after this many
        records in total, checkpointed; for partial runs and tests.
        """
        from tqdm import tqdm

        if self.summary.records and self.summary.source != source:
            raise ValueError(f"the checkpoint in {self.root} is for {self.summary.source!r}, "
                             f"not {source!r}; start over with resume=False (--fresh)")
        self.summary.source = source
        start = self.summary.records
        self.summary.resumed_from = start
        pace = _Pacer(speed)
        bar = tqdm(desc="stream", unit=" ev", disable=not progress, mininterval=0.5,
                   initial=start)
        every = self.cfg.pipeline.checkpoint_every
        for position, (kind, raw) in enumerate(records):
            if position < start:
                continue  # processed before the checkpoint we resumed from
            if stop_after is not None and position >= stop_after:
                self.checkpoint()
                bar.close()
                return self.summary
            where = f"{kind}:{position}"
            for source, event in self.intake.admit_with_sources(kind, raw, where):
                self._accept(event, source, pace)
            self.summary.records = position + 1
            bar.update(1)
            if self.summary.records % every == 0:
                self.checkpoint()
        bar.close()
        self._flush()
        self.summary.windows_closed += len(self.training_log.close_all())
        self.summary.finished = True
        self.checkpoint()
        return self.summary

    def _dead_letter(self, letter: DeadLetter) -> None:
        self.summary.dead_letters += 1
        append_line(self.dead_letter_path, letter.to_json())

    def _accept(self, event: ItemEvent | BehaviorEvent | DeadLetter, source: str,
                pace: _Pacer) -> None:
        if isinstance(event, DeadLetter):
            self._dead_letter(event)
            return
        t = to_us(event.event_time)
        pace.wait_for(t)
        self._clock_us = max(self._clock_us, t)
        if isinstance(event, ItemEvent):
            self.summary.item_events += 1
            self._items.append((event, now_us(), source))
        else:
            self.summary.behavior_events += 1
            self._behaviors.append(event)
        wait_us = self.cfg.pipeline.item_batch_wait_s * 1e6
        if ((self._items and (
                len(self._items) >= self.cfg.pipeline.item_batch_size
                or self._clock_us - to_us(self._items[0][0].event_time) >= wait_us))
                or len(self._behaviors) >= self.cfg.pipeline.behavior_batch_size):
            self._flush()

    def _flush(self) -> None:
        """Items first, then behaviors. A queued impression may be older than a queued item
        update; the log writer keeps only embedding versions older than each impression, so
        applying the items first never leaks the future, and a new item's first impressions
        find its embedding as they would in a live stream."""
        self._flush_items()
        self._flush_behaviors()

    def _flush_items(self) -> None:
        if not self._items:
            return
        events, arrived, sources = zip(*self._items, strict=True)
        result: EmbedResult = self.embedder.process(list(events), list(arrived))
        source_of = {id(e): src for e, src in zip(events, sources, strict=True)}
        self._items = []
        for event, reason, error_type in result.rejected.values():
            letter = processing_dead_letter(event, source_of[id(event)], reason, error_type)
            self.intake.count_dead_letter(letter)
            self._dead_letter(letter)
        s = self.summary
        s.items_embedded += result.encoded
        s.items_unchanged += result.unchanged
        s.items_deleted += result.deleted
        s.item_events_ignored += result.older + result.duplicates
        s.image_errors += len(result.image_errors)
        for item_id, reason in result.image_errors.items():
            append_line(self.warning_path,
                         json.dumps({"item_id": item_id, "reason": reason}).encode())

    def _flush_behaviors(self) -> None:
        if not self._behaviors:
            return
        # Sequences first: the log writer cuts each user's sequence at the impression time.
        self.summary.sequences_written += len(self.sequences.process(self._behaviors))
        self.summary.windows_closed += len(self.training_log.process(self._behaviors))
        self._behaviors = []

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> None:
        """Flush the batches and save the whole state atomically."""
        self._flush()
        self.summary.training_log = dict(self.training_log.counters)
        self.summary.freshness = self.freshness.percentiles()
        # Before the state: a part written after the last checkpoint is overwritten by the
        # replay (its number comes back with the state), never doubled.
        self.freshness.write_items_part(self.freshness_items)
        self.summary.intake = dict(self.intake.counts)
        state = {
            "version": CHECKPOINT_VERSION,
            "encoder_version": self.encoder.encoder_version,
            "summary": asdict(self.summary),
            "clock_us": self._clock_us,
            "intake": self.intake.state_dict(),
            "items": [asdict(s) for s in self.embedder.state.values()],
            "sequences": [asdict(s) for s in self.sequences.state.values()],
            "training_log": self.training_log.state_dict(),
            "freshness": self.freshness.state_dict(),
            "file_sizes": {p.name: size_of(p) for p in (self.dead_letter_path,
                                                             self.warning_path)},
        }
        write_atomically(self.checkpoint_path, json.dumps(state).encode())
        self.freshness.save(self.freshness_path)
        # The same figures for people and other commands (ppm features get reads the clock).
        readable = {"clock": iso(self._clock_us),
                    **asdict(self.summary)}
        write_atomically(self.summary_path, json.dumps(readable, indent=2).encode())

    def _restore(self) -> None:
        state = json.loads(self.checkpoint_path.read_bytes())
        if state.get("version") != CHECKPOINT_VERSION:
            raise RuntimeError(f"{self.checkpoint_path} is from another ppm version; "
                               "delete it (or use --fresh) to start over")
        self.summary = RunSummary(**state["summary"])
        self._clock_us = state["clock_us"]
        self.intake.load_state_dict(state["intake"])
        self.embedder.state.update({s["item_id"]: ItemState(**s) for s in state["items"]})
        self.sequences.state.update({
            s["user_id"]: UserSequence(s["user_id"], *(tuple(s[k]) for k in (
                "item_ids", "actions", "times_us"))) for s in state["sequences"]})
        self.training_log.load_state_dict(state["training_log"])
        self.freshness.load_state_dict(state["freshness"])
        # Lines appended after the checkpoint will be appended again: cut them off.
        for path in (self.dead_letter_path, self.warning_path):
            truncate_to(path, state["file_sizes"].get(path.name, 0))


class _Pacer:
    """Sleeps so that events are released at ``speed`` x real time (None: no waiting)."""

    def __init__(self, speed: float | None):
        if speed is not None and speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        self.speed = speed
        self._origin: tuple[int, float] | None = None  # (first event time µs, wall s)

    def wait_for(self, event_us: int) -> None:
        if self.speed is None:
            return
        if self._origin is None:
            self._origin = (event_us, time.monotonic())
            return
        due = self._origin[1] + (event_us - self._origin[0]) / 1e6 / self.speed
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def jsonl_records(folder: Path, max_jump_s: float = 86_400.0) -> Iterator[Record]:
    """``items.jsonl`` and ``behaviors.jsonl`` of ``folder`` merged into one stream.

    Each file must be in event-time order (``ppm simulate`` writes them so). Lines are
    merged by the ``event_time`` they carry; a line without a readable one (malformed), or
    one more than ``max_jump_s`` ahead of the previous line of its file (a wrong timestamp:
    it would hold back every later line of its file), keeps its place after the previous
    line. At equal times items come first.
    """

    def lines(kind: Literal["item", "behavior"]) -> Iterator[tuple[float, int, Record]]:
        path = Path(folder) / f"{kind}s.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"no {path.name} in {folder}")
        last = float("-inf")
        with open(path, "rb") as fh:
            for raw in fh:
                raw = raw.rstrip(b"\n")
                # A malformed line keeps the previous time; the decoder will say what is wrong.
                with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError,
                                         RecursionError):
                    t = datetime.fromisoformat(json.loads(raw)["event_time"]).timestamp()
                    if last == float("-inf") or t <= last + max_jump_s:
                        last = t
                yield last, 0 if kind == "item" else 1, (kind, raw)

    for _, _, record in heapq.merge(lines("item"), lines("behavior"), key=lambda x: x[:2]):
        yield record


def import_into_pipeline(cfg: Config, events_dir: Path, progress: bool = True,
                         encoder=None) -> RunSummary:
    """Stream ``events_dir`` (from :func:`streams.sources.catalog_import.write_events`)
    through a fresh :class:`LocalRunner` into ``cfg.data_dir``, with the ``history`` preset
    (:data:`ppm.config.PRESETS`) laid over ``cfg``.

    ``cfg.data_dir`` must not hold another run (FileExistsError): old training windows and
    stored items would mix with this import. ``encoder``: an ``ItemEncoder`` to reuse
    (default: built from ``cfg``, a few seconds). Items with no image get a zero image part;
    that is not an image error (``item_warnings.jsonl`` lists only unreadable images).
    """
    events_dir = Path(events_dir)
    refuse_existing_run(cfg.data_dir)
    runner = LocalRunner(cfg.with_preset("history"), encoder=encoder, resume=False)
    return runner.run(jsonl_records(events_dir, runner.cfg.pipeline.max_clock_jump_s),
                      source=f"jsonl:{events_dir}", progress=progress)
