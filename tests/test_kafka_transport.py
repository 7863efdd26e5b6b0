"""streams.kafka_transport: the fixes to Faust's Kafka transport, without a broker."""

from __future__ import annotations

import asyncio
import types

import faust
import pytest
from faust.types import TP
from faust.types.tuples import Message

from streams.kafka_transport import ConsumerThread, Transport


class _AIOKafkaConsumer:
    """aiokafka's consumer as far as the seek goes: seeks only where committed > 0."""

    def __init__(self, committed: dict):
        self.committed = committed
        self.positions: dict = {}

    async def seek_to_committed(self) -> dict:
        for tp, offset in self.committed.items():
            if offset and offset > 0:
                self.positions[tp] = offset
        return dict(self.committed)

    async def seek_to_beginning(self, *tps) -> None:
        for tp in tps:
            self.positions[tp] = "beginning"


def acking_consumer(app_id: str):
    """The consumer of a Faust app with this module's Transport installed and ``items`` an
    acking topic (no broker is contacted)."""
    app = faust.App(app_id, broker="kafka://127.0.0.1:9", store="memory://")
    app.transport = Transport(app.conf.broker_consumer, app)
    app.topic("items", key_type=bytes, value_type=bytes)
    app.topics.acking_topics.add("items")
    return app.consumer


def record(tp: TP, offset: int) -> Message:
    return Message(tp.topic, tp.partition, offset, 0.0, 0, {}, b"k", b"v", None, tp=tp)


@pytest.mark.parametrize("reset", ["earliest", "latest"])
def test_a_partition_without_a_committed_offset_is_sought_to_its_beginning(reset):
    tps = [TP("items", p) for p in range(3)]
    consumer = _AIOKafkaConsumer({tps[0]: None, tps[1]: 0, tps[2]: 17})
    thread = types.SimpleNamespace(
        _ensure_consumer=lambda: consumer,
        app=types.SimpleNamespace(conf=types.SimpleNamespace(consumer_auto_offset_reset=reset)))
    committed = asyncio.run(ConsumerThread._seek_to_committed_or_beginning(thread))
    assert committed == {tps[0]: None, tps[1]: 0, tps[2]: 17}  # what Faust records
    if reset == "earliest":
        assert consumer.positions == {tps[0]: "beginning", tps[1]: "beginning", tps[2]: 17}
    else:  # only "earliest" says where a partition without a commit starts
        assert consumer.positions == {tps[2]: 17}


def test_only_released_records_are_acknowledged():
    consumer = acking_consumer("ppm-test-transport")
    tp = TP("items", 0)
    skipped, released = record(tp, 0), record(tp, 1)
    assert consumer.ack(skipped) is False  # Faust acknowledging a record it skipped
    consumer.release(released)
    assert consumer.ack(released) is True
    assert dict(consumer._acked) == {tp: [1]}  # offset 0 is not counted as done


def fetching_consumer(monkeypatch, records, during):
    """A consumer whose Faust parts fetch ``records`` (running ``during[i]()`` just before
    yielding record ``i``, the first time) and seek every partition to offset 48 (taking
    ``seek_steps`` turns of the event loop: a seek is under way meanwhile); the partitions
    it seeks again are recorded in the returned list."""
    from faust.transport.drivers import aiokafka as faust_aiokafka

    consumer = acking_consumer("ppm-test-transport-seek")
    consumer.assignment = lambda: {TP("items", 0)}
    consumer.seek_steps = 0
    seeks: list = []

    async def getmany(self, timeout):
        for i, (tp, message) in enumerate(records):
            if i in during:
                await during.pop(i)()  # once
            yield tp, message

    async def perform_seek(self):
        for _ in range(self.seek_steps):
            await asyncio.sleep(0)
        self._read_offset.update({tp: 48 for tp in self.assignment()})

    async def seek_in_thread(tp, offset):
        seeks.append((tp, offset))

    monkeypatch.setattr(faust_aiokafka.Consumer, "getmany", getmany)
    monkeypatch.setattr(faust_aiokafka.Consumer, "perform_seek", perform_seek)
    consumer._seek_in_thread = seek_in_thread
    return consumer, seeks


async def drained(consumer) -> list:
    """One fetch, as Faust's drain loop takes it: each record delivered, then its offset
    made the read offset."""
    got = []
    async for tp, message in consumer.getmany(1.0):
        got.append((tp, message.offset))
        consumer._read_offset[tp] = message.offset
    return got


def test_records_fetched_around_a_seek_are_read_again_from_where_it_put_them(monkeypatch):
    tp, other = TP("items", 0), TP("behaviors", 1)  # "behaviors" acknowledges nothing here
    records = [(tp, record(tp, 55)), (other, record(other, 7)), (tp, record(tp, 56))]
    consumer = None

    async def seek():  # Faust's seek at the end of a rebalance's recovery, mid-fetch
        consumer._gap[tp].addi(49, 55)  # what Faust's _add_gap made of an earlier record
        await consumer.perform_seek()

    consumer, seeks = fetching_consumer(monkeypatch, records, {0: seek})
    # Neither of tp's records is delivered (they may be from before the seek), tp is sought
    # again to offset 48, and its read offset stays there, so 48.. are not dropped as read;
    # the offsets counted as done before the seek are forgotten.
    assert asyncio.run(drained(consumer)) == [(other, 7)]
    assert seeks == [(tp, 48)]
    assert consumer._read_offset[tp] == 48 and not consumer._gap.get(tp)
    assert asyncio.run(drained(consumer)) == [(tp, 55), (other, 7), (tp, 56)]  # no seek


def test_records_fetched_while_a_seek_is_under_way_wait_for_it_then_are_read_again(
        monkeypatch):
    tp = TP("items", 0)
    records = [(tp, record(tp, 60)), (tp, record(tp, 61))]
    consumer, seeks = fetching_consumer(monkeypatch, records, {})
    consumer.seek_steps = 5

    async def run():
        seeking = asyncio.ensure_future(consumer.perform_seek())
        await asyncio.sleep(0)  # the seek has begun and is waiting on the broker
        got = await drained(consumer)
        await seeking
        return got

    assert asyncio.run(run()) == []  # fetched while the seek was under way: not delivered
    assert seeks == [(tp, 48)]  # sought again once that seek was done, to where it went
    assert consumer._read_offset[tp] == 48


def test_a_seek_during_a_delivery_keeps_the_read_offset_it_set(monkeypatch):
    tp = TP("items", 0)
    consumer, _ = fetching_consumer(monkeypatch, [(tp, record(tp, 60))], {})

    async def drain():
        async for t, message in consumer.getmany(1.0):
            await consumer.perform_seek()  # the rebalance lands while 60 is delivered
            consumer._read_offset[t] = message.offset  # then Faust's drain loop sets it
        return consumer._read_offset[tp]

    assert asyncio.run(drain()) == 48  # not 60: records 48-59 will be read again
