"""The distributed path: the pipeline's processors as Faust agents on Kafka.

Run a worker (settings from ``$PPM_CONFIG`` and ``PPM__...`` variables, see ``ppm.config``)::

    PPM__KAFKA__BOOTSTRAP=127.0.0.1:9092 PPM__REDIS__URL=redis://127.0.0.1:6379/0 \\
    faust -A streams.app worker --without-web -l info

(``PPM__REDIS__URL`` alone selects Feast's Redis store yaml, ``ppm.config.RedisConfig``.)

More workers: the same command, on this host or others; they share the partitions.

Each worker serves Prometheus metrics (:mod:`streams.worker_metrics`: ours and Faust's
sensor) on ``kafka.metrics_host:kafka.metrics_port`` (the loopback and a free port by
default; -1: none), logs the address and writes it to ``DATA_DIR/metrics/<worker>.json``
for ``ppm status``.

Agents (each a short loop over :class:`ItemLane` / :class:`BehaviorLane`, which hold what
is the worker's own: batching, acknowledgements, retries, dead-letter topics):

* ``embed_items`` reads ``items`` (keyed by item_id) in batches of ``take(n, within)`` and
  hands them to :class:`streams.item_embedder.ItemEmbedder`, one batch at a time while the
  next one gathers, with the encoder in a child process
  (:class:`encoders.encoder_process.EncoderProcess`); the items' ID features also go to a
  global table, which the training-log writers read.
* ``build_sequences`` reads ``behaviors`` (keyed by user_id) in batches: sequences through
  :class:`streams.sequence_builder.SequenceBuilder` into a changelog-backed table (partitioned
  like the topic, so a worker that takes over a partition recovers its users' sequences),
  then labelled samples through one :class:`streams.training_log.TrainingLogWriter` per
  partition, into ``DATA_DIR/training/partition-<p>/``.

Failures, by class (Kafka Streams' three, KIP-1034), each with a fate:

* **decoding**: every record goes through :class:`streams.intake.Intake`, as in the local
  runner; what is not a valid event (or is too far ahead of the clock) goes to the topic's
  dead-letter topic (``<topic>-dead``) with its reason;
* **processing**: an item the encoder fails on alone is a dead letter too (``stage:
  "process"``, with the exception's type); the rest of its batch goes on;
* **production**: a dead letter is capped to ``kafka.dead_letter_max_bytes`` (a prefix of
  the payload, its full size and sha256) so it always fits the topic; its delivery is
  awaited, and retried while the broker is unreachable;
* **outages** (store or broker unreachable): retried with backoff and jitter; nothing after
  the failed batch is acknowledged meanwhile;
* **anything else** stops the worker (exit 70) before the batch is acknowledged, so a
  restart replays it: a crash, never a silent gap (an exception escaping an agent would be
  restarted by Faust with its events never acknowledged).

Delivery is at least once, and an offset is committed only after the durable write it
stands for: an item record once its batch is in the item log and the online store; a
behavior record once every sample it made is in a written window file (a late impression
included: :meth:`TrainingLogWriter.take_done`) and its sequences are in the store; a dead
letter once the broker has it. Events are acknowledged in offset order per partition
(:class:`InOrderAcks`), and only those acknowledgements count: Faust's Kafka transport is
replaced by :mod:`streams.kafka_transport`, which fixes how Faust's consumer loses or counts
records it skipped around a rebalance. The processors make replays harmless (older or equal
item events are ignored, a duplicate interaction changes no sequence, a sample already in a
recorded window is not written again).

Several workers never write the same file: training windows are per partition, the item
log's parts are named by their rows, and each worker keeps its own freshness figures and
photo warnings (``freshness/<worker>.json``, ``item_warnings/<worker>.jsonl``). When a
partition is revoked (a rebalance), its writer and its unacknowledged events are dropped;
its next owner replays them from the committed offset.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import dataclasses
import gc
import json
import logging
import os
import random
import socket
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    MutableMapping,
    Sequence,
)
from typing import Any, TypeVar

import faust

from ppm.atomic_file import append_line
from ppm.clock import now_us
from ppm.config import Config, load_config
from ppm.events import BehaviorEvent, DeadLetter, ItemEvent
from ppm.heap import freeze_heap
from ppm.records import ItemState, UserSequence
from streams.intake import Admitted, Intake, processing_dead_letter
from streams.kafka_transport import Transport
from streams.sequence_builder import SequenceBuilder
from streams.topics import ITEM_TABLE, SEQUENCE_TABLE
from streams.worker_metrics import WorkerMetrics, write_endpoint

log = logging.getLogger(__name__)
T = TypeVar("T")
V = TypeVar("V")


class TableView(MutableMapping[str, V]):
    """A Faust table of bytes -> bytes seen as ``str`` -> frozen dataclass.

    Keys are stored as the UTF-8 bytes the topics are keyed by: with ``use_partitioner``
    the changelog partition of a user is then the partition of the user's events, whichever
    event is current when it is written. Values are JSON (not pickle: a changelog is data
    anyone with topic access can write, and must not be able to run code in a worker).

    The last ``cache_size`` values (``kafka.table_cache_items``) read or written are kept
    decoded, each with the bytes it came from: the training-log writer reads a user's
    sequence and an item's state for every impression, and decoding JSON each time was most
    of its cost. A cached value is used only while the table still holds those very bytes,
    so a value the table got some other way (changelog recovery, another worker's write to a
    global table) is decoded afresh.
    """

    def __init__(self, table: MutableMapping[bytes, bytes], kind: type[V], cache_size: int):
        self.table = table
        self.kind = kind
        self.cache_size = cache_size
        self._fields = tuple(f.name for f in dataclasses.fields(kind))
        self._decoded: collections.OrderedDict[str, tuple[bytes, V]] = (
            collections.OrderedDict())

    def __getitem__(self, key: str) -> V:
        raw = self.table[key.encode()]
        hit = self._decoded.get(key)
        if hit is not None and hit[0] is raw:
            self._decoded.move_to_end(key)
            return hit[1]
        fields = json.loads(raw)
        # JSON has lists where the dataclasses hold tuples.
        value = self.kind(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in fields.items()})
        self._remember(key, raw, value)
        return value

    def __setitem__(self, key: str, value: V) -> None:
        raw = json.dumps({name: getattr(value, name) for name in self._fields}).encode()
        self.table[key.encode()] = raw
        self._remember(key, raw, value)

    def __delitem__(self, key: str) -> None:
        self._decoded.pop(key, None)
        del self.table[key.encode()]

    def __iter__(self) -> Iterator[str]:
        return (k.decode() for k in self.table)

    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.encode() in self.table

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def _remember(self, key: str, raw: bytes, value: V) -> None:
        self._decoded[key] = (raw, value)
        self._decoded.move_to_end(key)
        if len(self._decoded) > self.cache_size:
            self._decoded.popitem(last=False)



class Held:
    """One record held unacknowledged by :class:`InOrderAcks`; hashable by identity, so
    it can be a training-log tag."""

    __slots__ = ("done", "dropped", "event")

    def __init__(self, event: faust.EventT):
        self.event = event
        self.done = False
        self.dropped = False
        """Its partition was revoked: never acknowledged here, and not to be processed."""


class InOrderAcks:
    """Holds a stream's events and acknowledges them to Faust in offset order per partition.

    Faust commits the first run of consecutive acknowledged offsets of a partition, but it
    does not always check that the run starts at the first unacknowledged offset
    (``faust.transport.consumer.Consumer._new_offset``: not while the committed offset is
    None or 0, and a gap of exactly one offset passes): an event acknowledged ahead of an
    earlier one, such as a dead letter behind a batch still being written, could commit
    past the earlier one. Here an event is acknowledged only once it and every event before
    it on its partition are done.

    After a rebalance, events of a revoked partition fetched before it (still in
    ``take_events``' hands, say) are *stale*: they are marked dropped, never processed or
    acknowledged (their extra reference keeps Faust from acknowledging them either). Their
    partition's owner replays them from the committed offset; acknowledging them instead,
    ahead of the dropped ones, would let Faust commit past those while the group has no
    committed offset for the partition, and they would never be read again.
    """

    def __init__(self, stream: faust.StreamT):
        self.stream = stream
        self._held: dict[Any, collections.deque[Held]] = collections.defaultdict(
            collections.deque)  # partition -> held records in offset order
        self._stale_through: dict[Any, int] = {}  # partition -> last generation revoked

    def held(self) -> int:
        """Records held now (for ``ppm_unacknowledged_records``; called from the metrics
        server's thread: ``list`` copies the queues at once, under the GIL)."""
        return sum(len(queue) for queue in list(self._held.values()))

    def hold(self, event: faust.EventT) -> Held:
        """Keep ``event`` unacknowledged (take_events' own acknowledgement only releases
        its reference); call in the order events arrive. A stale event comes back dropped
        (see the class docstring): skip it."""
        event.message.incref()
        held = Held(event)
        tp = event.message.tp
        generation = event.message.generation_id
        if generation is not None and generation <= self._stale_through.get(tp, -1):
            held.dropped = True
        else:
            self._held[tp].append(held)
        return held

    async def done(self, records: Iterable[Held]) -> None:
        """Mark these records done and acknowledge every partition's done prefix."""
        for held in records:
            held.done = True
        consumer = self.stream.app.consumer
        for queue in self._held.values():
            while queue and queue[0].done:
                event = queue.popleft().event
                consumer.release(event.message)  # only released records count as acked
                await self.stream.ack(event)

    def drop(self, tps: Iterable[Any]) -> None:
        """Forget the records of revoked partitions, and any fetched before now that are
        still to come: their next owner replays them."""
        generation = self.stream.app.consumer_generation_id
        for tp in tps:
            self._stale_through[tp] = generation
            for held in self._held.pop(tp, ()):
                held.dropped = True


def is_retriable(exc: BaseException) -> bool:
    """Whether ``exc`` means "the store or the broker is unreachable for now"."""
    import aiokafka.errors
    import redis.exceptions

    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                        redis.exceptions.BusyLoadingError, ConnectionError, TimeoutError,
                        aiokafka.errors.KafkaConnectionError,
                        aiokafka.errors.KafkaTimeoutError)):
        return True
    return isinstance(exc, aiokafka.errors.KafkaError) and bool(getattr(exc, "retriable", False))


