"""The Kafka topic layout of the distributed path, created explicitly.

Faust would create missing topics itself with its own defaults; creating them up front
fixes the partition count (the unit of parallelism, and of sequence ownership for
``behaviors``), so every worker, publisher and ``docker-compose.yml`` agree on it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from ppm.config import ContractConfig, KafkaConfig


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


#: The Faust app's tables (``streams.app``); their changelogs are ``<app_id>-<name>-changelog``.
SEQUENCE_TABLE = "sequences"
ITEM_TABLE = "item-states"


@dataclass(frozen=True)
class InternalTopic:
    name: str
    partitions: int
    configs: tuple[tuple[str, str], ...] = ()


def faust_topics(kafka: KafkaConfig) -> list[InternalTopic]:
    """The topics the Faust app would otherwise create itself when it starts: the tables'
    compacted changelogs and the partition assignor's leader topic. On a fresh broker
    Faust's assignor can run before its own new topics are in the metadata; it then ignores
    them and the worker never gets ready, so they are created up front."""
    compact = (("cleanup.policy", "compact"),)
    return [InternalTopic(f"{kafka.app_id}-{SEQUENCE_TABLE}-changelog", kafka.partitions,
                          compact),
            InternalTopic(f"{kafka.app_id}-{ITEM_TABLE}-changelog", kafka.partitions, compact),
            InternalTopic(f"{kafka.app_id}-__assignor-__leader", 1)]


#: Room in a Kafka message for what surrounds a record's value (batch header, key, record
#: framing), on top of the largest value the contract accepts.
RECORD_HEADROOM_BYTES = 64 * 1024


def input_topic_configs(contracts: ContractConfig) -> tuple[tuple[str, str], ...]:
    """The two event topics take any record the contract accepts: ``max.message.bytes``
    of ``contracts.max_payload_bytes`` plus headroom (the broker's default is about 1 MB,
    the contract's 8 MB). A producer needs a ``max_request_size`` as large to send one."""
    return (("max.message.bytes", str(contracts.max_payload_bytes + RECORD_HEADROOM_BYTES)),)


def ensure_topics(kafka: KafkaConfig, timeout_s: float = 30.0,
                  contracts: ContractConfig | None = None) -> list[str]:
    """Create the missing topics of :func:`topic_layout` and :func:`faust_topics`, wait
    until the broker's metadata lists them, and return the names created.

    The event topics are created with :func:`input_topic_configs` of ``contracts``
    (default: the default contract); an existing topic keeps the configs it has.
    An existing topic with another partition count is an error, not silently reused:
    keys would land on other partitions than the running workers expect.
    """
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap, client_id="ppm-topics",
                             request_timeout_ms=int(timeout_s * 1000),
                             bootstrap_timeout_ms=int(kafka.connect_timeout_s * 1000))
    try:
        existing = {t["name"]: len(t["partitions"]) for t in admin.describe_topics()}
        inputs = {kafka.items_topic, kafka.behaviors_topic}
        large = input_topic_configs(contracts or ContractConfig())
        wanted = [InternalTopic(s.name, s.partitions, large if s.name in inputs else ())
                  for s in topic_layout(kafka)]
        wanted += faust_topics(kafka)
        for spec in wanted:
            have = existing.get(spec.name)
            if have is not None and have != spec.partitions:
                raise ValueError(f"topic {spec.name!r} has {have} partitions, the layout "
                                 f"wants {spec.partitions}; delete it or change "
                                 "kafka.partitions")
        missing = [s for s in wanted if s.name not in existing]
        if missing:
            admin.create_topics([NewTopic(s.name, s.partitions, kafka.replication_factor,
                                          topic_configs=dict(s.configs)) for s in missing],
                                timeout_ms=int(timeout_s * 1000))
            deadline = time.monotonic() + timeout_s
            while not {s.name for s in missing} <= set(admin.list_topics()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"topics not in the metadata after {timeout_s:.0f}s")
                time.sleep(0.2)
        return [s.name for s in missing]
    finally:
        admin.close()


