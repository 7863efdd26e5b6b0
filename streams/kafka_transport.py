"""Faust's Kafka transport (aiokafka), with two fixes that at-least-once delivery needs.

1. **A partition with no committed offset is re-read from its start after a seek.** Faust
   throws away records it fetched while a rebalance was going on (``Consumer.getmany`` when
   the flow is stopped or the generation changed) and then seeks every partition back to its
   committed offset (``Consumer.perform_seek``). aiokafka's ``seek_to_committed`` seeks only
   where the committed offset is above 0, so for a partition the group never committed the
   fetch position stayed *after* the records thrown away: the first records published while
   a second worker joined were never read by anyone, and the group committed past them.
   Here such a partition is sought to its beginning, which is what the group's reset policy
   (``consumer_auto_offset_reset="earliest"``) means for it.
2. **Only the application acknowledges.** Faust's stream acknowledges, on its own, the
   records it skips because they were fetched before a rebalance; if the partition comes
   back to the same worker, their offsets would be committed although nothing processed
   them, and a crash then loses them. Here an acknowledgement counts only for a record the
   application released (:meth:`Consumer.release`, called by ``streams.app.InOrderAcks``
   once the record's writes are durable).

3. **Records fetched around a seek are not delivered as if nothing happened.** Faust fetches
   in the consumer's thread and delivers on the event loop; its seek back to the committed
   offsets (``Consumer.perform_seek``, at the end of every rebalance's recovery) can land
   between the two. Records of the fetch made before it were then still delivered, and
   Faust's bookkeeping took them as the truth: it counted the offsets between the committed
   one and such a record as done (``Consumer._add_gap``), and, when the seek came while a
   record was being delivered, it set the partition's read offset to that record's *after*
   the seek had reset it, so the records the seek was for were dropped as already read
   (``Consumer._drain_messages``). Here a record of a partition sought since its fetch began,
   or while it ran, is not delivered: once that seek is done the partition is sought again
   (in the consumer's thread) to where the seek put it and read again from there
   (duplicates, which every write downstream absorbs; never gaps); offsets jumped over
   before a seek are forgotten; and a seek during a delivery keeps the read offset it set.
   Only acknowledging topics (ppm's input streams) of a group that starts partitions from
   their beginning (fix 1) are handled so; Faust's changelog recovery keeps its own
   offsets.

Install with ``app.transport = Transport(app.conf.broker_consumer, app)`` right after
creating the app (``streams.app.create_app``), before any topic is declared.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

log = logging.getLogger(__name__)


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    async def seek_to_committed(self) -> Mapping[TP, int]:
        """Seek every assigned partition to its committed offset, and a partition with
        none (or 0) to its beginning; return the committed offsets, as Faust expects."""
        return await self.call_thread(self._seek_to_committed_or_beginning)

    async def _seek_to_committed_or_beginning(self) -> Mapping[TP, int]:
        consumer = self._ensure_consumer()
        committed = await consumer.seek_to_committed()
        if self.app.conf.consumer_auto_offset_reset == "earliest":
            from_start = [tp for tp, offset in committed.items() if not offset]
            if from_start:
                await consumer.seek_to_beginning(*from_start)
        return committed


class Consumer(faust_aiokafka.Consumer):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._released: set[Any] = set()
        # Fix 3, for acknowledging topics:
        self._seeks: collections.Counter[TP] = collections.Counter()
        """Seeks begun, per partition."""
        self._seeking: collections.Counter[TP] = collections.Counter()
        """Seeks under way, per partition."""
        self._sought: dict[TP, int | None] = {}
        """Where each partition's last seek put it: an offset, or None for its beginning."""

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def release(self, message: Any) -> None:
        """Let the next acknowledgement of ``message`` count (its writes are durable)."""
        self._released.add(message)

    def ack(self, message: Any) -> bool:
        """Count an acknowledgement only for a released message; ignore Faust's own (of
        records it skipped)."""
        if message not in self._released:
            return False
        self._released.discard(message)
        return super().ack(message)

    # ------------------------------------------------------------------ fix 3

    def _rereads(self, tp: TP) -> bool:
        """Whether fix 3 covers ``tp``: an acknowledging topic, and a group that reads a
        partition without a committed offset from its beginning (as fix 1)."""
        return (self.app.conf.consumer_auto_offset_reset == "earliest"
                and self.app.topics.acks_enabled_for(tp.topic))

    @contextlib.asynccontextmanager
    async def _seeking_partitions(self, tps: list[TP]) -> AsyncIterator[None]:
        for tp in tps:
            self._seeks[tp] += 1
            self._seeking[tp] += 1
        try:
            yield
        finally:
            for tp in tps:
                self._seeking[tp] -= 1
                # Offsets jumped over before a seek say nothing about what is read after it.
                self._gap.pop(tp, None)

    async def perform_seek(self) -> None:
        """Faust's seek of every partition to its committed offset, remembered (fix 3)."""
        tps = [tp for tp in self.assignment() if self._rereads(tp)]
        async with self._seeking_partitions(tps):
            await super().perform_seek()
            # Faust has just set each read offset to the committed one (None: none).
            self._sought.update({tp: self._read_offset.get(tp) for tp in tps})

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Any]]:
        """Faust's fetch, less the records of partitions sought since it began or while it
        ran (fix 3)."""
        seeks = self._seeks.copy()  # before the fetch
        seeking = {tp for tp, n in self._seeking.items() if n}
        sought_again: set[TP] = set()
        async for tp, message in super().getmany(timeout):
            if not self._rereads(tp):
                yield tp, message
                continue
            if tp in seeking or self._seeking[tp] or self._seeks[tp] != seeks[tp]:
                if tp not in sought_again:
                    sought_again.add(tp)
                    await self._seek_again(tp, message.offset)
                continue
            read = self._read_offset.get(tp)
            if read is not None and message.offset < read:  # Faust will drop it as read
                log.warning("%s: record %d is below the read offset %d", tp, message.offset,
                            read)
            yield tp, message
            # Faust's drain loop has now set tp's read offset to this record's. A seek that
            # began meanwhile sets it itself if still under way; put back what a finished
            # one set, where reading resumes.
            if self._seeks[tp] != seeks[tp] and not self._seeking[tp]:
                self._read_offset[tp] = self._sought.get(tp)

    async def _seek_again(self, tp: TP, skipped: int) -> None:
        """Seek ``tp`` back to where its last seek put it, once that seek is done (its
        records from ``skipped`` on were fetched around it and not delivered)."""
        from aiokafka.errors import IllegalStateError

        while self._seeking[tp]:  # the seek under way decides where reading resumes
            await asyncio.sleep(0.01)
        if tp not in self.assignment():
            return  # revoked: its next owner reads it from the committed offset
        offset = self._sought.get(tp)
        log.info("%s: records from offset %d were fetched around a seek; reading again from "
                 "%s", tp, skipped, "its beginning" if offset is None else f"offset {offset}")
        try:
            async with self._seeking_partitions([tp]):
                await self._seek_in_thread(tp, offset)
                self._read_offset[tp] = offset
        except IllegalStateError:  # revoked meanwhile; anything else stops the worker
            log.info("%s was revoked before it could be sought again", tp)

    async def _seek_in_thread(self, tp: TP, offset: int | None) -> None:
        """Seek aiokafka's consumer in its own thread (where it fetches); None: to the
        partition's beginning."""
        from aiokafka.structs import TopicPartition

        consumer, tp = self._thread._ensure_consumer(), TopicPartition(tp.topic, tp.partition)
        if offset is None:
            await self._thread.call_thread(consumer.seek_to_beginning, tp)
        else:
            await self._thread.call_thread(consumer.seek, tp, offset)


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
