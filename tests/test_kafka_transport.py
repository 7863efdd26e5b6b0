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
