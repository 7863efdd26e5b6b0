"""The distributed path: the pipeline's processors as Faust agents on Kafka.

Run a worker (settings from ``$PPM_CONFIG`` and ``PPM__...`` variables, see ``ppm.config``)::

    PPM__KAFKA__BOOTSTRAP=127.0.0.1:9092 \\
    PPM__FEATURES__STORE_YAML=feature_repo/feature_store.redis.yaml PPM_REDIS=127.0.0.1:6379 \\
    faust -A streams.app worker --without-web -l info

Agents (each a thin adapter: decode, batch, call the processor, retry, dead-letter):

* ``embed_items`` reads ``items`` (keyed by item_id) in batches of ``take(n, within)`` and
  hands them to :class:`streams.item_embedder.ItemEmbedder` unchanged, one batch at a time
  while the next one gathers, with the encoder in a child process
  (:class:`encoders.encoder_process.EncoderProcess`); the items' ID features also go to a
  global table, which the training-log writer reads.
* ``build_sequences`` reads ``behaviors`` (keyed by user_id) in batches: sequences through
  :class:`streams.sequence_builder.SequenceBuilder` into a changelog-backed table (partitioned
  like the topic, so a restarted worker recovers its users' sequences), then labelled
  samples through :class:`streams.training_log.TrainingLogWriter` into the windowed logs.

Delivery is at least once. Faust commits an offset only after the event is acknowledged,
and the agents acknowledge a batch only after its online write returned: a store outage is
retried until it ends (nothing after the failed batch is read meanwhile), and an error that
is not an outage stops the worker before the batch is acknowledged. Behavior events are
acknowledged later still, once the training window they belong to is written, so a crash
replays what the log writer held in memory; the processors make replays harmless (older or
equal item events are ignored, a duplicate interaction changes no sequence, a closed window
is never written twice). A record holds one event or an array of one key's events
(:func:`ppm.events.decode_record`); what does not decode goes to the topic's dead-letter
topic (``<topic>-dead``) with its reason, and counts as done. Events are acknowledged in offset
order per partition (:class:`InOrderAcks`), so a commit never passes an event that is not
done yet, whatever Faust's own gap handling does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any, TypeVar

import faust

from ppm.config import Config, load_config
from ppm.events import BehaviorEvent, DeadLetter, ItemEvent, decode_record
from streams.item_state import ItemState
from streams.online_features import now_us
from streams.sequence_builder import SequenceBuilder, UserSequence, to_us
from streams.topics import ITEM_TABLE, SEQUENCE_TABLE

log = logging.getLogger(__name__)
T = TypeVar("T")
V = TypeVar("V")

#: How long a failed store write waits before the next try (doubling up to the last).
RETRY_DELAYS_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class TableView(MutableMapping[str, V]):
    """A Faust table of bytes -> bytes seen as ``str`` -> frozen dataclass.

    Keys are stored as the UTF-8 bytes the topics are keyed by: with ``use_partitioner``
    the changelog partition of a user is then the partition of the user's events, whichever
    event is current when it is written. Values are JSON (not pickle: a changelog is data
    anyone with topic access can write, and must not be able to run code in a worker).

    The last ``cache_size`` values read or written are kept decoded, each with the bytes it
    came from: the training-log writer reads a user's sequence and an item's state for every
    impression, and decoding JSON each time was most of its cost. A cached value is used
    only while the table still holds those very bytes, so a value the table got some other
    way (changelog recovery, another worker's write to a global table) is decoded afresh.
    """

    def __init__(self, table: MutableMapping[bytes, bytes], kind: type[V],
                 cache_size: int = 100_000):
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


class InOrderAcks:
    """Holds a stream's events and acknowledges them to Faust in offset order per partition.

    Faust commits the first run of consecutive acknowledged offsets of a partition, but
    while nothing has been committed yet (a new consumer group) it does not check that the
    run starts where the partition does (``faust.transport.consumer.Consumer._new_offset``):
    an event acknowledged ahead of an earlier one, such as a dead letter behind a batch
    still being written, could commit past the earlier one. Here an event is acknowledged
    only once it and every event before it on its partition are done.
    """

    def __init__(self, stream: faust.StreamT):
        self.stream = stream
        self._held: dict[Any, collections.deque[list]] = collections.defaultdict(
            collections.deque)  # partition -> [event, done] in offset order

    def hold(self, event: faust.EventT) -> list:
        """Keep ``event`` unacknowledged (take_events' own acknowledgement only releases
        its reference); call in the order events arrive. Returns its handle for
        :meth:`done`."""
        event.message.incref()
        entry = [event, False]
        self._held[event.message.tp].append(entry)
        return entry

    async def done(self, entries: Iterable[list]) -> None:
        """Mark these events done and acknowledge every partition's done prefix."""
        for entry in entries:
            entry[1] = True
        for held in self._held.values():
            while held and held[0][1]:
                await self.stream.ack(held.popleft()[0])


async def retrying(what: str, outage: tuple[type[BaseException], ...],
                   call: Callable[..., Awaitable[T]] | Callable[..., T], *args: Any) -> T:
    """``call(*args)`` (awaited if it is a coroutine) until it succeeds; an ``outage``
    exception is logged and retried with backoff, anything else propagates."""
    for attempt in range(1_000_000_000):
        try:
            result = call(*args)
            return await result if asyncio.iscoroutine(result) else result
        except outage as exc:
            delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]
            log.warning("%s failed (%s: %s); retry %d in %.1fs", what, type(exc).__name__,
                        exc, attempt + 1, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def store_outages() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the store is unreachable for now", worth retrying."""
    import redis.exceptions

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
            redis.exceptions.BusyLoadingError, ConnectionError, TimeoutError)


