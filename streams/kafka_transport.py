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

Install with ``app.transport = Transport(app.conf.broker_consumer, app)`` right after
creating the app (``streams.app.create_app``), before any topic is declared.

Not fixed here (issue #11): Faust drops a record below the last offset it read and counts
offsets it jumps over as done (``Consumer._read_offset``, ``Consumer._add_gap``; meant for
transaction markers and compacted topics). When its seek back to the committed offsets
after a rebalance races records still being delivered, both can happen to records nobody
processed yet. Turning them off here made such records stall instead, and a first attempt
at releasing records only as an unbroken run from the committed offset lost records in a
two-worker run, so neither is in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP


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


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