class LagProbe:
    """Consumer lag of the workers' group (``kafka.app_id``), per topic and partition of the
    layout, and what the dead-letter topics hold.

    Holds its Kafka clients, so probing again is cheap. Use as a context manager."""

    def __init__(self, kafka: KafkaConfig, timeout_s: float = 10.0):
        from kafka import KafkaAdminClient, KafkaConsumer

        self.kafka = kafka
        ms = int(timeout_s * 1000)
        connect_ms = int(kafka.connect_timeout_s * 1000)
        self.admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap, client_id="ppm-status",
                                      request_timeout_ms=ms, bootstrap_timeout_ms=connect_ms)
        self.consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap,
                                      client_id="ppm-status", request_timeout_ms=ms + 1,
                                      bootstrap_timeout_ms=connect_ms)

    def __enter__(self) -> LagProbe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def lag(self) -> dict[str, dict[str, int]]:
        """Per input topic: the end offset, the offset the group has committed, and the
        difference (lag), summed over partitions, and the same per partition under
        ``partitions`` (``{"0": {"end", "committed", "lag"}, ...}``: one stuck partition
        shows there); per dead-letter topic: how many dead letters it holds, in all and
        per partition. Behavior events count as lag until the training window they
        belong to is written (see ``streams.app``)."""
        from kafka import TopicPartition

        kafka = self.kafka
        committed = self.admin.list_group_offsets(kafka.app_id).get(kafka.app_id, {})
        out: dict[str, dict] = {}
        for spec in topic_layout(kafka):
            parts = self.consumer.partitions_for_topic(spec.name) or set()
            tps = [TopicPartition(spec.name, p) for p in sorted(parts)]
            ends = self.consumer.end_offsets(tps) if tps else {}
            if spec.name.endswith(kafka.dead_letter_suffix):
                out[spec.name] = {"dead_letters": sum(ends.values()),
                                  "partitions": {str(tp.partition): ends[tp] for tp in tps}}
                continue
            per = {}
            for tp in tps:
                done = max(committed[tp].offset, 0) if tp in committed else 0
                per[str(tp.partition)] = {"end": ends[tp], "committed": done,
                                          "lag": ends[tp] - done}
            end = sum(p["end"] for p in per.values())
            done = sum(p["committed"] for p in per.values())
            out[spec.name] = {"end": end, "committed": done, "lag": end - done,
                              "partitions": per}
        return out

    def dead_letter_reasons(self, limit: int = 10_000, timeout_s: float = 10.0
                            ) -> dict[str, dict]:
        """Per dead-letter topic: its last ``limit`` letters (at most, shared evenly among
        partitions) counted ``by_stage`` and ``by_reason`` (the reason's class,
        ``streams.worker_metrics.reason_class``), and how many were ``read``; ``incomplete`` when
        not all could be read within ``timeout_s``."""
        from kafka import TopicPartition

        out: dict[str, dict] = {}
        for spec in topic_layout(self.kafka):
            if not spec.name.endswith(self.kafka.dead_letter_suffix):
                continue
            summary: dict = {"read": 0, "by_stage": {}, "by_reason": {}}
            out[spec.name] = summary
            parts = self.consumer.partitions_for_topic(spec.name) or set()
            tps = [TopicPartition(spec.name, p) for p in sorted(parts)]
            if not tps:
                continue
            ends = self.consumer.end_offsets(tps)
            begins = self.consumer.beginning_offsets(tps)
            per_partition = max(1, limit // len(tps))
            pending = {tp for tp in tps if ends[tp] > begins[tp]}
            if not pending:
                continue
            self.consumer.assign(sorted(pending))
            for tp in pending:
                self.consumer.seek(tp, max(begins[tp], ends[tp] - per_partition))
            deadline = time.monotonic() + timeout_s
            try:
                while pending and time.monotonic() < deadline:
                    for tp, messages in self.consumer.poll(timeout_ms=200).items():
                        for message in messages:
                            if message.offset < ends[tp]:
                                tally_dead_letter(summary, message.value)
                    pending = {tp for tp in pending if self.consumer.position(tp) < ends[tp]}
            finally:
                self.consumer.assign([])
            if pending:
                summary["incomplete"] = True
        return out

    def close(self) -> None:
        self.consumer.close()
        self.admin.close()


def tally_dead_letter(summary: dict, value: bytes | None) -> None:
    """Count one dead letter (JSON bytes) into a :meth:`LagProbe.dead_letter_reasons`
    summary."""
    from streams.worker_metrics import reason_class

    try:
        letter = json.loads(value or b"")
    except ValueError:
        letter = None
    if not isinstance(letter, dict):
        stage, reason = "unknown", "unreadable"
    else:
        stage, reason = str(letter.get("stage") or "unknown"), reason_class(letter)
    summary["read"] += 1
    summary["by_stage"][stage] = summary["by_stage"].get(stage, 0) + 1
    summary["by_reason"][reason] = summary["by_reason"].get(reason, 0) + 1