async def retrying(what: str, call: Callable[..., Awaitable[T]] | Callable[..., T],
                   *args: Any, delays: Sequence[float],
                   metrics: WorkerMetrics | None = None) -> T:
    """``call(*args)`` (awaited if it is a coroutine) until it succeeds; a retriable error
    (:func:`is_retriable`) is logged (and counted in ``metrics``) and retried after ``delays``
    (``kafka.retry_delays_s``, the last one repeating) with up to half again as jitter;
    anything else propagates."""
    attempt = 0
    while True:
        try:
            result = call(*args)
            return await result if asyncio.iscoroutine(result) else result
        except Exception as exc:
            if not is_retriable(exc):
                raise
            delay = delays[min(attempt, len(delays) - 1)]
            delay *= 1 + random.random() / 2
            attempt += 1
            if metrics is not None:
                metrics.retried(what, attempt)
            log.warning("%s failed (%s: %s); retry %d in %.1fs", what, type(exc).__name__,
                        exc, attempt, delay)
            await asyncio.sleep(delay)


def stop_worker(what: str, exc: BaseException) -> None:
    """Exit at once, committing nothing more: an exception escaping an agent would have
    Faust restart the agent with its held events never released (their partition stuck,
    or, for a group with nothing committed, later offsets committed past them), and one
    escaping a task would go unnoticed. A restarted worker replays from the committed
    offsets."""
    log.critical("%s failed; stopping the worker without committing it", what, exc_info=exc)
    logging.shutdown()
    os._exit(70)


