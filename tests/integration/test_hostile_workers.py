"""Two workers of one group, one SIGKILLed mid-stream, hostile records in both topics:
every published event is applied or a dead letter with its reason, the windows hold exactly
the samples of the valid impressions (none missing, none twice), and the group ends with
nothing uncommitted. Checked by identity (``identity_check``), not by the final state."""

from __future__ import annotations

import pytest

from streams.sources.hostile import HOSTILE_CASES, labelled_mix
from tests.servers import FaustWorker, Servers

from .identity_check import Expected, letter_problems, sample_problems, wait_for_zero_lag
from .pipeline_check import Scenario, dead_letters, wait_until_complete, world_records
from .test_faust_worker import wait_for_progress

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_workers_one_killed_hostile_records_nothing_lost_nothing_twice(servers: Servers,
                                                                            tmp_path):
    scenario = Scenario.create("hostile", servers.kafka_bootstrap, servers.redis_url, tmp_path)
    mixed = labelled_mix(world_records(seed=25, initial_items=800, users=800, days=0.5),
                         seed=25, share=0.03)
    records = [(m.kind, m.raw) for m in mixed]
    cases = {m.case for m in mixed if m.case}
    assert {c.name for c in HOSTILE_CASES} <= cases, "every hostile case is in the stream"
    first = FaustWorker(scenario.env, tmp_path / "worker-first.log").start()
    second = FaustWorker(scenario.env, tmp_path / "worker-second.log").start()
    try:
        scenario.publish(records, events_per_record=10)
        got = wait_for_progress(scenario, 0.2)
        assert got < 1.0, "the workers finished before the kill: make the stream longer"
        first.kill()  # its partitions move to the second worker, which replays them
        wait_until_complete(scenario, second)
        lag = wait_for_zero_lag(scenario.cfg)
        letters = dead_letters(scenario.cfg)
        assert second.proc.poll() is None, second.tail()  # it never stopped on an error
        assert "stopping the worker" not in second.tail(10_000_000)
    finally:
        first.stop()
        second.stop()
    want = Expected(scenario.cfg, records)
    assert sample_problems(want, scenario.cfg.data_dir) == []
    problems = letter_problems(want, letters)
    assert problems == [], "\n".join(problems)
    assert lag == {scenario.cfg.kafka.items_topic: 0, scenario.cfg.kafka.behaviors_topic: 0}
    assert sum(want.letters.values()) <= len(letters)  # replays may repeat a letter
    assert {"decode", "process"} >= {letter.get("stage") for letter in letters}
