"""The distributed path end to end: kafka-python publishes, a real Faust worker embeds and
builds sequences, Redis serves them. Each test checks the online store against the same
events run through the processors without Kafka (``pipeline_check.expected``); the restart
and outage tests also check the training windows and the committed offsets by identity
(``identity_check``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import pytest
import redis

from ppm.events import DeadLetter, ItemEvent
from streams.worker_metrics import read_endpoints, reason_class, scrape
from tests.servers import FaustWorker, Servers

from .identity_check import assert_nothing_lost
from .pipeline_check import (
    Scenario,
    admit_all,
    dead_letters,
    readable_share,
    wait_until_complete,
    world_records,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def wait_for_progress(scenario: Scenario, share: float, timeout_s: float = 240) -> float:
    """Wait until at least ``share`` of the published items are readable (mid-stream)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = readable_share(scenario)
        if got >= share:
            return got
        time.sleep(0.5)
    raise TimeoutError(f"the worker made no progress: {readable_share(scenario):.0%}")


def ppm_status(scenario: Scenario) -> dict:
    """`ppm status` as a user runs it, with the scenario's settings; waits (bounded) until
    the worker has committed every item event."""
    deadline = time.monotonic() + 60
    while True:
        done = subprocess.run([sys.executable, "-m", "ppm.cli", "status"], env=scenario.env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        status = json.loads(done.stdout.strip().splitlines()[-1])
        if status["topics"][scenario.cfg.kafka.items_topic]["lag"] == 0:
            return status
        assert time.monotonic() < deadline, f"items never fully committed: {status}"
        time.sleep(2)


def worker_metrics(scenario: Scenario, worker: FaustWorker) -> dict[str, float]:
    """The running worker's /metrics, found where it wrote its address."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for endpoint in read_endpoints(scenario.cfg.paths.metrics_dir):
            if endpoint["pid"] == worker.proc.pid:
                got = scrape(endpoint["url"], timeout_s=5)
                assert got is not None, f"{endpoint} does not answer"
                return got
        time.sleep(0.5)
    raise AssertionError(f"the worker wrote no metrics address:\n{worker.tail()}")


def labelled(samples: dict[str, float], name: str) -> dict[str, float]:
    """``{"a=\"x\",b=\"y\"": value}`` of one series' labelled samples."""
    return {k[len(name) + 1:-1]: v for k, v in samples.items() if k.startswith(name + "{")}


def test_every_item_is_readable_and_every_bad_record_is_a_dead_letter(servers: Servers,
                                                                      tmp_path):
    """... and the worker's /metrics and `ppm status` (per partition, per worker, dead
    letters by reason) account for every record."""
    scenario = Scenario.create("all", servers.kafka_bootstrap, servers.redis_url, tmp_path)
    records = world_records(seed=21, initial_items=2_000)
    assert sum(kind == "item" for kind, _ in records) >= 2_000
    worker = scenario.worker(tmp_path).start()
    try:
        # A result page's impressions travel as one record; bad ones inside are dead letters.
        summary = scenario.publish(records, events_per_record=10)
        assert summary.records == len(records)
        assert summary.messages - summary.items < 0.5 * summary.behaviors  # items go alone
        want = wait_until_complete(scenario, worker)
        letters = dead_letters(scenario.cfg)
        status = ppm_status(scenario)
        metrics = worker_metrics(scenario, worker)
    finally:
        worker.stop()
    assert want.dead >= 5 and len(letters) == want.dead
    k = scenario.cfg.kafka
    items = status["topics"][k.items_topic]
    dead = sum(status["topics"][t + k.dead_letter_suffix]["dead_letters"]
               for t in (k.items_topic, k.behaviors_topic))
    assert items["end"] == sum(kind == "item" for kind, _ in records)
    assert dead == want.dead and status["freshness"]["items"] > 0
    assert all(letter["reason"] for letter in letters)
    assert want.valid + len(letters) == len(records)  # nothing lost, nothing doubled

    # `ppm status`: lag per partition, dead letters by reason, freshness per worker.
    assert len(items["partitions"]) == k.partitions
    assert sum(p["end"] for p in items["partitions"].values()) == items["end"]
    assert all(p["lag"] == 0 for p in items["partitions"].values())
    topic_of = {"item": k.items_topic, "behavior": k.behaviors_topic}
    by_reason = Counter((topic_of[letter["expected"]], letter["stage"], reason_class(letter))
                        for letter in letters)
    for topic in (k.items_topic, k.behaviors_topic):
        dead_topic = status["topics"][topic + k.dead_letter_suffix]
        assert dead_topic["read"] == dead_topic["dead_letters"]
        reasons: Counter[str] = Counter()
        for (letter_topic, _, reason), n in by_reason.items():
            reasons[reason] += n if letter_topic == topic else 0
        assert dead_topic["by_reason"] == {r: n for r, n in reasons.items() if n}
    assert len(status["freshness"]["by_worker"]) == 1
    [endpoint] = status["workers"]
    assert endpoint["up"] and endpoint["url"].startswith("http://127.0.0.1:")

    # The worker's /metrics: ours and Faust's sensor's.
    events = [e for admitted in admit_all(scenario.cfg, records) for e in admitted]
    item_events = sum(isinstance(e, ItemEvent) for e in events)
    assert sum(isinstance(e, DeadLetter) for e in events) == want.dead
    records_read = labelled(metrics, "ppm_records_total")
    assert records_read[f'topic="{k.items_topic}"'] == items["end"]
    assert labelled(metrics, "ppm_events_total")['kind="item"'] == item_events
    live = len(want.item_times) - len(want.deleted)
    embedded = metrics["ppm_items_embedded_total"]
    assert live <= embedded <= item_events
    assert metrics["ppm_freshness_seconds_count"] == embedded
    assert 0 < metrics["ppm_freshness_seconds_sum"] / embedded < 60  # seconds per item
    assert labelled(metrics, "ppm_dead_letters_total") == {
        f'reason="{reason}",stage="{stage}",topic="{topic}"': n
        for (topic, stage, reason), n in by_reason.items()}
    assert metrics["ppm_sequences_written_total"] > 0
    assert sum(labelled(metrics, "ppm_windows_closed_total").values()) >= 1
    assert metrics["ppm_samples_logged_total"] > 0
    assert not labelled(metrics, "ppm_outages_total")  # no outage in this test
    assert metrics["ppm_faust_messages_received_total"] >= items["end"]


def test_sigkill_of_the_worker_mid_stream_loses_nothing(servers: Servers, tmp_path):
    scenario = Scenario.create("sigkill", servers.kafka_bootstrap, servers.redis_url,
                               tmp_path)
    records = world_records(seed=22, initial_items=600)
    worker = scenario.worker(tmp_path).start()
    try:
        scenario.publish(records, events_per_record=10)  # a replay of packed records too
        got = wait_for_progress(scenario, 0.2)
        assert got < 1.0, "the worker finished before the kill: make the stream longer"
        worker.kill()
        worker.start()
        wait_until_complete(scenario, worker)
        assert_nothing_lost(scenario)
    finally:
        worker.stop()


def test_broker_restart_mid_stream_loses_nothing(restartable_servers: Servers, tmp_path):
    srv = restartable_servers
    scenario = Scenario.create("broker", srv.kafka_bootstrap, srv.redis_url, tmp_path)
    records = world_records(seed=23, initial_items=600)
    half = len(records) // 2
    worker = scenario.worker(tmp_path).start()
    try:
        scenario.publish(records[:half])
        wait_for_progress(scenario, 0.1)
        srv.stop_kafka()
        time.sleep(3)
        srv.start_kafka()
        scenario.publish(records[half:])
        wait_until_complete(scenario, worker)
        assert_nothing_lost(scenario)
    finally:
        worker.stop()


def redis_outage(srv: Servers, worker, retries_before: int) -> int:
    """Stop Redis (saving its data first, so what was written stays) and wait until the
    worker has retried a write; returns the number of retry lines logged so far."""
    redis.Redis.from_url(srv.redis_url).shutdown(save=True)  # stops after an RDB save
    srv.stop_redis()  # the process is gone; this clears its PID file
    deadline = time.monotonic() + 120  # redis-py itself retries a few times first
    while worker.tail(200_000).count("retry") <= retries_before:
        assert time.monotonic() < deadline, "the worker never hit the outage"
        time.sleep(1)
    assert worker.proc.poll() is None, "an outage must not stop the worker"
    return worker.tail(200_000).count("retry")


def test_redis_outage_is_retried_caught_up_and_commits_nothing_unwritten(
        restartable_servers: Servers, tmp_path):
    """Redis goes away mid-stream twice. The first time the worker retries and catches up
    by itself once Redis is back. The second time it is SIGKILLed while Redis is down: had
    it committed offsets past writes that failed, those events would never come back."""
    srv = restartable_servers
    scenario = Scenario.create("redis", srv.kafka_bootstrap, srv.redis_url, tmp_path)
    records = world_records(seed=24, initial_items=1_500)
    worker = scenario.worker(tmp_path).start()
    try:
        scenario.publish(records)
        before = wait_for_progress(scenario, 0.1)
        retries = redis_outage(srv, worker, 0)
        srv.start_redis()
        after = wait_for_progress(scenario, before + 0.2)  # the same worker goes on
        assert worker.starts == 1 and after < 1.0, "make the stream longer"
        metrics = worker_metrics(scenario, worker)
        outages = sum(labelled(metrics, "ppm_outages_total").values())
        assert 1 <= outages <= sum(labelled(metrics, "ppm_retries_total").values())
        redis_outage(srv, worker, retries)
        worker.kill()
        srv.start_redis()
        worker.start()
        wait_until_complete(scenario, worker)
        assert_nothing_lost(scenario)
    finally:
        worker.stop()
