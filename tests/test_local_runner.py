"""The local runner on the real Feast SQLite store: restart safety, dead letters, pacing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from ppm.config import Config, SimulatorConfig
from ppm.data_dir import DataDir
from ppm.events import Action, BehaviorEvent
from streams.freshness import read_freshness, read_freshness_items
from streams.local_runner import LocalRunner, _Pacer, jsonl_records
from streams.sources.shop_simulator import ShopSimulator

pytestmark = pytest.mark.slow
WORLD = SimulatorConfig(seed=5, days=1.0, n_users=150, initial_items=60, items_per_day=80,
                        malformed_share=0.01)


def run_cfg(path: Path, **pipeline) -> Config:
    return Config(data_dir=path, pipeline=pipeline)


def samples(data_dir: Path) -> list[dict]:
    files = sorted(DataDir(data_dir).training_log.windows.glob("*.parquet"))
    table = ds.dataset(files, format="parquet").to_table(
        columns=["sample_id", "click", "order", "collect", "item_encoder_version"])
    return table.to_pylist()


@pytest.fixture(scope="module")
def straight(tmp_path_factory, item_encoder) -> tuple[Path, dict]:
    """One uninterrupted run: the reference."""
    path = tmp_path_factory.mktemp("straight")
    summary = LocalRunner(run_cfg(path), encoder=item_encoder, resume=False).run(
        ShopSimulator(WORLD).records(), "world", progress=False)
    return path, summary.__dict__


def test_straight_run_logs_every_impression_once(straight):
    path, summary = straight
    rows = samples(path)
    ids = Counter(r["sample_id"] for r in rows)
    assert ids and max(ids.values()) == 1
    assert len(rows) == summary["training_log"]["impressions"]
    assert summary["finished"] and summary["records"] == (
        summary["item_events"] + summary["behavior_events"] + summary["dead_letters"])
    dead = DataDir(path).dead_letters.read_text().splitlines()
    assert len(dead) == summary["dead_letters"] > 0
    assert all(json.loads(d)["reason"] and json.loads(d)["source"] for d in dead)


def test_stop_and_resume_loses_nothing_and_duplicates_nothing(tmp_path, straight, item_encoder):
    reference = samples(straight[0])
    half = straight[1]["records"] // 2
    cfg = run_cfg(tmp_path, checkpoint_every=300)
    first = LocalRunner(cfg, encoder=item_encoder, resume=False)
    part = first.run(ShopSimulator(WORLD).records(), "world", progress=False, stop_after=half)
    assert part.records == half and not part.finished
    resumed = LocalRunner(cfg, encoder=item_encoder)
    assert resumed.summary.records == half
    done = resumed.run(ShopSimulator(WORLD).records(), "world", progress=False)
    assert done.finished and done.resumed_from == half
    assert sorted(samples(tmp_path), key=lambda r: r["sample_id"]) == sorted(
        reference, key=lambda r: r["sample_id"])
    assert done.dead_letters == straight[1]["dead_letters"]
    assert len(DataDir(tmp_path).dead_letters.read_text().splitlines()) == done.dead_letters


def test_resuming_another_source_is_refused(tmp_path, item_encoder):
    cfg = run_cfg(tmp_path)
    LocalRunner(cfg, encoder=item_encoder, resume=False).run(
        ShopSimulator(WORLD).records(), "world", progress=False, stop_after=100)
    with pytest.raises(ValueError, match="checkpoint"):
        LocalRunner(cfg, encoder=item_encoder).run(iter(()), "another", progress=False)


def test_sigkill_mid_stream_then_restart(tmp_path, straight):
    """A real kill -9 of `ppm stream`, at a random moment after the first checkpoint."""
    env = {**os.environ, "PPM__PIPELINE__CHECKPOINT_EVERY": "200", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ppm.cli", "--data-dir", str(tmp_path), "stream", "--simulate",
           "--days", "1", "--seed", "5", "--users", "150", "--malformed-share", "0.01",
           "--quiet"]
    world_env = {"PPM__SIMULATOR__INITIAL_ITEMS": "60", "PPM__SIMULATOR__ITEMS_PER_DAY": "80"}
    proc = subprocess.Popen(cmd, env=env | world_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not DataDir(tmp_path).checkpoint.exists() and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere after a checkpoint, in the middle of work
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The checkpoint is what a restart resumes from; summary.json, its readable twin, is
    # written after it, so a kill between the two leaves it one checkpoint behind.
    killed_at = json.loads(DataDir(tmp_path).checkpoint.read_text())["summary"]["records"]
    assert killed_at > 0
    done = subprocess.run(cmd, env=env | world_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["finished"] and summary["resumed_from"] == killed_at
    got = samples(tmp_path)
    assert len(got) == len({r["sample_id"] for r in got})  # no duplicates
    assert sorted(r["sample_id"] for r in got) == sorted(
        r["sample_id"] for r in samples(straight[0]))  # nothing lost


def test_a_timestamp_far_ahead_becomes_a_dead_letter(tmp_path, item_encoder):
    def records():
        for kind, raw in ShopSimulator(WORLD).records():
            yield kind, raw
            if kind == "behavior" and b'"r000000003"' in raw:
                bad = json.loads(raw)
                bad["event_time"] = "2099-01-01T00:00:00Z"
                yield "behavior", json.dumps(bad).encode()

    summary = LocalRunner(run_cfg(tmp_path), encoder=item_encoder, resume=False).run(
        records(), "w", progress=False)
    reasons = [json.loads(line)["reason"]
               for line in DataDir(tmp_path).dead_letters.read_text().splitlines()]
    assert any("ahead of" in r for r in reasons)
    assert summary.windows_closed < 40  # one day of hourly windows, not decades of them


def test_jsonl_replay_matches_the_in_memory_stream(tmp_path, straight, item_encoder):
    ShopSimulator(WORLD).write_jsonl(tmp_path / "in")
    summary = LocalRunner(run_cfg(tmp_path / "out"), encoder=item_encoder, resume=False).run(
        jsonl_records(tmp_path / "in"), "jsonl", progress=False)
    assert summary.behavior_events == straight[1]["behavior_events"]
    assert summary.dead_letters == straight[1]["dead_letters"]
    assert sorted(r["sample_id"] for r in samples(tmp_path / "out")) == sorted(
        r["sample_id"] for r in samples(straight[0]))


def test_pacer_releases_events_at_n_times_real_time():
    pacer = _Pacer(speed=20.0)
    started = time.monotonic()
    for second in range(4):  # events one second apart: 3 s of event time
        pacer.wait_for(second * 1_000_000)
    assert time.monotonic() - started >= 3 / 20
    with pytest.raises(ValueError):
        _Pacer(speed=0)


def test_samples_never_see_the_future_and_freshness_is_recorded(straight):
    path, summary = straight
    files = sorted(DataDir(path).training_log.windows.glob("*.parquet"))
    table = ds.dataset(files, format="parquet").to_table(
        columns=["impression_time", "seq_times_us", "item_encoder_version"])
    for row in table.to_pylist():
        t = int(row["impression_time"].timestamp() * 1_000_000)
        assert all(s < t for s in row["seq_times_us"])
    fresh = read_freshness_items(path)  # the per-item records, appended in parts
    assert fresh.num_rows == summary["items_embedded"]
    assert read_freshness(path).count == summary["items_embedded"]  # the histogram
    assert pc.all(pc.greater_equal(fresh["readable"], fresh["arrived"])).as_py()


def test_features_cli_shows_age_and_staleness(straight, capsys):
    from ppm.cli.commands import main

    path = straight[0]
    item_id = samples(path)[-1]["sample_id"].split(":")[1]
    assert main(["--data-dir", str(path), "features", "get", "--item", item_id,
                 "--item", "nope"]) == 0
    shown = json.loads(capsys.readouterr().out)
    item = shown["items"][item_id]
    assert item["embedding_dim"] == 1664 and item["age_s"] >= 0 and not item["stale"]
    assert shown["items"]["nope"] is None
    # No age limit by default; with a freshness window, an old vector is reported stale.
    later = ["--data-dir", str(path), "features", "get", "--item", item_id,
             "--at", "2030-01-01T00:00:00+00:00"]
    assert main(later) == 0
    assert not json.loads(capsys.readouterr().out)["items"][item_id]["stale"]
    os.environ["PPM__FEATURES__FRESHNESS_WINDOW_S"] = "86400"
    try:
        assert main(later) == 0
    finally:
        del os.environ["PPM__FEATURES__FRESHNESS_WINDOW_S"]
    stale = json.loads(capsys.readouterr().out)["items"][item_id]
    assert stale["stale"] and "freshness window" in stale["stale_reason"]
    clicker = next(e.user_id for e in ShopSimulator(WORLD).events()  # the same world
                   if isinstance(e, BehaviorEvent) and e.action is Action.CLICK)
    assert main(["--data-dir", str(path), "features", "get", "--user", clicker]) == 0
    seq = json.loads(capsys.readouterr().out)["users"][clicker]
    assert seq["interactions"] >= 1 and seq["last"][0]["action"] in {"click", "order", "collect"}


def test_features_apply_registers_the_repo(tmp_path, capsys):
    from ppm.cli.commands import main

    assert main(["--data-dir", str(tmp_path), "features", "apply"]) == 0
    out = capsys.readouterr().out
    assert "item_embedding" in out and "user_sequence" in out and "ranker" in out
    assert (DataDir(tmp_path).feast_repo / "registry.db").exists()
