"""Smoke tests of the servers the integration tests run against: Kafka takes and gives back
keyed records, has the project's topics, keeps records over a broker restart; Redis works
and comes back after a restart."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient

from ppm.config import KafkaConfig
from streams.topics import topic_layout
from tests.servers import Servers

pytestmark = pytest.mark.integration


def produce(bootstrap: str, topic: str, records: dict[str, dict]) -> None:
    """Send key -> value records with acks=all and wait for every acknowledgement."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        futures = [producer.send(topic, key=k.encode(), value=json.dumps(v).encode())
                   for k, v in records.items()]
        producer.flush(timeout=30)
        for f in futures:
            f.get(timeout=30)
    finally:
        producer.close(timeout=10)


def consume(bootstrap: str, topic: str, run: str, want: int,
            timeout_s: float = 60) -> dict[str, dict]:
    """Read ``topic`` from the start in a new consumer group; return the records of ``run``
    (other tests write to the same topic) once ``want`` of them arrived, or at the timeout."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap,
                             group_id=f"test-servers-{uuid.uuid4().hex}",
                             auto_offset_reset="earliest", enable_auto_commit=False)
    got: dict[str, dict] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while len(got) < want and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=1000).values():
                for msg in batch:
                    value = json.loads(msg.value)
                    if value.get("run") == run:
                        got[msg.key.decode()] = value
    finally:
        consumer.close()
    return got


def records_of_run(n: int) -> tuple[str, dict[str, dict]]:
    run = uuid.uuid4().hex
    return run, {f"item-{run[:8]}-{i}": {"run": run, "i": i} for i in range(n)}


def test_kafka_round_trip_of_keyed_records(servers: Servers):
    run, sent = records_of_run(100)
    produce(servers.kafka_bootstrap, "items", sent)
    assert consume(servers.kafka_bootstrap, "items", run, want=len(sent)) == sent


def test_project_topics_exist_with_their_partitions(servers: Servers):
    layout = topic_layout(KafkaConfig(bootstrap=servers.kafka_bootstrap))
    assert {t.name for t in layout} == {"items", "behaviors", "items-dead", "behaviors-dead"}
    admin = KafkaAdminClient(bootstrap_servers=servers.kafka_bootstrap)
    try:
        described = {t["name"]: t for t in admin.describe_topics([t.name for t in layout])}
    finally:
        admin.close()
    for spec in layout:
        assert described[spec.name]["error_code"] == 0, described[spec.name]
        assert len(described[spec.name]["partitions"]) == spec.partitions == 4


def test_redis_set_and_get(servers: Servers):
    client = redis.Redis.from_url(servers.redis_url)
    try:
        key = f"test-servers:{uuid.uuid4().hex}"
        client.set(key, b"value", ex=60)
        assert client.get(key) == b"value"
    finally:
        client.close()


def test_kafka_restart_keeps_records(restartable_servers: Servers):
    srv = restartable_servers
    run, before = records_of_run(20)
    produce(srv.kafka_bootstrap, "items", before)
    srv.stop_kafka()
    srv.start_kafka()
    more_run, after = records_of_run(5)
    produce(srv.kafka_bootstrap, "items", after)  # the restarted broker takes new records too
    assert consume(srv.kafka_bootstrap, "items", run, want=len(before)) == before
    assert consume(srv.kafka_bootstrap, "items", more_run, want=len(after)) == after


def test_redis_restart(restartable_servers: Servers):
    srv = restartable_servers
    client = redis.Redis.from_url(srv.redis_url, socket_timeout=5)
    try:
        assert client.ping()
        srv.stop_redis()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        srv.start_redis()
        client.set("test-servers:after-restart", b"yes")  # the client reconnects by itself
        assert client.get("test-servers:after-restart") == b"yes"
    finally:
        client.close()


def test_feast_on_redis_reads_the_same_directly_and_through_its_sdk(servers: Servers, tmp_path):
    from feature_repo.online_features import OnlineFeatures
    from ppm.config import Config
    from tests.integration.pipeline_check import next_redis_database
    from tests.online_reads_check import check_reads_agree, fill
    from tests.servers import redis_db_url

    db = next_redis_database()
    url = redis_db_url(servers.redis_url, db)
    redis.Redis.from_url(url).flushdb()
    # The URL alone chooses the Redis store yaml (features.store_yaml unset).
    cfg = Config(data_dir=tmp_path, redis={"url": url})
    online = OnlineFeatures.open(cfg)
    assert online.store.config.online_store.type == "redis"
    fill(online)
    check_reads_agree(online)
