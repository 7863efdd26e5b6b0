"""What the distributed-path tests need: a per-test topic layout and Redis database, and
the check that the online store holds exactly what the embedded pipeline's processors
make of the same events."""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from feast.errors import FeatureViewNotFoundException

from ppm.config import Config, SimulatorConfig, load_config
from ppm.events import BehaviorEvent, DeadLetter, ItemEvent, decode
from ppm.servers import FaustWorker
from streams.sequence_builder import SequenceBuilder, UserSequence, to_us
from streams.topics import ensure_topics

REPO = Path(__file__).resolve().parents[2]
_databases = itertools.count(1)  # Redis database per test: 1..15 (0 is left to people)


@dataclass
class Scenario:
    """One test's own topics (``items-<name>`` ...), consumer group, data dir and Redis
    database, so tests sharing a broker and a Redis never see each other's events."""

    name: str
    cfg: Config
    env: dict[str, str]
    redis_db: int
    published: list[tuple[str, bytes]] = field(default_factory=list)

    @classmethod
    def create(cls, name: str, kafka_bootstrap: str, redis_url: str, tmp: Path) -> Scenario:
        host_port = redis_url.removeprefix("redis://").rstrip("/")
        db = next(_databases)
        env = {**os.environ,
               "PPM__KAFKA__BOOTSTRAP": kafka_bootstrap,
               "PPM__KAFKA__ITEMS_TOPIC": f"items-{name}",
               "PPM__KAFKA__BEHAVIORS_TOPIC": f"behaviors-{name}",
               "PPM__KAFKA__APP_ID": f"ppm-{name}",
               "PPM__DATA_DIR": str(tmp / "data"),
               "PPM__FEATURES__STORE_YAML": str(REPO / "feature_repo" /
                                                "feature_store.redis.yaml"),
               "PPM__PIPELINE__ITEM_BATCH_WAIT_S": "0.5",
               "PPM_REDIS": f"{host_port},db={db}",
               "PYTHONWARNINGS": "ignore::DeprecationWarning"}
        cfg = load_config(env=env)
        redis.Redis.from_url(f"{redis_url}/{db}").flushdb()
        ensure_topics(cfg.kafka)
        return cls(name, cfg, env, db)

    def worker(self, tmp: Path) -> FaustWorker:
        return FaustWorker(self.env, tmp / f"worker-{self.name}.log")

    def publish(self, records: list[tuple[str, bytes]], rate: float | None = None,
                events_per_record: int = 1):
        """Publish with ``ppm publish``'s code; returns its summary."""
        from streams.publisher import Publisher

        with Publisher(self.cfg.kafka) as publisher:
            summary = publisher.publish(records, rate=rate, events_per_record=events_per_record)
        self.published.extend(records)
        return summary

    def online(self):
        from streams.online_features import OnlineFeatures

        old = os.environ.get("PPM_REDIS")
        os.environ["PPM_REDIS"] = self.env["PPM_REDIS"]
        try:
            return OnlineFeatures.open(self.cfg, apply=False)
        finally:
            if old is None:
                del os.environ["PPM_REDIS"]
            else:
                os.environ["PPM_REDIS"] = old


def world_records(seed: int, initial_items: int, users: int = 300, days: float = 0.25,
                  malformed_share: float = 0.01) -> list[tuple[str, bytes]]:
    from streams.shop_simulator import ShopSimulator

    world = SimulatorConfig(seed=seed, days=days, n_users=users, initial_items=initial_items,
                            items_per_day=400, malformed_share=malformed_share)
    return list(ShopSimulator(world).records())


@dataclass
class Expected:
    """What the processors make of the published records, computed without Kafka."""

    item_times: dict[str, int]
    """item_id -> event time (µs) of its newest valid event."""
    deleted: set[str]
    sequences: dict[str, UserSequence]
    valid: int
    dead: int


