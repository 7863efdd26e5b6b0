"""LagProbe's figures from fake Kafka clients: lag per topic and per partition (a stuck
partition shows), dead-letter counts per partition, and dead letters tallied by reason.
(Against a real broker: tests/integration/test_faust_worker.py.)"""

from __future__ import annotations

import json
from types import SimpleNamespace

from kafka import TopicPartition

from ppm.config import KafkaConfig
from streams.topics import LagProbe, tally_dead_letter


class FakeConsumer:
    def __init__(self, ends: dict[TopicPartition, int]):
        self.ends = ends

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {tp.partition for tp in self.ends if tp.topic == topic}

    def end_offsets(self, tps):
        return {tp: self.ends[tp] for tp in tps}


class FakeAdmin:
    def __init__(self, group: str, committed: dict[TopicPartition, int]):
        self.group, self.committed = group, committed

    def list_group_offsets(self, group: str):
        return {self.group: {tp: SimpleNamespace(offset=o) for tp, o in self.committed.items()}}


def test_lag_is_shown_per_partition_so_a_stuck_one_shows():
    kafka = KafkaConfig(partitions=3)
    items, dead = kafka.items_topic, kafka.items_topic + kafka.dead_letter_suffix
    ends = {TopicPartition(items, p): 100 for p in range(3)}
    ends |= {TopicPartition(kafka.behaviors_topic, p): 0 for p in range(3)}
    ends |= {TopicPartition(dead, p): p for p in range(3)}
    committed = {TopicPartition(items, 0): 100, TopicPartition(items, 1): 40}  # 2: none yet
    probe = LagProbe.__new__(LagProbe)
    probe.kafka = kafka
    probe.consumer = FakeConsumer(ends)
    probe.admin = FakeAdmin(kafka.app_id, committed)

    lag = probe.lag()
    assert {k: lag[items][k] for k in ("end", "committed", "lag")} == {
        "end": 300, "committed": 140, "lag": 160}  # what `ppm status` always showed
    assert lag[items]["partitions"] == {
        "0": {"end": 100, "committed": 100, "lag": 0},
        "1": {"end": 100, "committed": 40, "lag": 60},
        "2": {"end": 100, "committed": 0, "lag": 100}}
    assert lag[kafka.behaviors_topic]["lag"] == 0
    assert lag[dead] == {"dead_letters": 3, "partitions": {"0": 0, "1": 1, "2": 2}}


def test_dead_letters_are_tallied_by_stage_and_reason_class():
    summary = {"read": 0, "by_stage": {}, "by_reason": {}}
    for value in (json.dumps({"reason": "event_time: too far ahead", "stage": "decode"}),
                  json.dumps({"reason": "event_time: no offset"}),
                  json.dumps({"reason": "boom", "stage": "process", "error_type": "OSError"}),
                  "not json", None):
        tally_dead_letter(summary, None if value is None else value.encode())
    assert summary == {"read": 5,
                       "by_stage": {"decode": 1, "unknown": 3, "process": 1},
                       "by_reason": {"event_time": 2, "OSError": 1, "unreadable": 2}}
