"""The catalog service's side of the distributed path: publish events to Kafka.

``ppm publish`` sends simulator or JSONL records (wire bytes, as they are: malformed ones
too, so the workers' dead-letter path is exercised) to the ``items`` and ``behaviors``
topics, keyed by item_id and user_id, at a given rate. It is also the load generator of
``bench/freshness.py``. The producer is kafka-python's idempotent one with ``acks="all"``:
a record counts as published only when the broker has it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ppm.config import KafkaConfig

ROUTING_KEY = {"item": "item_id", "behavior": "user_id"}


def routing_key(kind: str, raw: bytes) -> bytes | None:
    """The record's key: its item_id (items) or user_id (behaviors), as UTF-8 bytes; None
    for a record without one (malformed: any partition will do, it becomes a dead letter)."""
    try:
        value = json.loads(raw).get(ROUTING_KEY[kind])
    except (ValueError, AttributeError):
        return None
    return value.encode() if isinstance(value, str) and value else None


@dataclass
class PublishSummary:
    items: int = 0
    behaviors: int = 0
    unkeyed: int = 0
    """Records without a usable key (malformed); sent anyway, to be dead-lettered."""
    seconds: float = 0.0

    @property
    def records(self) -> int:
        return self.items + self.behaviors


class Publisher:
    """A keyed, paced Kafka producer for ppm's topics. Use as a context manager."""

    def __init__(self, kafka: KafkaConfig, linger_ms: int = 5):
        from kafka import KafkaProducer

        self.kafka = kafka
        self.topics = {"item": kafka.items_topic, "behavior": kafka.behaviors_topic}
        self.producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all",
                                      enable_idempotence=True, linger_ms=linger_ms,
                                      client_id="ppm-publish")
        self.failures: list[BaseException] = []

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, kind: str, raw: bytes, key: bytes | None) -> None:
        """Send one record; a delivery failure is raised by the next :meth:`flush`.
        Raises KeyError for a kind other than "item" or "behavior"."""
        future = self.producer.send(self.topics[kind], key=key, value=raw)
        future.add_errback(self.failures.append)

    def flush(self) -> None:
        """Wait until the broker has every record sent so far; raise if any was refused."""
        self.producer.flush()
        if self.failures:
            failed, self.failures = self.failures, []
            raise RuntimeError(f"{len(failed)} records were not published; first: "
                               f"{failed[0]!r}")

    def publish(self, records: Iterable[tuple[str, bytes]], rate: float | None = None,
                limit: int | None = None, duration_s: float | None = None,
                progress: bool = False) -> PublishSummary:
        """Send ``records`` at ``rate`` records/s (None: as fast as possible), stopping after
        ``limit`` records or ``duration_s`` seconds, then wait until the broker has all."""
        from tqdm import tqdm

        summary = PublishSummary()
        started = time.monotonic()
        bar = tqdm(desc="publish", unit=" ev", disable=not progress, mininterval=0.5)
        for n, (kind, raw) in enumerate(records):
            if limit is not None and n >= limit:
                break
            now = time.monotonic() - started
            if duration_s is not None and now >= duration_s:
                break
            if rate:
                ahead = n / rate - now
                if ahead > 0:
                    time.sleep(ahead)
            key = routing_key(kind, raw)
            self.send(kind, raw, key=key)
            summary.unkeyed += key is None
            if kind == "item":
                summary.items += 1
            else:
                summary.behaviors += 1
            bar.update(1)
        bar.close()
        self.flush()
        summary.seconds = time.monotonic() - started
        return summary

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.producer.close()