@contextlib.asynccontextmanager
async def stopping_on_error(what: str) -> AsyncIterator[None]:
    """Anything but a cancellation escaping the block stops the worker (:func:`stop_worker`)."""
    try:
        yield
    except Exception as exc:
        stop_worker(what, exc)


@contextlib.asynccontextmanager
async def one_batch_ahead(apply: Callable[[T], Awaitable[None]], what: str
                          ) -> AsyncIterator[Callable[[T], Awaitable[None]]]:
    """Yield ``submit``: ``await submit(batch)`` hands ``batch`` to one task that runs
    ``await apply(batch)`` on the batches in order, while the agent gathers the next one.

    ``take_events`` waits up to its ``within`` after every batch; a processor idle for that
    long under load builds a backlog. ``submit`` waits while a batch is already waiting, so
    a backlog stays in Kafka. ``apply`` owns its events' acknowledgements (take_events
    acknowledges a batch when the agent's body is done, so the agent holds them:
    :class:`InOrderAcks`). Anything escaping ``apply`` stops the worker
    (:func:`stop_worker`), so nothing after a failed batch is acknowledged.
    """
    ready: asyncio.Queue[T] = asyncio.Queue(maxsize=1)

    async def apply_ready() -> None:
        while True:
            await apply(await ready.get())

    task = asyncio.ensure_future(apply_ready())
    task.add_done_callback(lambda done: done.cancelled() or done.exception() is None
                           or stop_worker(what, done.exception()))
    try:
        yield ready.put
    finally:
        task.cancel()


