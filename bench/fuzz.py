"""Hostile records through a real worker: is every event applied or a dead letter, once?

Servers: ``PPM__KAFKA__BOOTSTRAP`` and ``PPM__REDIS__URL`` when both are set, else local processes
(``infra/up``, stopped at the end). One Faust worker (``streams.app``) runs on its own topics,
consumer group, Redis database (``--redis-db``, flushed first) and data dir, with
``pipeline.idle_close_s`` set so that a quiet partition closes its windows and the group can
commit everything.

1. Records: a simulated shop (``streams.sources.shop_simulator``, users scaled to reach
   ``--records``, items a small share since the encoder is the slowest stage) with
   ``--hostile-share`` of hostile records (``streams.sources.hostile``: every case at least once,
   the one 8 MB record included).
2. Expected, without Kafka: what :class:`streams.intake.Intake` makes of each record (its
   events and dead letters), the sample ids of the admitted impressions, their labels and
   late follow-ups from a :class:`streams.training_log.TrainingLogWriter` with no encoder,
   and the online-store state (``tests/integration/pipeline_check.py``, whose checks the
   integration tests share).
3. Publish: one Kafka record per record, keyed as ``ppm publish`` keys them (an empty one as
   a real tombstone), each one's partition and offset kept.
4. Wait until the group's committed offsets reach the end of both input topics (at most
   ``--timeout`` s). A worker that exits (exit 70 is how it stops on an unexpected error) is
   started again and counted in ``worker_restarts``.
5. Check by identity: every dead letter's ``source`` (``topic:partition:offset[i]``) names a
   published record's event that the Intake made a dead letter of (or an admitted item
   that failed in the encoder: ``stage: process``), with the same payload sha256; every
   admitted impression's sample is in the worker's windows (the union over
   ``DATA/training/partition-*/windows/`` as each manifest lists them) exactly once; every
   follow-up labels its sample or is in a ``late_events.jsonl``; every item is in Redis as
   its events make it.

An event is *applied* when step 5 finds its effect, *dead* when its letter is on a
dead-letter topic, else *lost*. Last line: ``{"records", "events", "applied",
"dead_letters", "lost", "duplicated_samples", "worker_restarts", "seconds",
"missing_samples", "dead_letters_by_stage", ...}``. Goals: lost 0, duplicated_samples 0,
applied + dead_letters == events, worker_restarts 0. docs/results.md has a run at the
default 100,000 records, its time included.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The integration tests' checks (tests/integration/pipeline_check.py), imported by module
# name, and the server harness (tests/servers.py): the repo first, since site-packages holds
# another package called "tests".
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000,
                        help="at least this many records in all (default 100,000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hostile-share", type=float, default=0.05,
                        help="share of hostile case instances among the records (default 0.05)")
    parser.add_argument("--timeout", type=float, default=420.0,
                        help="seconds to wait for the group to commit everything (default 420)")
    parser.add_argument("--idle-close", type=float, default=10.0,
                        help="pipeline.idle_close_s of the worker (default 10 s)")
    parser.add_argument("--redis-db", type=int, default=10)
    args = parser.parse_args()

    from tests.servers import start_servers

    # A SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the servers and the worker this
    # run started (in their own sessions) are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        servers = start_servers(Path(tmp) / "run")
        try:
            result = run(args, servers, Path(tmp), started)
        finally:
            servers.close()
    result["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result))


def run(args: argparse.Namespace, servers, tmp: Path, started: float) -> dict:
    import redis
    from pipeline_check import (
        Scenario,
        admit_all,
        dead_letters,
        differences,
        expected,
        publish_tracked,
    )

    from ppm.config import load_config
    from streams.sources.hostile import labelled_mix
    from streams.topics import ensure_topics
    from tests.servers import FaustWorker, redis_db_url, worker_env

    env = worker_env(servers.kafka_bootstrap, servers.redis_url, "bench-fuzz", tmp / "data",
                     args.redis_db,
                     idle_close_s=args.idle_close)
    cfg = load_config(env=env)
    phases: dict[str, float] = {}
    clock = [time.monotonic()]

    def phase(name: str) -> None:
        now = time.monotonic()
        phases[name] = round(now - clock[0], 1)
        clock[0] = now

    # 1. Records.
    mixed = labelled_mix(world(args.records, args.hostile_share, args.seed), seed=args.seed,
                         share=args.hostile_share, contracts=cfg.contracts)
    records = [(m.kind, m.raw) for m in mixed]
    log(f"{len(records):,} records, {sum(m.case is not None for m in mixed):,} of them "
        f"hostile ({len({m.case for m in mixed if m.case})} cases)")
    phase("simulate")

    # 2. Expected, without Kafka.
    outcomes = admit_all(cfg, records)
    fate_mismatches = sum(1 for m, o in zip(mixed, outcomes, strict=True)
                          if m.case and fate(o) != m.fate)
    want_store = expected(cfg, records)
    want = local_training_log(cfg, outcomes, tmp / "expected")
    phase("expect")

    # 3. Publish to one worker.
    redis.Redis.from_url(redis_db_url(servers.redis_url, args.redis_db)).flushdb()
    ensure_topics(cfg.kafka, contracts=cfg.contracts)
    scenario = Scenario("fuzz", cfg, env, args.redis_db)
    worker = FaustWorker(env, tmp / "worker.log")
    log(f"servers: Kafka {servers.kafka_bootstrap}, Redis {servers.redis_url}; "
        "starting the worker ...")
    worker.start()
    phase("start_worker")
    try:
        where = publish_tracked(cfg, records, progress=True)
        phase("publish")
        # 4. Wait until everything is committed.
        lag = drain(cfg, worker, len(records), args.timeout)
        phase("drain")
        letters = dead_letters(cfg)
        store_problems = differences(scenario, want_store)
        phase("read_back")
        tail = worker.tail(10_000_000)
    except BaseException:
        log(worker.tail())
        raise
    finally:
        worker.stop()

    # 5. By identity.
    result = account(cfg, records, outcomes, where, letters, want, store_problems)
    if "stopping the worker" in tail:
        log(tail[tail.index("stopping the worker") - 2000:][:6000])
    return {
        "records": len(records),
        **result,
        "worker_restarts": worker.starts - 1,
        "worker_stopped_on_error": "stopping the worker" in tail,
        "lag": lag,
        "fate_mismatches": fate_mismatches,
        "hostile_records": sum(m.case is not None for m in mixed),
        "hostile_share": args.hostile_share,
        "seed": args.seed,
        "seconds_by_phase": phases,
        "seconds": round(time.monotonic() - started, 1),
    }


def world(records: int, share: float, seed: int) -> list[tuple[str, bytes]]:
    """The valid records: enough of a simulated shop that, with the hostile ones, there are
    at least ``records`` (a shop makes ~13 per user over three days; its items are a few
    hundred)."""
    from tqdm import tqdm

    from ppm.config import SimulatorConfig
    from streams.sources.shop_simulator import ShopSimulator

    valid = math.ceil(records * (1 - share))
    sim = ShopSimulator(SimulatorConfig(seed=seed, days=3.0, n_users=max(50, valid // 10),
                                        initial_items=300, items_per_day=100,
                                        malformed_share=0.01))
    out = list(tqdm(itertools.islice(sim.records(), valid), total=valid, desc="simulate",
                    unit=" rec", mininterval=0.5))
    if len(out) < valid:
        raise RuntimeError(f"the simulated shop made {len(out)} records, not {valid}")
    return out


def fate(outcome: list) -> str:
    from ppm.events import DeadLetter

    dead = [isinstance(e, DeadLetter) for e in outcome]
    return "dead" if all(dead) else "applied" if not any(dead) else "split"


def local_training_log(cfg, outcomes: list[list], out: Path) -> dict:
    """The admitted behaviors through SequenceBuilder and TrainingLogWriter, no encoder,
    windows closed at the end: ``samples`` (sample_id -> labels) and ``late`` (events)."""
    from pipeline_check import late_events, window_samples

    from ppm.data_dir import DataDir
    from ppm.events import BehaviorEvent
    from streams.sequence_builder import SequenceBuilder
    from streams.training_log import TrainingLogWriter

    class Sink:
        def write_sequences(self, sequences):
            pass

    builder = SequenceBuilder.of(cfg, Sink())
    writer = TrainingLogWriter(DataDir(out).training, sequences=builder, items={},
                               attribution_window_s=cfg.pipeline.attribution_window_s,
                               window_s=cfg.pipeline.log_window_s)
    behaviors = [e for o in outcomes for e in o if isinstance(e, BehaviorEvent)]
    batch = cfg.pipeline.behavior_batch_size
    for start in range(0, len(behaviors), batch):
        builder.process(behaviors[start:start + batch])
        writer.process(behaviors[start:start + batch])
    writer.close_all()
    rows = window_samples(out)
    return {"samples": {s: tuple(labels) for s, *labels in rows},
            "late": Counter(late_events(out))}


def drain(cfg, worker, records: int, timeout_s: float) -> dict[str, int]:
    """Wait until the group has committed both input topics to their end; restart the
    worker whenever it has exited. Returns the last lag per input topic."""
    from tqdm import tqdm

    from streams.topics import LagProbe

    inputs = (cfg.kafka.items_topic, cfg.kafka.behaviors_topic)
    deadline = time.monotonic() + timeout_s
    lag = dict.fromkeys(inputs, -1)
    with LagProbe(cfg.kafka) as probe, tqdm(total=records, desc="commit", unit=" rec",
                                            mininterval=0.5) as bar:
        while time.monotonic() < deadline:
            if worker.proc.poll() is not None:
                log(f"the worker exited ({worker.proc.returncode}); starting it again\n"
                    f"{worker.tail()}")
                worker.start()
            try:
                now = probe.lag()
            except Exception as exc:  # a probe lost is not a result lost
                log(f"lag probe failed: {exc!r}")
                time.sleep(2)
                continue
            lag = {t: now[t]["lag"] for t in inputs}
            bar.update(sum(now[t]["committed"] for t in inputs) - bar.n)
            if not any(lag.values()):
                break
            time.sleep(2)
    return lag


def account(cfg, records, outcomes, where, letters, want, store_problems) -> dict:
    """Every event's fate, found by identity (see the module docstring)."""
    from pipeline_check import late_events, letter_element, window_samples

    from ppm.clock import to_us
    from ppm.events import BehaviorEvent, DeadLetter, ItemEvent
    from streams.training_log import sample_id_of

    record_at = {f"{topic}:{partition}:{offset}": n
                 for n, (topic, partition, offset) in enumerate(where)}
    expected_dead = {(n, i): e for n, o in enumerate(outcomes) for i, e in enumerate(o)
                     if isinstance(e, DeadLetter)}
    admitted = {(n, i): e for n, o in enumerate(outcomes) for i, e in enumerate(o)
                if not isinstance(e, DeadLetter)}

    # Dead letters: each names one event of one published record.
    found: Counter[tuple[int, int]] = Counter()
    unmapped = mismatched = 0
    for letter in letters:
        record, element = letter_element(letter["source"])
        n = record_at.get(record)
        if n is None or not letter.get("reason"):
            unmapped += 1
            continue
        key = (n, element)
        if letter.get("stage") == "process":
            ok = isinstance(admitted.get(key), ItemEvent)
        else:
            ok = key in expected_dead and (
                letter.get("payload_sha256") == expected_dead[key].payload_sha256)
        if not ok:
            mismatched += 1
            continue
        found[key] += 1

    # Samples: the union of the worker's windows.
    rows = window_samples(cfg.data_dir)
    counts = Counter(sample for sample, *_ in rows)
    labels = {sample: tuple(labels) for sample, *labels in rows}
    impressions = {sample_id_of(e.request_id, e.item_id, to_us(e.event_time))
                   for e in admitted.values()
                   if isinstance(e, BehaviorEvent) and e.action.value == "impression"}
    labelled = {(sample.rsplit(":", 2)[0], sample.rsplit(":", 2)[1], action)
                for sample, bits in labels.items()
                for action, bit in zip(("click", "order", "collect"), bits, strict=True) if bit}
    late = Counter(late_events(cfg.data_dir))
    troubled_items = {p.split()[1] for p in store_problems if p.startswith("item ")}

    def applied(e) -> bool:
        if isinstance(e, ItemEvent):
            return e.item_id not in troubled_items
        if e.action.value == "impression":
            return counts[sample_id_of(e.request_id, e.item_id, to_us(e.event_time))] >= 1
        return ((e.request_id, e.item_id, e.action.value) in labelled
                or late[e.to_json().decode()] > 0)

    fates = Counter()
    for key in [*expected_dead, *admitted]:
        if found[key]:
            fates["dead"] += 1
        elif key in admitted and applied(admitted[key]):
            fates["applied"] += 1
        else:
            fates["lost"] += 1
    stages = Counter(letter.get("stage", "?") for letter in letters)
    return {
        "events": len(expected_dead) + len(admitted),
        "applied": fates["applied"],
        "dead_letters": fates["dead"],
        "lost": fates["lost"],
        "duplicated_samples": sum(n - 1 for n in counts.values() if n > 1),
        "missing_samples": len(impressions - set(counts)),
        "unexpected_samples": len(set(counts) - impressions),
        "samples": len(rows),
        "samples_without_kafka": len(want["samples"]),
        "labels_differ": sum(1 for s, bits in want["samples"].items()
                             if s in labels and labels[s] != bits),
        "late_events": sum(late.values()),
        "late_events_without_kafka": sum(want["late"].values()),
        "dead_letters_on_topics": len(letters),
        "dead_letters_by_stage": dict(stages),
        "duplicate_dead_letters": sum(n - 1 for n in found.values() if n > 1),
        "unmapped_dead_letters": unmapped,
        "mismatched_dead_letters": mismatched,
        "expected_dead_letters_missing": sum(1 for k in expected_dead if not found[k]),
        "store_differences": len(store_problems),
        "store_difference_examples": store_problems[:5],
    }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