def stop_worker(what: str, exc: BaseException) -> None:
    """Exit at once, before Faust acknowledges the batch: an exception escaping an agent
    would end ``take_events``, whose clean-up acknowledges the batch that failed (and one
    escaping a task would go unnoticed)."""
    log.critical("%s failed; stopping the worker without committing it", what, exc_info=exc)
    logging.shutdown()
    os._exit(70)


@contextlib.asynccontextmanager
async def one_batch_ahead(apply: Callable[[T], Awaitable[None]], what: str
                          ) -> AsyncIterator[Callable[[T], Awaitable[None]]]:
    """Yield ``submit``: ``await submit(batch)`` hands ``batch`` to one task that runs
    ``await apply(batch)`` on the batches in order, while the agent gathers the next one.

    ``take_events`` waits up to its ``within`` after every batch; a processor idle for that
    long under load builds a backlog (p50 event-to-readable 1.4 s instead of 0.5 s in
    bench/freshness.py). ``submit`` waits while a batch is already waiting, so a backlog
    stays in Kafka. ``apply`` owns its events' acknowledgements (take_events acknowledges a
    batch when the agent's body is done, so the agent holds them: :class:`InOrderAcks`).
    Anything escaping ``apply`` stops the worker (:func:`stop_worker`), so nothing after a
    failed batch is acknowledged.
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


def create_app(cfg: Config) -> faust.App:
    """The Faust application of ``cfg``: topics, tables and the two agents."""
    kafka = cfg.kafka
    (cfg.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    app = faust.App(
        kafka.app_id,
        broker=[f"kafka://{b.strip()}" for b in kafka.bootstrap.split(",")],
        store="memory://",  # tables live in memory and are rebuilt from their changelogs
        datadir=str(cfg.data_dir / "faust"),
        topic_partitions=kafka.partitions,
        topic_replication_factor=kafka.replication_factor,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        # Behavior events stay unacknowledged until their window is written; a rebalance
        # must not wait for that.
        stream_wait_empty=False,
        # `faust worker` turns the web server on unless told --without-web; if it is on, it
        # listens on the loopback only, never on every interface.
        web_enabled=False,
        web_bind="127.0.0.1",
    )
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw",
           "value_serializer": "raw"}
    items_topic = app.topic(kafka.items_topic, **raw)
    behaviors_topic = app.topic(kafka.behaviors_topic, **raw)
    items_dead = app.topic(kafka.items_topic + kafka.dead_letter_suffix, **raw)
    behaviors_dead = app.topic(kafka.behaviors_topic + kafka.dead_letter_suffix, **raw)
    # bytes -> bytes, seen through TableView: keys are the topics' own key bytes.
    sequence_table = app.Table(SEQUENCE_TABLE, partitions=kafka.partitions, key_type=bytes,
                               value_type=bytes, use_partitioner=True)
    item_table = app.GlobalTable(ITEM_TABLE, partitions=kafka.partitions, key_type=bytes,
                                 value_type=bytes, use_partitioner=True)
    item_states = TableView(item_table, ItemState)
    outages = store_outages()
    pipeline = cfg.pipeline
    opened: dict[str, Any] = {}  # what the agents open once per worker
    freshness_path = cfg.data_dir / "freshness.parquet"
    opening = asyncio.Lock()

    async def store():
        """The worker's one OnlineFeatures, opened (and the feature repo applied) once:
        agents opening it side by side would write the registry file concurrently."""
        async with opening:
            if "store" not in opened:
                from streams.online_features import OnlineFeatures

                opened["store"] = await asyncio.to_thread(OnlineFeatures.open, cfg)
            return opened["store"]

    async def dead_letter(topic: faust.TopicT, letter: DeadLetter, key: bytes | None) -> None:
        await topic.send(key=key, value=letter.to_json())

    def decoded(events: list[faust.EventT], kind: str, topic: str
                ) -> Iterator[tuple[faust.EventT, list[ItemEvent | BehaviorEvent | DeadLetter]]]:
        """Each record with its events and dead letters (a record may hold several)."""
        for event in events:
            m = event.message
            where = f"{topic}:{m.partition}:{m.offset}"
            yield event, decode_record(event.value, kind, where, cfg.contracts,
                                       cfg.images.max_bytes)

    @app.agent(items_topic)
    async def embed_items(stream: faust.StreamT) -> None:
        from encoders.encoder_process import EncoderProcess
        from streams.freshness import FreshnessStats
        from streams.item_embedder import ItemEmbedder
        from streams.item_log import ItemLog

        # In a child process: the models' Python code would share this process's GIL with
        # the event loop, and ran at half speed here (encoders/encoder_process.py).
        encoder = await asyncio.to_thread(EncoderProcess, cfg)
        try:  # whatever fails from here on, the encoder's process is stopped
            freshness = FreshnessStats.read(freshness_path)  # a restart adds to the records
            opened["freshness"] = freshness
            item_log = ItemLog(cfg.data_dir / "offline" / "item_embedding")
            embedder = ItemEmbedder(encoder, await store(), item_log, freshness=freshness)

            acks = InOrderAcks(stream)
            tune_gc()

            async def embed(batch: tuple[list[ItemEvent], int, list[list]]) -> None:
                good, arrived, held = batch
                if good:
                    await retrying("item batch", outages, asyncio.to_thread, embedder.process,
                                   good, [arrived] * len(good))
                for item in good:  # what the log writer needs, for every worker
                    state = embedder.state.get(item.item_id)
                    if state is not None:
                        item_states[item.item_id] = state
                await acks.done(held)  # written: now their offsets may be committed

            async with one_batch_ahead(embed, "item batch") as submit:
                async for batch in stream.take_events(pipeline.item_batch_size,
                                                      within=pipeline.item_batch_wait_s):
                    arrived = now_us()
                    good: list[ItemEvent] = []
                    held = [acks.hold(event) for event in batch]
                    for event, items in decoded(batch, "item", kafka.items_topic):
                        for item in items:
                            if isinstance(item, DeadLetter):
                                await dead_letter(items_dead, item, event.key)
                            else:
                                good.append(item)
                    await submit((good, arrived, held))
        finally:
            await asyncio.to_thread(encoder.close)

    @app.timer(interval=2.0)
    async def save_freshness() -> None:
        """Keep DATA_DIR/freshness.parquet (read by `ppm status`) a few seconds behind."""
        stats = opened.get("freshness")
        if stats is not None and stats.count != opened.get("freshness_saved"):
            opened["freshness_saved"] = stats.count
            await asyncio.to_thread(stats.save, freshness_path)

    @app.agent(behaviors_topic)
    async def build_sequences(stream: faust.StreamT) -> None:
        from streams.training_log import TrainingLogWriter

        sequences = TableView(sequence_table, UserSequence)
        builder = SequenceBuilder(await store(), state=sequences, k=cfg.features.sequence_length)
        writer = TrainingLogWriter(
            cfg.data_dir / "training", sequences=sequences,
            items=item_states,
            attribution_window_s=pipeline.attribution_window_s,
            window_s=pipeline.log_window_s)
        acks = InOrderAcks(stream)
        tune_gc()
        # (latest event time, held record) of records not yet all in written windows
        waiting: list[tuple[int, list]] = []
        async for batch in stream.take_events(pipeline.behavior_batch_size, within=1.0):
            good: list[BehaviorEvent] = []
            settled: list[list] = []  # records of dead letters only
            for event, behaviors in decoded(batch, "behavior", kafka.behaviors_topic):
                held = acks.hold(event)  # until its training windows are written (below)
                latest = None
                for behavior in behaviors:
                    if isinstance(behavior, DeadLetter):
                        await dead_letter(behaviors_dead, behavior, event.key)
                    else:
                        good.append(behavior)
                        t = to_us(behavior.event_time)
                        latest = t if latest is None else max(latest, t)
                if latest is None:
                    settled.append(held)
                else:
                    waiting.append((latest, held))
            try:
                # The write runs in a thread (a Redis outage must not stall the event loop
                # and its heartbeats); the table is only touched here, in the loop.
                changed = builder.plan(good)
                if changed:
                    await retrying("sequence batch", outages, asyncio.to_thread,
                                   builder.sink.write_sequences, changed)
                    builder.commit(changed)
                writer.process(good)
            except Exception as exc:
                stop_worker("behavior batch", exc)
            # Events before the earliest open window are in written windows (or were late
            # and logged as such): done.
            done_before = writer.open_from_us
            finished = [h for t, h in waiting if done_before is not None and t < done_before]
            waiting = [(t, h) for t, h in waiting if done_before is None or t >= done_before]
            await acks.done(settled + finished)

    app.ppm_config = cfg  # for `ppm status` and tests
    return app


def tune_gc() -> None:
    """Make Python's cyclic garbage collector cheap for a long-running worker.

    Everything loaded so far (Faust's, Feast's and torch's modules: each agent calls this
    once it is set up) is moved out of the collector's sight (``gc.freeze``), and the
    youngest generation is collected every 50,000 allocations instead of 700. A worker
    allocates a few objects per event and frees almost all of them by reference counting;
    with the default thresholds the collector's passes over the large heap took about a
    fifth of the behavior agent's time (profiled while tuning bench/freshness.py).
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


# `faust -A streams.app worker` looks the application up here.
app = create_app(load_config())
