"""Checks by identity for the distributed path: which samples the training windows hold,
which dead letters the topics hold, and what the consumer group has committed, each
compared with what the same records make without Kafka.

The final online state cannot show a loss or a duplicate (writes are idempotent); these can.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

from ppm.clock import to_us
from ppm.config import Config
from ppm.events import BehaviorEvent, DeadLetter
from streams.intake import Intake
from streams.training_log import sample_id_of

from .pipeline_check import window_samples


def letter_key(letter: dict | DeadLetter) -> str:
    """What identifies a dead letter's record whatever carried it: the payload as canonical
    JSON when it is JSON (a packed element is re-serialised), else the sha256 of the whole
    record (a capped letter keeps it; its payload is only a prefix)."""
    if isinstance(letter, DeadLetter):
        letter = json.loads(letter.to_json())
    if not letter.get("payload_truncated") and letter.get("payload_encoding") != "base64":
        try:
            return "json:" + json.dumps(json.loads(letter["payload"]), sort_keys=True)
        except (ValueError, RecursionError):  # not JSON, or too deep to compare as JSON
            pass
    if letter.get("payload_sha256"):
        return "sha256:" + letter["payload_sha256"]
    return "sha256:" + hashlib.sha256(letter["payload"].encode("utf-8", "surrogatepass")
                                      ).hexdigest()


class Expected:
    """What the records make, by identity: the impressions' sample ids, the dead letters'
    keys (:func:`letter_key`), and the number of events admitted."""

    def __init__(self, cfg: Config, records: list[tuple[str, bytes]]):
        intake = Intake(cfg)
        self.sample_ids: set[str] = set()
        self.letters: Counter[str] = Counter()
        self.events = 0
        for i, (kind, raw) in enumerate(records):
            for event in intake.admit(kind, raw, f"{kind}:{i}"):
                self.events += 1
                if isinstance(event, DeadLetter):  # as the worker sends it: capped
                    self.letters[letter_key(event.capped(cfg.kafka.dead_letter_max_bytes))] += 1
                elif isinstance(event, BehaviorEvent) and event.action.value == "impression":
                    self.sample_ids.add(sample_id_of(event.request_id, event.item_id,
                                                     to_us(event.event_time)))


def window_sample_ids(data_dir: Path) -> Counter[str]:
    """Every sample id in every recorded window file (local runner's and every partition's),
    with how often it occurs."""
    return Counter(sample for sample, *_ in window_samples(data_dir))


def sample_problems(want: Expected, data_dir: Path) -> list[str]:
    """Samples missing from the windows, samples written twice, samples never sent."""
    got = window_sample_ids(data_dir)
    problems = [f"missing sample {s}" for s in sorted(want.sample_ids - set(got))]
    problems += [f"sample {s} written {n} times" for s, n in got.items() if n > 1]
    problems += [f"unexpected sample {s}" for s in sorted(set(got) - want.sample_ids)]
    return problems


def letter_problems(want: Expected, letters: list[dict]) -> list[str]:
    """Dead letters missing from the topics, or there but never expected; and letters
    without a reason. A letter may be there more than once: a record replayed after a
    crash or a rebalance is dead-lettered again (at least once)."""
    got = Counter(letter_key(letter) for letter in letters)
    problems = [f"dead letter missing: {k[:120]}" for k in want.letters
                if got[k] < want.letters[k]]
    problems += [f"dead letter not expected: {k[:120]}" for k in got if k not in want.letters]
    problems += [f"dead letter without reason from {x['source']}" for x in letters
                 if not x.get("reason")]
    return problems


def committed_lag(cfg: Config) -> dict[str, int]:
    """Per input topic: end offset minus what the worker's group has committed."""
    from streams.topics import LagProbe

    with LagProbe(cfg.kafka) as probe:
        lag = probe.lag()
    return {t: lag[t]["lag"] for t in (cfg.kafka.items_topic, cfg.kafka.behaviors_topic)}


def wait_for_zero_lag(cfg: Config, timeout_s: float = 180) -> dict[str, int]:
    """Wait until the group has committed every record of both input topics."""
    deadline = time.monotonic() + timeout_s
    while True:
        lag = committed_lag(cfg)
        if not any(lag.values()) or time.monotonic() > deadline:
            return lag
        time.sleep(1)


def assert_nothing_lost(scenario) -> None:
    """After a scenario's stream: the group has committed everything, and the windows hold
    every valid impression's sample exactly once (``scenario.published`` by identity)."""
    cfg = scenario.cfg
    lag = wait_for_zero_lag(cfg)
    assert lag == {cfg.kafka.items_topic: 0, cfg.kafka.behaviors_topic: 0}, lag
    problems = sample_problems(Expected(cfg, scenario.published), cfg.data_dir)
    assert problems == [], f"{len(problems)} problems, e.g. {problems[:5]}"
