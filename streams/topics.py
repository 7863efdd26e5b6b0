"""The Kafka topic layout of the distributed path, created explicitly.

Faust would create missing topics itself with its own defaults; creating them up front
fixes the partition count (the unit of parallelism, and of sequence ownership for
``behaviors``), so every worker, publisher and ``docker-compose.yml`` agree on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ppm.config import KafkaConfig


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    key: str
    """The event field the publisher keys records by."""


def topic_layout(kafka: KafkaConfig) -> list[TopicSpec]:
    """Every topic ppm-stream needs: the two event streams and a dead-letter topic each."""
    streams = [TopicSpec(kafka.items_topic, kafka.partitions, "item_id"),
               TopicSpec(kafka.behaviors_topic, kafka.partitions, "user_id")]
    dead = [TopicSpec(t.name + kafka.dead_letter_suffix, kafka.partitions, t.key)
            for t in streams]
    return streams + dead


def ensure_topics(kafka: KafkaConfig, timeout_s: float = 30.0) -> list[str]:
    """Create the missing topics of :func:`topic_layout`; return the names created.

    An existing topic with another partition count is an error, not silently reused:
    keys would land on other partitions than the running workers expect.
    """
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap, client_id="ppm-topics",
                             request_timeout_ms=int(timeout_s * 1000))
    try:
        existing = {t["name"]: len(t["partitions"]) for t in admin.describe_topics()}
        layout = topic_layout(kafka)
        for spec in layout:
            have = existing.get(spec.name)
            if have is not None and have != spec.partitions:
                raise ValueError(f"topic {spec.name!r} has {have} partitions, the layout "
                                 f"wants {spec.partitions}; delete it or change "
                                 "kafka.partitions")
        missing = [s for s in layout if s.name not in existing]
        if missing:
            admin.create_topics([NewTopic(s.name, s.partitions, kafka.replication_factor)
                                 for s in missing], timeout_ms=int(timeout_s * 1000))
        return [s.name for s in missing]
    finally:
        admin.close()