def expected(cfg: Config, records: list[tuple[str, bytes]]) -> Expected:
    class Sink:
        def write_sequences(self, sequences):
            pass

    builder = SequenceBuilder(Sink(), k=cfg.features.sequence_length)
    item_times: dict[str, int] = {}
    deleted: set[str] = set()
    valid = dead = 0
    behaviors = []
    for kind, raw in records:
        # One event per simulator record; the publisher may pack a user's consecutive
        # behavior records, whose elements decode the same (ppm.events.decode_record).
        event = decode(raw, kind, "test", cfg.contracts, cfg.images.max_bytes)
        if isinstance(event, DeadLetter):
            dead += 1
            continue
        valid += 1
        if isinstance(event, ItemEvent):
            t = to_us(event.event_time)
            if t >= item_times.get(event.item_id, -1):
                item_times[event.item_id] = t
                (deleted.add if event.op.value == "delete" else deleted.discard)(event.item_id)
        elif isinstance(event, BehaviorEvent):
            behaviors.append(event)
    builder.process(behaviors)
    return Expected(item_times, deleted, dict(builder.state), valid, dead)


def dead_letters(cfg: Config) -> list[dict]:
    from kafka import KafkaConsumer

    k = cfg.kafka
    consumer = KafkaConsumer(k.items_topic + k.dead_letter_suffix,
                             k.behaviors_topic + k.dead_letter_suffix,
                             bootstrap_servers=k.bootstrap, auto_offset_reset="earliest",
                             group_id=None, consumer_timeout_ms=3000)
    try:
        return [json.loads(m.value) for m in consumer]
    finally:
        consumer.close()


def differences(scenario: Scenario, want: Expected) -> list[str]:
    """What the online store gets wrong (empty: all there): items missing, not at their
    newest event, not embedded, deletions not applied, and sequences that differ."""
    store = scenario.online()
    got = store.read_items(sorted(want.item_times), with_embeddings=False)
    problems = []
    for item_id, t in want.item_times.items():
        item = got.get(item_id)
        if item is None:
            problems.append(f"item {item_id} missing")
        elif item.state.updated_us != t:
            problems.append(f"item {item_id} at {item.state.updated_us}, not {t}")
        elif item.state.deleted != (item_id in want.deleted):
            problems.append(f"item {item_id} deleted={item.state.deleted}")
        elif not item.state.deleted and item.state.encoder_version is None:
            problems.append(f"item {item_id} not embedded")
    sequences = store.read_sequences(sorted(want.sequences))
    for user_id, seq in want.sequences.items():
        online = sequences.get(user_id)
        if online is None or (online.item_ids, online.actions, online.times_us) != (
                seq.item_ids, seq.actions, seq.times_us):
            problems.append(f"sequence of {user_id} differs")
    return problems


def wait_until_complete(scenario: Scenario, worker: FaustWorker, timeout_s: float = 300
                        ) -> Expected:
    """Wait until the online store holds what the published records make; fail with the
    first differences and the worker's log tail otherwise."""
    want = expected(scenario.cfg, scenario.published)
    deadline = time.monotonic() + timeout_s
    problems = ["not checked yet"]
    while time.monotonic() < deadline:
        try:
            problems = differences(scenario, want)
        except FeatureViewNotFoundException:  # the worker has not applied the repo yet
            problems = ["the worker has not applied the feature repo yet"]
        if not problems:
            return want
        if worker.proc is not None and worker.proc.poll() is not None:
            break
        time.sleep(2)
    raise AssertionError(f"{len(problems)} differences, e.g. {problems[:5]}\n"
                         f"worker log:\n{worker.tail()}")


def readable_share(scenario: Scenario) -> float:
    """Share of the published items readable online now (how far the worker got)."""
    want = expected(scenario.cfg, scenario.published)
    try:
        got = scenario.online().read_items(sorted(want.item_times))
    except FeatureViewNotFoundException:  # the worker is still starting: it applies the repo
        return 0.0
    return len(got) / max(1, len(want.item_times))
