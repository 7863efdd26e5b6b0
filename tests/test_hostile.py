"""Hostile records (streams/sources/hostile.py): every case, its fate, and a local run that accounts
for every event by identity."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ppm.clock import to_us
from ppm.config import Config, SimulatorConfig
from ppm.data_dir import DataDir, TrainingLogDir
from ppm.events import BehaviorEvent, DeadLetter, ItemEvent
from streams.intake import Intake
from streams.sequence_builder import SequenceBuilder
from streams.sources.hostile import (
    HOSTILE_CASES,
    OVERSIZED,
    MixedRecord,
    hostile_mix,
    labelled_mix,
    write_jsonl,
)
from streams.sources.shop_simulator import ShopSimulator
from streams.training_log import TrainingLogWriter, sample_id_of

WORLD = SimulatorConfig(seed=11, days=0.5, n_users=60, initial_items=20, items_per_day=50,
                        malformed_share=0.02)
Outcome = list[ItemEvent | BehaviorEvent | DeadLetter]


@pytest.fixture(scope="module")
def world() -> list[tuple[str, bytes]]:
    return list(ShopSimulator(WORLD).records())


@pytest.fixture(scope="module")
def mix(world) -> list[MixedRecord]:
    return labelled_mix(world, seed=3)


def admit(records: list[tuple[str, bytes]], cfg: Config | None = None) -> list[Outcome]:
    """What the Intake makes of each record; sources named as the local runner names them."""
    gate = Intake(cfg or Config())
    return [gate.admit(kind, raw, f"{kind}:{n}") for n, (kind, raw) in enumerate(records)]


def fate(outcome: Outcome) -> str:
    dead = [isinstance(e, DeadLetter) for e in outcome]
    return "dead" if all(dead) else "applied" if not any(dead) else "split"


def sample_id(event: BehaviorEvent) -> str:
    return sample_id_of(event.request_id, event.item_id, to_us(event.event_time))


# ---------------------------------------------------------------- the mix


def test_every_case_appears_with_the_fate_it_declares(mix):
    assert {m.case for m in mix if m.case} == {c.name for c in HOSTILE_CASES}
    outcomes = admit([(m.kind, m.raw) for m in mix])
    wrong = [(m.case, m.fate, fate(o), [getattr(e, "reason", "") for e in o][:3])
             for m, o in zip(mix, outcomes, strict=True)
             if m.case and fate(o) != m.fate]
    assert wrong == []
    assert {fate(o) for m, o in zip(mix, outcomes, strict=True) if m.case} == {
        "dead", "applied", "split"}


def test_hostile_records_change_no_valid_records_fate(world, mix):
    # A hostile behavior must not move the behavior clock (nor a hostile item the item
    # clock) so that a valid record of the world becomes a dead letter, or the reverse.
    alone = [fate(o) for o in admit(world)]
    outcomes = admit([(m.kind, m.raw) for m in mix])
    mixed = [fate(o) for m, o in zip(mix, outcomes, strict=True) if m.case is None]
    assert mixed == alone


def test_a_behavior_at_the_wall_clock_is_never_too_far_ahead():
    gate = Intake(Config())
    now = datetime.now(UTC)
    for when in (now - timedelta(days=2), now):  # a shop quiet for two days
        page = {"kind": "behavior", "user_id": "u1", "item_id": "i1", "action": "impression",
                "request_id": f"r{when.day}", "event_time": when.isoformat()}
        [event] = gate.admit("behavior", json.dumps(page).encode(), "behaviors:0:0")
        assert isinstance(event, BehaviorEvent), event.reason


def test_a_mix_is_a_function_of_its_arguments(world, mix):
    assert labelled_mix(world, seed=3) == mix
    assert hostile_mix(world, seed=3) == [(m.kind, m.raw) for m in mix]
    assert hostile_mix(world, seed=4) != hostile_mix(world, seed=3)
    assert [(m.kind, m.raw) for m in mix if m.case is None] == world  # input kept, in order
    assert labelled_mix(world, seed=3, share=0.0) == [MixedRecord(k, r, None, None)
                                                      for k, r in world]
    with pytest.raises(ValueError, match="share"):
        labelled_mix(world, seed=3, share=1.0)


def test_share_is_the_share_of_hostile_case_instances(world):
    big = world * 20  # times repeat; the count is what is checked here
    records = Counter(m.case for m in labelled_mix(big, seed=1, share=0.2) if m.case)
    # future_item makes four records per instance, every other case one.
    assert records["future_item"] % 4 == 0
    assert sum(records.values()) - records["future_item"] * 3 // 4 == round(len(big) * 0.2 / 0.8)
    assert records[OVERSIZED] == 1


def test_records_are_as_small_or_as_large_as_promised(mix):
    cfg = Config()
    for m in mix:
        if m.case and m.case.startswith("image_bomb_"):
            assert len(m.raw) < 2_000  # a few hundred bytes claiming billions of pixels
    [big] = [m for m in mix if m.case == OVERSIZED]
    assert cfg.contracts.max_payload_bytes - 3 < len(big.raw) <= cfg.contracts.max_payload_bytes
    [letter] = Intake(cfg).admit("item", big.raw, "items:0:0")
    assert isinstance(letter, DeadLetter)
    assert len(letter.to_json()) > 2 * len(big.raw)  # escaping doubles it again
    assert len(letter.capped(cfg.kafka.dead_letter_max_bytes).to_json()) <= (
        cfg.kafka.dead_letter_max_bytes)


def test_the_mix_writes_as_jsonl(tmp_path, mix):
    counts = write_jsonl([(m.kind, m.raw) for m in mix], tmp_path)
    assert counts == Counter(m.kind for m in mix)
    lines = (tmp_path / "behaviors.jsonl").read_bytes().split(b"\n")[:-1]
    assert lines == [m.raw for m in mix if m.kind == "behavior"]
    with pytest.raises(ValueError, match="newline"):
        write_jsonl([("item", b"{}\n{}")], tmp_path)


# ---------------------------------------------------------------- a local run, by identity


def expected_windows(records: list[tuple[str, bytes]], out: Path) -> dict[str, tuple]:
    """sample_id -> (click, order, collect) of the same records without an encoder: Intake,
    SequenceBuilder and TrainingLogWriter alone (labels do not depend on items)."""
    class Sink:
        def write_sequences(self, sequences):
            pass

    builder = SequenceBuilder(Sink())
    writer = TrainingLogWriter(out, sequences=builder, items={})
    behaviors = [e for o in admit(records) for e in o if isinstance(e, BehaviorEvent)]
    builder.process(behaviors)
    writer.process(behaviors)
    writer.close_all()
    return dict(windows(out))


def windows(training: Path) -> list[tuple[str, tuple]]:
    """(sample_id, (click, order, collect)) of every window file ``training/windows/``'s
    manifest lists."""
    files = TrainingLogDir(training)
    folder = files.windows
    rows = []
    for entry in json.loads(files.manifest.read_text()):
        table = pq.read_table(folder / entry["path"],
                              columns=["sample_id", "click", "order", "collect"]).to_pylist()
        rows += [(r["sample_id"], (r["click"], r["order"], r["collect"])) for r in table]
    return rows


def check_accounting(records: list[tuple[str, bytes]], data_dir: Path, tmp: Path) -> dict:
    """Every event of ``records`` is applied or has exactly one dead letter that names it;
    every valid impression's sample is in the windows exactly once, with its labels."""
    outcomes = admit(records)
    expected_dead = {(n, i): e for n, o in enumerate(outcomes) for i, e in enumerate(o)
                     if isinstance(e, DeadLetter)}
    admitted = {(n, i): e for n, o in enumerate(outcomes) for i, e in enumerate(o)
                if not isinstance(e, DeadLetter)}

    letters = [json.loads(line) for line in
               DataDir(data_dir).dead_letters.read_text().splitlines()]
    keys: Counter[tuple[int, int]] = Counter()
    decoded: set[tuple[int, int]] = set()
    for letter in letters:
        record, _, element = letter["source"].partition("[")
        kind, _, position = record.partition(":")
        n, i = int(position), int(element.rstrip("]") or 0)
        assert records[n][0] == kind and letter["reason"], letter["source"]
        keys[n, i] += 1
        if letter["stage"] == "decode":
            assert letter["payload_sha256"] == expected_dead[n, i].payload_sha256
            decoded.add((n, i))
        else:  # an event that failed in a processor: admitted, and an item
            assert letter["stage"] == "process" and isinstance(admitted[n, i], ItemEvent)
    assert max(keys.values()) == 1  # one letter per event
    assert decoded == set(expected_dead)
    processed = set(keys) - decoded
    applied = len(admitted) - len(processed)
    assert applied + len(letters) == sum(len(o) for o in outcomes)

    got = windows(DataDir(data_dir).training)
    counts = Counter(s for s, _ in got)
    assert max(counts.values()) == 1  # no sample twice
    impressions = {sample_id(e) for e in admitted.values()
                   if isinstance(e, BehaviorEvent) and e.action.value == "impression"}
    assert set(counts) == impressions  # none missing, none made up
    assert dict(got) == expected_windows(records, DataDir(tmp / "expected").training)
    return {"events": sum(len(o) for o in outcomes), "applied": applied,
            "dead_letters": len(letters), "processed": processed}


