"""What the distributed-path tests need: a per-test topic layout and Redis database, and
the check that the online store holds exactly what the embedded pipeline's processors
make of the same events."""

from __future__ import annotations

import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from feast.errors import FeatureViewNotFoundException

from ppm.clock import to_us
from ppm.config import Config, SimulatorConfig, load_config
from ppm.data_dir import DataDir
from ppm.events import BehaviorEvent, DeadLetter, ItemEvent
from ppm.records import UserSequence
from streams.intake import Intake
from streams.sequence_builder import SequenceBuilder
from streams.topics import ensure_topics
from tests.servers import FaustWorker, redis_db_url, worker_env

_databases = itertools.count(1)  # Redis database per test: 1..15 (0 is left to people)


def next_redis_database() -> int:
    """A Redis database no other test of this session uses."""
    db = next(_databases)
    assert db <= 15, "more tests than Redis databases"
    return db


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
        db = next_redis_database()
        # idle_close_s: the end of a test's stream closes the windows, so lag can reach 0.
        env = worker_env(kafka_bootstrap, redis_url, name, tmp / "data", db,
                         item_batch_wait_s=0.5, idle_close_s=5)
        cfg = load_config(env=env)
        redis.Redis.from_url(redis_db_url(redis_url, db)).flushdb()
        ensure_topics(cfg.kafka)
        return cls(name, cfg, env, db)

    def worker(self, tmp: Path) -> FaustWorker:
        return FaustWorker(self.env, tmp / f"worker-{self.name}.log")

    def publish(self, records: list[tuple[str, bytes]], rate: float | None = None,
                events_per_record: int = 1):
        """Publish with ``ppm publish``'s code; returns its summary."""
        from streams.sources.publisher import Publisher

        with Publisher(self.cfg.kafka) as publisher:
            summary = publisher.publish(records, rate=rate, events_per_record=events_per_record)
        self.published.extend(records)
        return summary

    def online(self):
        from feature_repo.online_features import OnlineFeatures

        return OnlineFeatures.open(self.cfg, apply=False)  # cfg.redis.url: the test's db


def world_records(seed: int, initial_items: int, users: int = 300, days: float = 0.25,
                  malformed_share: float = 0.01) -> list[tuple[str, bytes]]:
    from streams.sources.shop_simulator import ShopSimulator

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

    builder = SequenceBuilder.of(cfg, Sink())
    item_times: dict[str, int] = {}
    deleted: set[str] = set()
    valid = dead = 0
    behaviors = []
    intake = Intake(cfg)  # the worker's own rules: decoding and clock guards
    for kind, raw in records:
        # The publisher may pack a user's consecutive behavior records; their elements are
        # admitted the same (ppm.events.decode_record).
        for event in intake.admit(kind, raw, "test"):
            if isinstance(event, DeadLetter):
                dead += 1
                continue
            valid += 1
            if isinstance(event, ItemEvent):
                t = to_us(event.event_time)
                if t >= item_times.get(event.item_id, -1):
                    item_times[event.item_id] = t
                    (deleted.add if event.op.value == "delete" else deleted.discard)(
                        event.item_id)
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


# ------------------------------------------------------------------ accounting by identity
# Issue 11: every published event is applied or a dead letter with its reason, and the
# training windows hold exactly the samples the same records make without Kafka. Shared with
# bench/fuzz.py.


def admit_all(cfg: Config, records: list[tuple[str, bytes]]
              ) -> list[list[ItemEvent | BehaviorEvent | DeadLetter]]:
    """What :class:`streams.intake.Intake` makes of each record, in order, without Kafka:
    its events and dead letters (one record may hold several; ``streams.sources.hostile``'s fates).
    The clock guards are a worker's (no stream clock: the record's time decides)."""
    gate = Intake(cfg)
    return [gate.admit(kind, raw, f"{kind}:{n}")  # type: ignore[arg-type]
            for n, (kind, raw) in enumerate(records)]


_SOURCE = re.compile(r"^(?P<record>.*?)(?:\[(?P<element>\d+)\])?$")


def letter_element(source: str) -> tuple[str, int]:
    """``("behaviors-x:1:42", 3)`` for a dead letter's source ``behaviors-x:1:42[3]``: the
    record, and the element of a packed record (0 for a letter that names a whole record)."""
    m = _SOURCE.match(source)
    assert m is not None  # the pattern matches any string
    return m["record"], int(m["element"] or 0)


def window_samples(data_dir: Path) -> list[tuple[str, int, int, int]]:
    """``(sample_id, click, order, collect)`` of every row of every window file a manifest
    lists (the local runner's ``training/windows/`` and each partition's
    ``training/partition-<p>/windows/``), a sample written twice listed twice."""
    import pyarrow.parquet as pq

    from trainer.windows import window_sources

    rows: list[tuple[str, int, int, int]] = []
    for windows in window_sources(DataDir(Path(data_dir)).training).values():
        for path in (f for window in windows for f in window.files):
            table = pq.read_table(path, columns=["sample_id", "click", "order", "collect"])
            rows += zip(*(table[c].to_pylist() for c in table.column_names), strict=True)
    return rows


def late_events(data_dir: Path) -> list[str]:
    """The events of every ``late_events.jsonl`` under ``data_dir/training`` (wire JSON)."""
    lines = []
    for log in DataDir(Path(data_dir)).training_logs():
        path = log.late_events
        if not path.exists():
            continue
        lines += [json.dumps(json.loads(line)["event"], separators=(",", ":"))
                  for line in path.read_text().splitlines() if line]
    return lines


def publish_tracked(cfg: Config, records: list[tuple[str, bytes]], progress: bool = False
                    ) -> list[tuple[str, int, int]]:
    """Publish ``records`` keyed as ``ppm publish`` keys them, one Kafka record each, and
    return each one's ``(topic, partition, offset)``, so a dead letter's source names the
    record it came from. An empty record goes out as a real tombstone (no value). The
    producer takes records up to ``contracts.max_payload_bytes``."""
    from kafka import KafkaProducer
    from tqdm import tqdm

    from streams.sources.publisher import routing_key
    from streams.topics import RECORD_HEADROOM_BYTES

    topics = {"item": cfg.kafka.items_topic, "behavior": cfg.kafka.behaviors_topic}
    where: list[tuple[str, int, int] | None] = [None] * len(records)
    failures: list[BaseException] = []

    def delivered(n: int):
        def on_success(meta) -> None:
            where[n] = (meta.topic, meta.partition, meta.offset)
        return on_success

    producer = KafkaProducer(
        bootstrap_servers=cfg.kafka.bootstrap, acks="all", enable_idempotence=True,
        linger_ms=5, client_id="ppm-publish-tracked",
        max_request_size=cfg.contracts.max_payload_bytes + RECORD_HEADROOM_BYTES)
    try:
        for n, (kind, raw) in enumerate(tqdm(records, desc="publish", unit=" rec",
                                             disable=not progress, mininterval=0.5)):
            key = routing_key(kind, raw)
            if not raw and key is None:
                key = b"tombstone"  # Kafka takes a record with a key or a value, not neither
            future = producer.send(topics[kind], key=key, value=raw or None)
            future.add_callback(delivered(n))
            future.add_errback(failures.append)
        producer.flush()
    finally:
        producer.close()
    if failures or None in where:
        raise RuntimeError(f"{len(failures)} records were not published; first: "
                           f"{failures[:1]!r}")
    return where  # type: ignore[return-value]

