"""The Faust app's parts that need no broker: batches applied in order, one batch ahead,
events acknowledged in offset order, the tables' decoded-value cache and the worker's
garbage-collector settings. (The agents themselves run against a real Kafka and Redis in
tests/integration.)"""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture
def app_module(tmp_path, monkeypatch):
    # Importing the module builds the worker's app from the environment's configuration.
    monkeypatch.setenv("PPM__DATA_DIR", str(tmp_path))
    import streams.app

    return streams.app


def test_batches_are_applied_in_order_while_the_next_one_gathers(app_module):
    started, applied = [], []

    async def scenario() -> None:
        gate = asyncio.Event()

        async def apply(batch: int) -> None:
            started.append(batch)
            await gate.wait()
            applied.append(batch)

        async with app_module.one_batch_ahead(apply, "test batch") as submit:
            await submit(1)  # taken at once
            await asyncio.sleep(0.01)
            await submit(2)  # waits while 1 is applied
            third = asyncio.ensure_future(submit(3))  # one batch waits already: back-pressure
            await asyncio.sleep(0.01)
            assert started == [1] and not third.done()
            gate.set()
            await third
            while len(applied) < 3:
                await asyncio.sleep(0.001)

    asyncio.run(scenario())
    assert applied == [1, 2, 3]


def test_a_batch_that_fails_stops_the_worker(app_module, monkeypatch):
    stopped = []
    monkeypatch.setattr(app_module, "stop_worker", lambda what, exc: stopped.append((what, exc)))

    async def scenario() -> None:
        async def apply(batch: int) -> None:
            raise ValueError(f"bad batch {batch}")

        async with app_module.one_batch_ahead(apply, "item batch") as submit:
            await submit(1)
            for _ in range(1_000):
                if stopped:
                    break
                await asyncio.sleep(0.001)

    asyncio.run(scenario())
    assert [what for what, _ in stopped] == ["item batch"]
    assert isinstance(stopped[0][1], ValueError)


class _Message:
    def __init__(self, tp: str, offset: int, generation_id: int = 1):
        self.tp, self.offset, self.refcount = tp, offset, 1
        self.generation_id = generation_id  # the consumer group generation it was fetched in

    def incref(self) -> None:
        self.refcount += 1


class _Event:
    def __init__(self, tp: str, offset: int, generation_id: int = 1):
        self.message = _Message(tp, offset, generation_id)


class _Consumer:
    def __init__(self):
        self.released: set[_Message] = set()

    def release(self, message: _Message) -> None:
        self.released.add(message)


class _Stream:
    """Records what is acknowledged, in order (Faust's Stream.ack is a coroutine); a record
    must be released to the consumer first (streams.kafka_transport.Consumer)."""

    def __init__(self):
        self.acked: list[tuple[str, int]] = []
        self.app = type("App", (), {"consumer_generation_id": 1, "consumer": _Consumer()})()

    async def ack(self, event: _Event) -> bool:
        assert event.message in self.app.consumer.released
        self.acked.append((event.message.tp, event.message.offset))
        return True


def test_events_are_acknowledged_in_offset_order_per_partition(app_module):
    stream = _Stream()
    acks = app_module.InOrderAcks(stream)
    events = [_Event(tp, offset) for offset in range(3) for tp in ("p0", "p1")]
    held = {(e.message.tp, e.message.offset): acks.hold(e) for e in events}
    assert all(e.message.refcount == 2 for e in events)  # take_events' own ack only decrefs

    async def scenario() -> None:
        # A dead letter (p0:2) and a late event (p1:1) are done before earlier events.
        await acks.done([held["p0", 2], held["p1", 1]])
        assert stream.acked == []
        await acks.done([held["p1", 0]])
        assert stream.acked == [("p1", 0), ("p1", 1)]
        await acks.done([held["p0", 0], held["p0", 1], held["p1", 2]])

    asyncio.run(scenario())
    assert sorted(stream.acked[2:]) == [("p0", 0), ("p0", 1), ("p0", 2), ("p1", 2)]
    assert [o for tp, o in stream.acked if tp == "p0"] == [0, 1, 2]


def test_a_revoked_partitions_records_are_never_acknowledged_nor_its_stale_ones(app_module):
    """A rebalance revokes p0 while p0:0 is held and p0:1 is still in take_events' hands:
    neither may be acknowledged (p0:1 ahead of p0:0 would let Faust commit past p0:0 when
    the group has no committed offset); the replay, fetched in the next generation, is."""
    stream = _Stream()
    acks = app_module.InOrderAcks(stream)
    first = acks.hold(_Event("p0", 0))
    other = acks.hold(_Event("p1", 0))
    acks.drop(["p0"])
    stream.app.consumer_generation_id = 2  # the new assignment
    stale = acks.hold(_Event("p0", 1, generation_id=1))
    assert first.dropped and stale.dropped and not other.dropped
    replayed = [acks.hold(_Event("p0", offset, generation_id=2)) for offset in (0, 1)]

    async def scenario() -> None:
        await acks.done([first, stale, other])
        assert stream.acked == [("p1", 0)]
        await acks.done(replayed)

    asyncio.run(scenario())
    assert stream.acked == [("p1", 0), ("p0", 0), ("p0", 1)]
    assert stale.event.message.refcount == 2  # never released: Faust never acks it either


def test_table_view_decodes_a_value_once_and_never_serves_a_replaced_one(app_module):
    from ppm.records import UserSequence

    table: dict[bytes, bytes] = {}
    view = app_module.TableView(table, UserSequence, cache_size=2)
    seq = UserSequence("u1", ("i1",), ("click",), (5,))
    view["u1"] = seq
    assert table[b"u1"].startswith(b"{") and view["u1"] is seq  # written through, cached
    # The table got other bytes for the key (changelog recovery, another worker's write):
    # the view decodes those, not the cached value.
    table[b"u1"] = view.table[b"u1"].replace(b'"i1"', b'"i2"')
    assert view["u1"] == UserSequence("u1", ("i2",), ("click",), (5,))
    assert view["u1"] is view["u1"]
    for user in ("u2", "u3"):  # the least recently used value leaves the cache
        view[user] = UserSequence(user)
    assert list(view._decoded) == ["u2", "u3"]
    assert view["u1"].item_ids == ("i2",) and view.get("nobody") is None
    del view["u1"]
    assert "u1" not in view and "u1" not in view._decoded and len(view) == 2


def test_tune_gc_freezes_what_is_loaded_and_raises_the_young_threshold(app_module):
    import gc

    before = gc.get_threshold()
    try:
        app_module.tune_gc()
        assert gc.get_threshold()[0] == 50_000 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