def jsonl_of(mix: list[MixedRecord], folder: Path) -> list[tuple[str, bytes]]:
    """The mix as ``ppm stream --jsonl`` reads it back (merged by event time)."""
    from streams.local_runner import jsonl_records

    write_jsonl([(m.kind, m.raw) for m in mix], folder)
    records = list(jsonl_records(folder))
    assert Counter(records) == Counter((m.kind, m.raw) for m in mix)
    return records


@pytest.mark.slow
def test_ppm_stream_on_the_hostile_jsonl_exits_0_with_the_same_accounting(tmp_path, mix,
                                                                          monkeypatch, capsys):
    from ppm.cli.commands import main

    records = jsonl_of(mix, tmp_path / "jsonl")
    monkeypatch.setenv("PPM__PIPELINE__ITEM_BATCH_WAIT_S", "1e9")  # as below: fewer batches
    data = tmp_path / "data"
    assert main(["--data-dir", str(data), "stream", "--jsonl", str(tmp_path / "jsonl")]) == 0
    fates = check_accounting(records, data, tmp_path)
    summary = json.loads(DataDir(data).summary.read_text())
    assert summary["finished"] and summary["dead_letters"] == fates["dead_letters"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("source", [
    "list",
    "jsonl",
])
def test_the_local_runner_accounts_for_every_event(tmp_path, mix, item_encoder, source, cfg):
    from streams.local_runner import LocalRunner

    records = ([(m.kind, m.raw) for m in mix] if source == "list"
               else jsonl_of(mix, tmp_path / "jsonl"))
    # Item batches closed by size alone: a few encoder calls instead of one per item (the
    # catalog's first items are hours apart in event time).
    cfg.pipeline.item_batch_wait_s = 1e9
    runner = LocalRunner(cfg, encoder=item_encoder, resume=False)
    summary = runner.run(records, source, progress=False)
    assert summary.finished and summary.records == len(records)

    fates = check_accounting(records, cfg.data_dir, tmp_path)
    assert summary.dead_letters == fates["dead_letters"]
    assert fates["processed"] == set()  # no hostile item breaks the encoder

    # The far-future item did not block its update and delete; refused photos are warnings.
    store = runner.embedder.state
    futures = [m for m in mix if m.case == "future_item"]
    for create, _, _, delete in zip(*[iter(futures)] * 4, strict=True):
        item_id = json.loads(create.raw)["item_id"]
        assert store[item_id].deleted
        assert store[item_id].updated_us == to_us(
            ItemEvent.model_validate_json(delete.raw).event_time)
    warned = {json.loads(line)["item_id"]: json.loads(line)["reason"] for line in
              cfg.paths.item_warnings.read_text().splitlines()}
    for m in mix:
        if m.case in ("image_proc_environ", "image_loopback"):
            item_id = json.loads(m.raw)["item_id"]
            assert item_id in warned and store[item_id].encoder_version is not None
