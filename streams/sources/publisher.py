"""The catalog service's side of the distributed path: publish events to Kafka.

``ppm publish`` sends simulator or JSONL records (wire bytes, as they are: malformed ones
too, so the workers' dead-letter path is exercised) to the ``items`` and ``behaviors``
topics, keyed by item_id and user_id, at a given rate. It is also the load generator of
``bench/freshness.py``. The producer is kafka-python's idempotent one with ``acks="all"``:
a record counts as published only when the broker has it.

With ``events_per_record`` > 1, consecutive behavior events of one user go out as one
Kafka record (a JSON array, see :func:`ppm.events.decode_record`), as a front end sends a
result page's impressions together: a Faust worker pays a fixed cost per record on top of
the cost per event (bench/freshness.py measures both ways).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ppm.config import ContractConfig, KafkaConfig
from ppm.events import KEY_FIELDS


def routing_key(kind: str, raw: bytes) -> bytes | None:
    """The record's key: its (first event's) item_id or user_id, as UTF-8 bytes; None for a
    record without one (malformed: any partition will do, it becomes a dead letter)."""
    try:
        obj = json.loads(raw)
        if isinstance(obj, list) and obj:
            obj = obj[0]
        value = obj.get(KEY_FIELDS[kind])
    except (ValueError, AttributeError, RecursionError):  # any hostile record is sent as is
        return None
    # A lone surrogate cannot be a key's bytes: unkeyed, the worker dead-letters it.
    if not isinstance(value, str) or not value:
        return None
    try:
        return value.encode()
    except UnicodeEncodeError:
        return None


@dataclass
class PublishSummary:
    items: int = 0
    behaviors: int = 0
    """Input records (events, malformed ones included) sent, by kind."""
    unkeyed: int = 0
    """Records without a usable key (malformed); sent anyway, to be dead-lettered."""
    messages: int = 0
    """Kafka records sent: fewer than items + behaviors when behaviors are packed."""
    seconds: float = 0.0

    @property
    def records(self) -> int:
        return self.items + self.behaviors


class Publisher:
    """A keyed, paced Kafka producer for ppm's topics. Use as a context manager."""

    def __init__(self, kafka: KafkaConfig, linger_ms: int = 5,
                 contracts: ContractConfig | None = None):
        from kafka import KafkaProducer

        from streams.topics import RECORD_HEADROOM_BYTES

        self.kafka = kafka
        self.topics = {"item": kafka.items_topic, "behavior": kafka.behaviors_topic}
        # Any record the contract accepts can be sent (the topics take it too, see
        # streams.topics.input_topic_configs); the client's default cap is 1 MB.
        most = (contracts or ContractConfig()).max_payload_bytes + RECORD_HEADROOM_BYTES
        self.producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all",
                                      enable_idempotence=True, linger_ms=linger_ms,
                                      max_request_size=most, client_id="ppm-publish",
                                      bootstrap_timeout_ms=int(kafka.connect_timeout_s * 1000))
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
                progress: bool = False, events_per_record: int = 1) -> PublishSummary:
        """Send ``records`` at ``rate`` records/s (None: as fast as possible), stopping after
        ``limit`` records or ``duration_s`` seconds, then wait until the broker has all.

        ``events_per_record`` > 1 packs up to that many consecutive behavior records of one
        user (JSON objects; anything else goes alone) into one Kafka record; rate and limit
        still count input records. Order is kept: a pack is sent before the next record
        of any other user or kind.
        """
        from tqdm import tqdm

        if events_per_record < 1:
            raise ValueError(f"events_per_record must be >= 1, got {events_per_record}")
        summary = PublishSummary()
        pack: list[bytes] = []
        pack_key: bytes | None = None

        def send_pack() -> None:
            if pack:
                self.send("behavior", pack[0] if len(pack) == 1
                          else b"[" + b",".join(pack) + b"]", pack_key)
                summary.messages += 1
                pack.clear()

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
            summary.unkeyed += key is None
            if kind == "behavior":
                summary.behaviors += 1
            else:
                summary.items += 1
            if (kind == "behavior" and events_per_record > 1 and key is not None
                    and raw.lstrip()[:1] == b"{"):
                if pack and (key != pack_key or len(pack) == events_per_record):
                    send_pack()
                pack.append(raw)
                pack_key = key
            else:
                send_pack()
                self.send(kind, raw, key=key)
                summary.messages += 1
            bar.update(1)
        send_pack()
        bar.close()
        self.flush()
        summary.seconds = time.monotonic() - started
        return summary

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.producer.close()