class DeadLetterTopic:
    """Where a topic's dead letters go: capped to fit, delivery awaited, outages retried."""

    def __init__(self, topic: faust.TopicT, max_bytes: int, retry_delays_s: Sequence[float],
                 source_topic: str = "", metrics: WorkerMetrics | None = None):
        self.topic = topic
        self.max_bytes = max_bytes
        self.retry_delays_s = retry_delays_s
        self.source_topic = source_topic
        self.metrics = metrics

    async def send(self, letters: list[tuple[DeadLetter, bytes | None]]) -> None:
        """Produce ``(letter, key)`` pairs and wait until the broker has every one."""
        if letters:
            await asyncio.gather(*(retrying("dead letter", self._send_one, letter, key,
                                            delays=self.retry_delays_s, metrics=self.metrics)
                                   for letter, key in letters))
            if self.metrics is not None:
                for letter, _ in letters:
                    self.metrics.dead_letter(self.source_topic, letter)

    async def _send_one(self, letter: DeadLetter, key: bytes | None) -> None:
        value = letter.capped(self.max_bytes).to_json()
        # wait=True: the broker's acknowledgement, not a place in the producer's buffer.
        await self.topic.publish_message(self.topic.as_future_message(key, value), wait=True)


def loop_time() -> float:
    """Monotonic seconds (the event loop's clock)."""
    return asyncio.get_running_loop().time()


