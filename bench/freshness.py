"""Freshness through the distributed path: kafka-python -> Kafka -> Faust worker -> Redis.

Servers: ``PPM__KAFKA__BOOTSTRAP`` and ``PPM__REDIS__URL`` when both are set, else local processes
(``infra/up``, stopped at the end). One Faust worker (``streams.app``) runs on its own topics
and Redis database (``--redis-db``, flushed first).

1. Baseline, same run: the bare ``ItemEncoder`` on the same item events (batches of 64),
   items/s, while the worker is idle (after one warm-up item, so its encoder is loaded).
2. Items: new items (fresh ids, ``event_time`` = the moment they are sent) are published at
   ``--rate`` (default: half the bare encoder's items/s) for ``--warm-up`` + ``--duration``
   seconds; the warm-up's items count for ``lost`` but not for the latencies. (A fresh
   broker's JIT compiler is busy then, and the encoder falls behind for some seconds.) The
   worker records when each item became readable in Redis (parts under
   ``freshness-items/<worker>/``, ``streams.freshness.read_freshness_items``);
   p50/p99 are of readable - event_time.
   ``lost``: published items not readable ``--drain`` seconds after the last one;
   ``max_lag``: the largest consumer lag on ``items`` seen (sampled each s).
3. Behaviors: ``--behaviors`` simulated behavior events are published as fast as possible,
   then one last click per partition; the rate is the events divided by the time from the
   first send until every partition's last click is in Redis (sequences and the
   training-log writer included; the publisher shares the machine). Twice, on two
   consecutive simulated worlds: one event per Kafka record
   (``behavior_events_per_s_one_per_record``), then consecutive events of one user packed
   into one record, up to ``--events-per-record`` (``behavior_events_per_s``; a result page
   makes several events per record: ``behavior_events`` / ``behavior_records`` in the last
   line). A Faust worker's cost per record is about that of a few events, so the packed
   figure is the one the goal is for.

Last line: ``{"rate_items_per_s", "bare_items_per_s", "p50_ms", "p99_ms", "lost", "max_lag",
"behavior_events_per_s", ...}``. Goals: p99 <= 1,000 ms with nothing lost at half the bare
throughput; >= 10,000 behavior events/s on one worker.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
# The server harness (tests/servers.py): the repo first, since site-packages holds another
# package called "tests".
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, help="items/s (default: half the bare encoder)")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds of publishing measured items")
    parser.add_argument("--warm-up", type=float, default=15.0,
                        help="seconds of publishing at the same rate first, not measured "
                        "(default 15)")
    parser.add_argument("--drain", type=float, default=60.0,
                        help="seconds to wait for the last items")
    parser.add_argument("--behaviors", type=int, default=150_000,
                        help="behavior events per run (two runs)")
    parser.add_argument("--events-per-record", type=int, default=50,
                        help="most behavior events packed into one Kafka record (default 50)")
    parser.add_argument("--redis-db", type=int, default=9)
    parser.add_argument("--batch-wait", type=float, default=0.25,
                        help="pipeline.item_batch_wait_s of the worker: the longest an item "
                        "waits for its batch (default 0.25 s)")
    args = parser.parse_args()

    from tests.servers import start_servers

    # A SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the servers and the worker this
    # run started (in their own sessions) are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory() as tmp:
        servers = start_servers(Path(tmp) / "run")
        try:
            print(json.dumps(run(args, servers, Path(tmp))))
        finally:
            servers.close()


def run(args: argparse.Namespace, servers, tmp: Path) -> dict:
    import redis

    from encoders.item_encoder import ItemEncoder
    from ppm.config import SimulatorConfig, load_config
    from ppm.events import ItemEvent, decode
    from streams.freshness import read_freshness_items
    from streams.sources.publisher import Publisher, routing_key
    from streams.sources.shop_simulator import ShopSimulator
    from streams.topics import LagProbe, ensure_topics
    from tests.servers import FaustWorker, redis_db_url, worker_env

    env = worker_env(servers.kafka_bootstrap, servers.redis_url, "bench-freshness", tmp / "data",
                     args.redis_db,
                     item_batch_wait_s=args.batch_wait)
    env["PPM__KAFKA__FRESHNESS_ITEMS_PART_S"] = "1"  # the per-item records, soon
    cfg = load_config(env=env)
    redis.Redis.from_url(redis_db_url(servers.redis_url, args.redis_db)).flushdb()
    ensure_topics(cfg.kafka)

    # Item events to send: the simulator's catalog, re-stamped at send time.
    sim = ShopSimulator(SimulatorConfig(seed=5, days=0.01, n_users=10, initial_items=3_000,
                                        items_per_day=0))
    templates = [json.loads(raw) for kind, raw in sim.records() if kind == "item"]

    log(f"servers: Kafka {servers.kafka_bootstrap}, Redis {servers.redis_url}; "
        "starting the worker ...")
    worker = FaustWorker(env, tmp / "worker.log").start()
    try:
        log("waiting until the worker's encoder is up (one warm-up item readable) ...")
        wait_for_encoder(cfg, templates[0], read_freshness_items)
        events = [decode(json.dumps(t).encode(), "item", "bench", cfg.contracts)
                  for t in templates]
        bare = bare_items_per_s(ItemEncoder.from_config(cfg),
                                [e for e in events if isinstance(e, ItemEvent)])
        rate = args.rate or bare / 2
        log(f"bare encoder: {bare:.1f} items/s; publishing items at {rate:.1f}/s "
            f"for {args.warm_up:.0f}s (warm-up) + {args.duration:.0f}s ...")

        lags: list[int] = []
        sampling = threading.Event()

        def sample_lag() -> None:
            with LagProbe(cfg.kafka) as probe:
                while not sampling.wait(1.0):
                    try:
                        lags.append(probe.lag()[cfg.kafka.items_topic]["lag"])
                    except Exception as exc:  # a sample lost is not a result lost
                        log(f"lag sample failed: {exc!r}")

        sampler = threading.Thread(target=sample_lag, daemon=True)
        sampler.start()
        sent: list[str] = []
        unmeasured = 0  # items sent in the warm-up: not in the latency figures
        with Publisher(cfg.kafka, linger_ms=0) as publisher:
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < args.warm_up + args.duration:
                due = int(elapsed * rate) + 1
                while len(sent) < due:
                    item = dict(templates[len(sent) % len(templates)])
                    item["item_id"] = f"fresh-{len(sent):06d}"
                    item["event_time"] = datetime.now(UTC).isoformat()
                    raw = json.dumps(item).encode()
                    publisher.send("item", raw, routing_key("item", raw))
                    sent.append(item["item_id"])
                    unmeasured += elapsed < args.warm_up
                time.sleep(min(0.01, max(0.0, len(sent) / rate - elapsed)))
        lost, lags_by_item = drain(cfg, sent, args.drain, read_freshness_items)
        lags_ms = [lags_by_item[i] for i in sent[unmeasured:] if i in lags_by_item]
        sampling.set()
        sampler.join()

        single_rate, _, _ = behaviors_per_s(cfg, args.behaviors, 1, world=0)
        behavior_rate, behavior_count, behavior_records = behaviors_per_s(
            cfg, args.behaviors, args.events_per_record, world=1)
    except BaseException:
        log(worker.tail())
        raise
    finally:
        worker.stop()

    return {
        "rate_items_per_s": round(rate, 1),
        "bare_items_per_s": round(bare, 1),
        "p50_ms": round(float(np.percentile(lags_ms, 50)), 1) if lags_ms else None,
        "p99_ms": round(float(np.percentile(lags_ms, 99)), 1) if lags_ms else None,
        "lost": lost,
        "max_lag": max(lags, default=0),
        "behavior_events_per_s": round(behavior_rate),
        "behavior_events_per_s_one_per_record": round(single_rate),
        "items": len(sent) - unmeasured,
        "duration_s": args.duration,
        "warm_up_items": unmeasured,
        "behavior_events": behavior_count,
        "behavior_records": behavior_records,
        "item_batch_wait_s": args.batch_wait,
        "goal_p99_ms": 1000,
        "goal_behavior_events_per_s": 10_000,
    }


def wait_for_encoder(cfg, template: dict, read_items, timeout_s: float = 180) -> None:
    """Publish one item and wait until the worker has made it readable: the worker's encoder
    loads in a child process after Faust says it is ready, and that start-up is not part
    of a steady-state latency (nor should it share the cores with the bare baseline)."""
    from streams.sources.publisher import Publisher, routing_key

    item = dict(template, item_id="warm-up", event_time=datetime.now(UTC).isoformat())
    raw = json.dumps(item).encode()
    with Publisher(cfg.kafka, linger_ms=0) as publisher:
        publisher.send("item", raw, routing_key("item", raw))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "warm-up" in read_items(cfg.data_dir).column("item_id").to_pylist():
            return
        time.sleep(0.5)
    raise TimeoutError(f"the warm-up item was not readable within {timeout_s:.0f}s")


def bare_items_per_s(encoder, events: list, batch: int = 64, batches: int = 4) -> float:
    encoder.encode(events[:batch])  # warm-up
    started = time.perf_counter()
    for i in range(1, batches + 1):
        encoder.encode(events[i * batch:(i + 1) * batch])
    return batches * batch / (time.perf_counter() - started)


def drain(cfg, sent: list[str], timeout_s: float, read_items
          ) -> tuple[int, dict[str, float]]:
    """Wait until every sent item is in the worker's freshness records (readable in Redis)
    and confirm in Redis itself; return (lost, item_id -> event-to-readable ms)."""
    from feature_repo.online_features import OnlineFeatures

    wanted = set(sent)
    deadline = time.monotonic() + timeout_s
    lags: dict[str, float] = {}
    while time.monotonic() < deadline:
        table = read_items(cfg.data_dir)
        times = {c: table.column(c).cast(pa.int64()).to_pylist()
                 for c in ("event_time", "readable")}
        lags = {i: (r - e) / 1000 for i, e, r in zip(table.column("item_id").to_pylist(),
                                                     times["event_time"], times["readable"],
                                                     strict=True)
                if i in wanted}
        if len(lags) == len(wanted):
            break
        time.sleep(1.0)
    online = OnlineFeatures.open(cfg, apply=False).read_items(sent)
    lost = sum(1 for i in sent if i not in online or online[i].state.encoder_version is None)
    return lost, lags


def behaviors_per_s(cfg, count: int, events_per_record: int, world: int
                    ) -> tuple[float, int, int]:
    """(events/s, events, Kafka records) of one run: ``count`` events of simulated world
    number ``world`` (each starts where the one before ended, with users of its own, so no
    run's events are late or duplicates for the worker), packed ``events_per_record``."""
    from kafka.partitioner.default import murmur2

    from feature_repo.online_features import OnlineFeatures
    from ppm.config import SimulatorConfig
    from streams.sources.publisher import Publisher
    from streams.sources.shop_simulator import ShopSimulator

    days = 3.0
    base = SimulatorConfig()
    sim = ShopSimulator(SimulatorConfig(seed=6 + world, days=days, n_users=8_000,
                                        initial_items=600, items_per_day=0,
                                        start=base.start + timedelta(days=days * world)))
    records = []
    last_time = ""
    for kind, raw in sim.records():
        if kind == "behavior":
            event = json.loads(raw)
            event["user_id"] = f"w{world}-{event['user_id']}"
            records.append(("behavior", json.dumps(event).encode()))
            if len(records) == count:
                last_time = event["event_time"]
                break
    # One last click per partition, on a user of that partition: when all are readable,
    # every event before them in their partitions has been through the agent.
    n = cfg.kafka.partitions
    sentinels: dict[int, str] = {}
    i = 0
    while len(sentinels) < n:
        user = f"w{world}-sentinel-{i}"
        sentinels.setdefault((murmur2(user.encode()) & 0x7FFFFFFF) % n, user)
        i += 1
    for user in sentinels.values():
        records.append(("behavior", json.dumps({
            "kind": "behavior", "user_id": user, "item_id": "i0000001", "action": "click",
            "event_time": last_time, "request_id": "sentinel", "position": 0}).encode()))
    online = OnlineFeatures.open(cfg, apply=False)
    log(f"publishing {len(records):,} behavior events, up to {events_per_record} per record ...")
    started = time.monotonic()
    with Publisher(cfg.kafka) as publisher:
        summary = publisher.publish(records, events_per_record=events_per_record)
    log(f"published {summary.messages:,} records in {time.monotonic() - started:.1f}s; "
        "waiting for the last clicks ...")
    deadline = started + 180
    while time.monotonic() < deadline:
        if len(online.read_sequences(list(sentinels.values()))) == n:
            rate = len(records) / (time.monotonic() - started)
            log(f"{rate:,.0f} behavior events/s")
            return rate, len(records), summary.messages
        time.sleep(0.1)
    raise TimeoutError("the behavior events were not through in 3 minutes")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
