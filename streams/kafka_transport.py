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
   (``Consumer._drain_messages``). Both lost records after a restart under load. Here a
   record of a partition sought since its fetch began is not delivered; the partition is
   sought again to where that seek put it, so it is read again from there (duplicates, never
   gaps: every write downstream is idempotent); and a seek during a delivery puts back the
   read offset the seek set. Only acknowledging topics (ppm's input streams) are handled so;
   Faust's changelog recovery keeps its own offsets.

Install with ``app.transport = Transport(app.conf.broker_consumer, app)`` right after
creating the app (``streams.app.create_app``), before any topic is declared.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
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
        self._seeks: collections.Counter[TP] = collections.Counter()
        """Seeks begun or ended, per partition (of acknowledging topics)."""
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


    def _acking(self, tps: Iterable[TP]) -> list[TP]:
        return [tp for tp in tps if self.app.topics.acks_enabled_for(tp.topic)]

    def _bump(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self._seeks[tp] += 1

    async def perform_seek(self) -> None:
        """Faust's seek of every partition to its committed offset, remembered (fix 3)."""
        tps = self._acking(self.assignment())
        self._bump(tps)
        try:
            await super().perform_seek()
        finally:
            self._bump(tps)
        # Faust has just set each read offset to the committed one (None: none committed).
        self._sought.update({tp: self._read_offset.get(tp) for tp in tps})

    async def seek(self, partition: TP, offset: int) -> None:
        """Faust's seek of one partition, remembered (fix 3)."""
        tps = self._acking([partition])
        self._bump(tps)
        try:
            await super().seek(partition, offset)
        finally:
            self._bump(tps)
        self._sought.update({tp: offset or None for tp in tps})

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Any]]:
        """Faust's fetch, less the records of partitions sought since it began (fix 3)."""
        seeks = self._seeks.copy()  # before the fetch: a seek from here on may be missed
        sought_again: set[TP] = set()
        async for tp, message in super().getmany(timeout):
            if self._seeks[tp] != seeks[tp]:
                if tp not in sought_again:
                    sought_again.add(tp)
                    await self._seek_again(tp, message.offset)
                continue
            read = self._read_offset.get(tp)
            if read is not None and message.offset < read:  # Faust will drop it as read
                log.warning("%s: record %d is below the read offset %d", tp, message.offset,
                            read)
            yield tp, message
            # Faust's drain loop has now set tp's read offset to this record's; a seek
            # while the record was being delivered had set it to where reading resumes.
            if self._seeks[tp] != seeks[tp]:
                self._read_offset[tp] = self._sought.get(tp)

    async def _seek_again(self, tp: TP, skipped: int) -> None:
        """Seek ``tp`` back to where its last seek put it (its records from ``skipped`` on
        were fetched around that seek and not delivered)."""
        from aiokafka.errors import IllegalStateError

        if tp not in self.assignment():
            return  # revoked: its next owner reads it from the committed offset
        offset = self._sought.get(tp)
        log.info("%s: records from offset %d were fetched around a seek; reading again from "
                 "%s", tp, skipped, "its beginning" if offset is None else f"offset {offset}")
        try:
            if offset is not None:
                await self.seek(tp, offset)
            else:
                self._bump([tp])
                try:
                    await self._thread.seek_to_beginning(tp)
                finally:
                    self._bump([tp])
                self._read_offset[tp] = None
        except IllegalStateError:  # revoked meanwhile; anything else stops the worker
            log.info("%s was revoked before it could be sought again", tp)


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