def worker_name() -> str:
    """This worker process's name in file names: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclasses.dataclass
class Shared:
    """What both lanes of one worker use."""

    cfg: Config
    intake: Intake
    item_states: TableView[ItemState]
    opened: dict[str, Any]
    """What the worker opens once (its store, its freshness figures)."""
    metrics: WorkerMetrics = dataclasses.field(default_factory=WorkerMetrics)

    def decoded(self, events: list[faust.EventT], kind: str, topic: str
                ) -> Iterator[tuple[faust.EventT, list[tuple[str, Admitted]]]]:
        """Each record with its events and dead letters (a record may hold several), each
        with its source (``topic:partition:offset``, ``[i]`` for an array's elements)."""
        records, admitted = self.metrics.records.labels(topic), self.metrics.events.labels(kind)
        for event in events:
            m = event.message
            received_us = None if m.timestamp is None else int(m.timestamp * 1e6)
            out = self.intake.admit_with_sources(
                kind, event.value, f"{topic}:{m.partition}:{m.offset}", received_us)
            records.inc()
            admitted.inc(sum(not isinstance(a, DeadLetter) for _, a in out))
            yield event, out


class ItemLane:
    """The item agent's work: admit a batch, embed it while the next one gathers,
    acknowledge it once written."""

    def __init__(self, shared: Shared, stream: faust.StreamT, dead: DeadLetterTopic,
                 encoder: Any, store: Any):
        from feature_repo.item_log import ItemLog
        from streams.freshness import FreshnessStats
        from streams.item_embedder import ItemEmbedder

        cfg = shared.cfg
        self.shared, self.dead, self.topic = shared, dead, cfg.kafka.items_topic
        self.acks = InOrderAcks(stream)
        # This worker's own files: nobody else writes them.
        self.freshness = FreshnessStats(keep_items=cfg.kafka.freshness_items_part_s > 0)
        shared.opened["freshness"] = self.freshness
        shared.metrics.freshness_from(self.freshness)
        shared.metrics.held("items", self.acks.held)
        self.warnings_path = cfg.paths.worker_item_warnings(worker_name())
        self.warnings_path.parent.mkdir(parents=True, exist_ok=True)
        self.embedder = ItemEmbedder(encoder, store,
                                     ItemLog(cfg.paths.item_log),
                                     freshness=self.freshness)

    async def admit(self, batch: list[faust.EventT]
                    ) -> tuple[list[ItemEvent], list[str], int, list[Held]]:
        """Hold and decode a batch; its dead letters are delivered before this returns."""
        arrived = now_us()
        held = [self.acks.hold(event) for event in batch]
        good: list[ItemEvent] = []
        sources: list[str] = []
        letters = []
        fresh = [event for event, h in zip(batch, held, strict=True) if not h.dropped]
        for event, items in self.shared.decoded(fresh, "item", self.topic):
            for source, item in items:
                if isinstance(item, DeadLetter):
                    letters.append((item, event.key))
                else:
                    good.append(item)
                    sources.append(source)
        await self.dead.send(letters)
        return good, sources, arrived, held

    async def apply(self, batch: tuple[list[ItemEvent], list[str], int, list[Held]]) -> None:
        good, sources, arrived, held = batch
        if good:
            metrics = self.shared.metrics
            started = loop_time()
            result = await retrying("item batch", asyncio.to_thread, self.embedder.process,
                                    good, [arrived] * len(good),
                                    delays=self.shared.cfg.kafka.retry_delays_s,
                                    metrics=metrics)
            metrics.batch_seconds.labels("items").observe(loop_time() - started)
            metrics.items_embedded.inc(result.encoded)
            metrics.image_errors.inc(len(result.image_errors))
            source_of = {id(e): source for e, source in zip(good, sources, strict=True)}
            rejected = [processing_dead_letter(event, source_of[id(event)], reason, error_type)
                        for event, reason, error_type in result.rejected.values()]
            for letter in rejected:
                self.shared.intake.count_dead_letter(letter)
            await self.dead.send([(letter, letter_key) for letter, letter_key in zip(
                rejected, (item_id.encode() for item_id in result.rejected), strict=True)])
            for item_id, reason in result.image_errors.items():
                append_line(self.warnings_path,
                            json.dumps({"item_id": item_id, "reason": reason}).encode())
            for item in good:  # what the log writers need, for every worker
                state = self.embedder.state.get(item.item_id)
                if state is not None:
                    self.shared.item_states[item.item_id] = state
        await self.acks.done(held)  # written: now their offsets may be committed

    def revoke(self, tps: Iterable[Any]) -> None:
        """Partitions moved to another worker: forget their held records (a batch being
        embedded still finishes: its writes are idempotent)."""
        self.acks.drop(tps)


class BehaviorLane:
    """The behavior agent's work: sequences for the whole batch, samples through one
    training-log writer per partition, records acknowledged once their samples are on
    disk."""

    def __init__(self, shared: Shared, stream: faust.StreamT, dead: DeadLetterTopic,
                 sequences: TableView[UserSequence], store: Any):
        cfg = shared.cfg
        self.shared, self.dead, self.topic = shared, dead, cfg.kafka.behaviors_topic
        self.acks = InOrderAcks(stream)
        self.sequences = sequences
        self.builder = SequenceBuilder.of(cfg, store, state=sequences)
        shared.metrics.held("behaviors", self.acks.held)
        self.writers: dict[int, Any] = {}  # partition -> TrainingLogWriter
        self.last_event_s: dict[int, float] = {}  # partition -> monotonic time of its last
        self.busy = False  # a batch is being processed

    def writer(self, partition: int):
        """The partition's writer; a new one continues after the windows on disk."""
        from streams.training_log import TrainingLogWriter

        writer = self.writers.get(partition)
        if writer is None:
            pipeline = self.shared.cfg.pipeline
            writer = self.writers[partition] = TrainingLogWriter(
                self.shared.cfg.paths.training_partition(partition),
                sequences=self.builder, items=self.shared.item_states,
                attribution_window_s=pipeline.attribution_window_s,
                window_s=pipeline.log_window_s)
        return writer

    def revoke(self, tps: Iterable[Any]) -> None:
        """Partitions moved to another worker: forget their writers and held records."""
        tps = [tp for tp in tps if tp.topic == self.topic]
        self.acks.drop(tps)
        for tp in tps:
            self.writers.pop(tp.partition, None)
            self.last_event_s.pop(tp.partition, None)

    async def close_idle(self, idle_s: float) -> None:
        """Close every window of partitions quiet for ``idle_s`` (``pipeline.idle_close_s``)
        and acknowledge what that made durable."""
        if self.busy:  # a batch is between its events and its writers (an outage, say)
            return
        now = loop_time()
        done: list[Held] = []
        for partition, writer in list(self.writers.items()):
            if now - self.last_event_s.get(partition, now) >= idle_s:
                counters = writer.counters
                if counters["pending_impressions"] or counters["open_window_samples"] or (
                        counters["unresolved_followups"]):
                    self.count_closed(partition, writer.close_all())
                    done += writer.take_done()
        await self.acks.done(done)

    def count_closed(self, partition: int, windows: list) -> None:
        """Count a partition's closed windows (``ClosedWindow``) and their samples."""
        if windows:
            metrics = self.shared.metrics
            metrics.windows_closed.labels(str(partition)).inc(len(windows))
            metrics.samples_logged.inc(sum(w.samples for w in windows))

    async def process(self, batch: list[faust.EventT]) -> None:
        self.busy = True
        started = loop_time()
        try:
            await self._process(batch)
        finally:
            self.busy = False
        self.shared.metrics.batch_seconds.labels("behaviors").observe(loop_time() - started)

    async def _process(self, batch: list[faust.EventT]) -> None:
        by_partition: dict[int, tuple[list[BehaviorEvent], list[Held]]] = {}
        settled: list[Held] = []  # records of dead letters only
        letters = []
        held_of = {id(event): self.acks.hold(event) for event in batch}
        fresh = [event for event in batch if not held_of[id(event)].dropped]
        for event, admitted in self.shared.decoded(fresh, "behavior", self.topic):
            held = held_of[id(event)]  # until its samples are in written windows
            behaviors = [b for _, b in admitted]
            good = [b for b in behaviors if not isinstance(b, DeadLetter)]
            letters += [(b, event.key) for b in behaviors if isinstance(b, DeadLetter)]
            self.last_event_s[event.message.partition] = loop_time()
            if good:
                events, tags = by_partition.setdefault(event.message.partition, ([], []))
                events += good
                tags += [held] * len(good)
            else:
                settled.append(held)
        await self.dead.send(letters)
        # The write runs in a thread (a Redis outage must not stall the event loop and its
        # heartbeats); the table is only touched here, in the loop.
        changed = self.builder.plan([e for events, _ in by_partition.values() for e in events])
        if changed:
            await retrying("sequence batch", asyncio.to_thread,
                           self.builder.sink.write_sequences, changed,
                           delays=self.shared.cfg.kafka.retry_delays_s,
                           metrics=self.shared.metrics)
            self.shared.metrics.sequences_written.inc(len(changed))
            # A partition revoked meanwhile is its new owner's: its table rows are not ours
            # to change (the store write is repeated by the replay there).
            revoked = {e.user_id for events, tags in by_partition.values() if tags[0].dropped
                       for e in events}
            self.builder.commit([s for s in changed if s.user_id not in revoked])
        done = settled
        for partition, (events, tags) in by_partition.items():
            if tags[0].dropped:  # revoked while the sequences were written (a whole
                continue         # partition's records are dropped together)
            writer = self.writer(partition)
            self.count_closed(partition, writer.process(events, tags))
            self.last_event_s[partition] = loop_time()
            done += writer.take_done()
        await self.acks.done(done)


def create_app(cfg: Config) -> faust.App:
    """The Faust application of ``cfg``: topics, tables and the two agents."""
    kafka = cfg.kafka
    cfg.paths.faust.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        kafka.app_id,
        broker=[f"kafka://{b.strip()}" for b in kafka.bootstrap.split(",")],
        store="memory://",  # tables live in memory and are rebuilt from their changelogs
        datadir=str(cfg.paths.faust),
        topic_partitions=kafka.partitions,
        topic_replication_factor=kafka.replication_factor,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=kafka.commit_interval_s,
        # Behavior events stay unacknowledged until their window is written; a rebalance
        # must not wait for that.
        stream_wait_empty=False,
        # `faust worker` turns the web server on unless told --without-web; if it is on, it
        # listens on the loopback only, never on every interface.
        web_enabled=False,
        web_bind="127.0.0.1",
    )
    # Before any topic is declared (that creates the transport): see streams/kafka_transport.py.
    app.transport = Transport(app.conf.broker_consumer, app)
    metrics = WorkerMetrics(worker_name(), kafka.app_id)
    metrics.attach_faust(app)  # Faust's own sensor, into the same registry
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw",
           "value_serializer": "raw"}
    items_topic = app.topic(kafka.items_topic, **raw)
    behaviors_topic = app.topic(kafka.behaviors_topic, **raw)
    # bytes -> bytes, seen through TableView: keys are the topics' own key bytes.
    sequence_table = app.Table(SEQUENCE_TABLE, partitions=kafka.partitions, key_type=bytes,
                               value_type=bytes, use_partitioner=True)
    item_table = app.GlobalTable(ITEM_TABLE, partitions=kafka.partitions, key_type=bytes,
                                 value_type=bytes, use_partitioner=True)
    pipeline = cfg.pipeline
    opened: dict[str, Any] = {}  # what the agents open once per worker
    opening = asyncio.Lock()

    async def store():
        """The worker's one OnlineFeatures, opened (and the feature repo applied) once:
        agents opening it side by side would write the registry file concurrently."""
        async with opening:
            if "store" not in opened:
                from feature_repo.online_features import OnlineFeatures

                opened["store"] = await asyncio.to_thread(OnlineFeatures.open, cfg)
            return opened["store"]

    shared = Shared(cfg, Intake(cfg), TableView(item_table, ItemState, kafka.table_cache_items),
                    opened, metrics)

    def dead_letters(topic: str) -> DeadLetterTopic:
        return DeadLetterTopic(app.topic(topic + kafka.dead_letter_suffix, **raw),
                               kafka.dead_letter_max_bytes, kafka.retry_delays_s,
                               source_topic=topic, metrics=metrics)

    lanes: dict[str, Any] = {}

    @app.agent(items_topic)
    async def embed_items(stream: faust.StreamT) -> None:
        from encoders.encoder_process import EncoderProcess

        async with stopping_on_error("embed_items"):
            # In a child process: the models' Python code would share this process's GIL
            # with the event loop, and slowed down (encoders/encoder_process.py).
            encoder = await asyncio.to_thread(
                EncoderProcess, cfg, local_files=cfg.images.local_files_from_kafka)
            try:  # whatever fails from here on, the encoder's process is stopped
                lane = lanes["items"] = ItemLane(shared, stream, dead_letters(kafka.items_topic),
                                                 encoder, await store())
                tune_gc()
                async with one_batch_ahead(lane.apply, "item batch") as submit:
                    async for batch in stream.take_events(pipeline.item_batch_size,
                                                          within=pipeline.item_batch_wait_s):
                        await submit(await lane.admit(batch))
            finally:
                await asyncio.to_thread(encoder.close)

    @app.agent(behaviors_topic)
    async def build_sequences(stream: faust.StreamT) -> None:
        async with stopping_on_error("build_sequences"):
            lane = lanes["behaviors"] = BehaviorLane(
                shared, stream, dead_letters(kafka.behaviors_topic),
                TableView(sequence_table, UserSequence, kafka.table_cache_items), await store())
            tune_gc()
            async for batch in stream.take_events(pipeline.behavior_batch_size,
                                                  within=pipeline.behavior_batch_wait_s):
                await lane.process(batch)

    @app.on_partitions_revoked.connect
    async def forget_revoked(sender: Any, revoked: set, **kwargs: Any) -> None:
        for lane in lanes.values():
            lane.revoke(revoked)

    if pipeline.idle_close_s is not None:
        idle_s = pipeline.idle_close_s

        @app.timer(interval=min(1.0, idle_s / 2))
        async def close_idle_partitions() -> None:
            if "behaviors" in lanes:
                async with stopping_on_error("close_idle_partitions"):
                    await lanes["behaviors"].close_idle(idle_s)

    if kafka.metrics_port >= 0:

        @app.task
        async def serve_metrics() -> None:
            """Serve /metrics (streams/worker_metrics.py) and say where, in the log and in
            ``DATA_DIR/metrics/<worker>.json`` (removed when the worker exits)."""
            async with stopping_on_error("serve_metrics"):
                _server, url = metrics.serve(kafka.metrics_host, kafka.metrics_port)
                endpoint = cfg.paths.worker_metrics(worker_name())
                write_endpoint(endpoint, worker_name(), url)
                atexit.register(endpoint.unlink, missing_ok=True)
                log.info("metrics at %s", url)

    freshness_path = cfg.paths.worker_freshness(worker_name())
    freshness_path.parent.mkdir(parents=True, exist_ok=True)

    @app.timer(interval=kafka.freshness_save_s)
    async def save_freshness() -> None:
        """Keep this worker's freshness histogram (read by `ppm status`) a few seconds
        behind."""
        stats = opened.get("freshness")
        if stats is not None and stats.count != opened.get("freshness_saved"):
            opened["freshness_saved"] = stats.count
            await asyncio.to_thread(stats.save, freshness_path)

    if kafka.freshness_items_part_s > 0:
        freshness_items = cfg.paths.freshness_items_of(worker_name())

        @app.timer(interval=kafka.freshness_items_part_s)
        async def append_freshness_items() -> None:
            """Append the per-item freshness records kept since the last time as a part."""
            stats = opened.get("freshness")
            if stats is not None and stats.pending_items:
                await asyncio.to_thread(stats.write_items_part, freshness_items)

    app.ppm_config = cfg  # for `ppm status` and tests
    return app


def tune_gc() -> None:
    """Make Python's cyclic garbage collector cheap for a long-running worker.

    Everything loaded so far (Faust's, Feast's and torch's modules: each agent calls this
    once it is set up) is moved out of the collector's sight
    (:func:`ppm.heap.freeze_heap`), and the youngest generation is collected every 50,000
    allocations instead of 700. A worker
    allocates a few objects per event and frees almost all of them by reference counting;
    with the default thresholds the collector's passes over the large heap took a sizeable
    share of the behavior agent's time (profiled while tuning bench/freshness.py; figure in
    docs/results.md).
    """
    freeze_heap()
    gc.set_threshold(50_000, 20, 100)


# `faust -A streams.app worker` looks the application up here.
app = create_app(load_config())
