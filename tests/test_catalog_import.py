"""Catalog import: files in, contract-valid events out, every bad row accounted for."""

from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streams.sources.catalog_import as catalog_import
from ppm.cli.commands import main
from ppm.config import PRESETS, Config
from ppm.data_dir import DataDir
from ppm.events import MIN_EVENT_TIME, BehaviorEvent, ItemEvent, decode
from streams.local_runner import import_into_pipeline
from streams.sources.catalog_import import (
    LabelCondition,
    LabelRule,
    movielens,
    read_table,
    refuse_existing_run,
    temporal_split_time,
    write_events,
)

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
T0_S = int(T0.timestamp())


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def decoded(out: Path) -> tuple[list[ItemEvent], list[BehaviorEvent]]:
    """Every line of items.jsonl / behaviors.jsonl through the real decoder; no dead letters."""
    events = {}
    for kind in ("item", "behavior"):
        events[kind] = [decode(raw, kind, f"{kind}:{i}")
                        for i, raw in enumerate((out / f"{kind}s.jsonl").read_bytes().splitlines())]
        bad = [e for e in events[kind] if not isinstance(e, ItemEvent | BehaviorEvent)]
        assert not bad, bad[:3]
    return events["item"], events["behavior"]


def shop_items(folder: Path) -> pd.DataFrame:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "img" / "a.png").write_bytes(b"not read here")
    return pd.DataFrame({
        "item_id": ["007", "i2", "i3", "i4"],
        "title": ["Black wool coat", "Red scarf", "Blue jeans", "Green hat"],
        "text": ["Warm, long.", None, "Slim fit.", None],
        "image": ["img/a.png", "img/missing.png", "https://example.com/i3.jpg", None],
        "category": ["coat", None, "jeans", "hat"],
        "brand": ["nordvik", None, None, "acme"],
        "price": [89.9, 12.0, None, 5.0],
    })


def shop_ratings() -> pd.DataFrame:
    # ISO strings (naive = UTC, with Z, with an offset) and epoch seconds mixed, as text.
    return pd.DataFrame({
        "user_id": ["u1", "u1", "u2", "u2", "u3"],
        "item_id": ["007", "i2", "007", "i3", "i4"],
        "timestamp": [
            str(T0_S),                                      # epoch seconds
            "2024-03-01T12:05:00Z",                         # ISO, UTC
            "2024-03-01T14:10:00+02:00",                    # ISO with an offset = 12:10Z
            "2024-03-01 12:15:00",                          # naive: taken as UTC
            str(T0_S + 1200.5),                             # float epoch seconds
        ],
        "rating": ["5", "3.5", "4", "4.5", "1"],
    })


def write_both(folder: Path, name: str, frame: pd.DataFrame) -> tuple[Path, Path]:
    csv_path, parquet_path = folder / f"{name}.csv", folder / f"{name}.parquet"
    frame.to_csv(csv_path, index=False)
    frame.to_parquet(parquet_path, index=False)
    return csv_path, parquet_path


# ---------------------------------------------------------------------------- files

def test_csv_and_parquet_give_the_same_valid_sorted_events(tmp_path):
    items_csv, items_pq = write_both(tmp_path, "items", shop_items(tmp_path))
    ratings_csv, ratings_pq = write_both(tmp_path, "ratings", shop_ratings())
    a = write_events(read_table(items_csv), read_table(ratings_csv), "rating>=4:click",
                     tmp_path / "from_csv")
    b = write_events(read_table(items_pq), read_table(ratings_pq), "rating>=4:click",
                     tmp_path / "from_parquet")
    for name in ("items.jsonl", "behaviors.jsonl"):
        assert (tmp_path / "from_csv" / name).read_bytes() == (
            tmp_path / "from_parquet" / name).read_bytes()
    assert (a.items_written, a.interactions_written, a.interactions_rejected) == (4, 5, 0)
    assert a.behavior_events == b.behavior_events == {
        "impression": 5, "click": 3, "order": 0, "collect": 0}

    items, behaviors = decoded(tmp_path / "from_csv")
    for events in (items, behaviors):
        times = [e.event_time for e in events]
        assert times == sorted(times)
    by_id = {e.item_id: e for e in items}
    assert set(by_id) == {"007", "i2", "i3", "i4"}  # CSV ids keep their leading zeros
    coat = by_id["007"]
    assert (coat.title, coat.description, coat.category, coat.brand, coat.price) == (
        "Black wool coat", "Warm, long.", "coat", "nordvik", 89.9)
    assert by_id["i2"].category == "unknown" and by_id["i2"].description is None
    # Relative images resolve against the items file's folder; URLs pass through.
    assert coat.image == str(tmp_path / "img" / "a.png")
    assert by_id["i2"].image == str(tmp_path / "img" / "missing.png")
    assert by_id["i3"].image == "https://example.com/i3.jpg" and by_id["i4"].image is None
    assert a.images_missing == 1
    # Item time: 1 s before its first interaction.
    assert coat.event_time == T0 - timedelta(seconds=1)
    assert by_id["i4"].event_time == T0 + timedelta(seconds=1199.5)


def test_iso_epoch_and_parquet_timestamps_mean_the_same_instant(tmp_path):
    items = pa.table({"item_id": ["i1"], "title": ["Hat"]})
    instant = datetime(2024, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    spellings = {
        "epoch int": pa.array([T0_S]),
        "epoch float": pa.array([T0_S + 0.25]),
        "iso Z": pa.array(["2024-03-01T12:00:00.25Z"]),
        "iso offset": pa.array(["2024-03-01T07:00:00.250-05:00"]),
        "iso naive (UTC)": pa.array(["2024-03-01T12:00:00.250"]),
        "epoch text": pa.array([f"{T0_S}.25"]),
        "timestamp naive (UTC)": pa.array([instant.replace(tzinfo=None)], pa.timestamp("ms")),
        "timestamp tz": pa.array([instant], pa.timestamp("ns", tz="Europe/Berlin")),
    }
    for name, column in spellings.items():
        out = tmp_path / name.replace(" ", "_")
        inter = pa.table({"user_id": ["u1"], "item_id": ["i1"], "timestamp": column,
                          "action": ["impression"]})
        write_events(items, inter, None, out)
        (event,) = decoded(out)[1]
        expected = T0 if name == "epoch int" else instant
        assert event.event_time == expected, name


def test_read_table_refuses_other_suffixes_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_table(tmp_path / "absent.csv")
    (tmp_path / "items.json").write_text("[]")
    with pytest.raises(ValueError, match=r"\.csv or \.parquet"):
        read_table(tmp_path / "items.json")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty CSV"):
        read_table(tmp_path / "empty.csv")


# ---------------------------------------------------------------------------- columns

def test_missing_columns_are_named(tmp_path):
    items = pa.table({"item_id": ["i1"], "title": ["Hat"]})
    ratings = pa.table({"user_id": ["u1"], "item_id": ["i1"], "timestamp": [T0_S],
                        "rating": [4.0]})
    with pytest.raises(ValueError, match=r"items lack the required column\(s\) title "
                                         r"\(found: item_id, name\)"):
        write_events(pa.table({"item_id": ["i1"], "name": ["Hat"]}), ratings, "rating>=4:click",
                     tmp_path)
    with pytest.raises(ValueError, match=r"column\(s\) user_id, timestamp"):
        write_events(items, pa.table({"item_id": ["i1"], "rating": [4.0]}), "rating>=4:click",
                     tmp_path)
    with pytest.raises(ValueError, match="give a label rule such as 'rating>=4:click'"):
        write_events(items, ratings, None, tmp_path)
    with pytest.raises(ValueError, match=r"column\(s\) score"):
        write_events(items, ratings, "score>0.5:click", tmp_path)
    with pytest.raises(ValueError, match="'action' column and a label rule"):
        write_events(items, ratings.append_column("action", pa.array(["click"])),
                     "rating>=4:click", tmp_path)
    with pytest.raises(ValueError, match="both 'text' and 'description'"):
        write_events(items.append_column("text", pa.array(["a"])).append_column(
            "description", pa.array(["b"])), ratings, "rating>=4:click", tmp_path)
    semicolons = tmp_path / "items.csv"  # a spreadsheet's export in some locales
    semicolons.write_text("item_id;title\ni1;Hat\n")
    with pytest.raises(ValueError, match="its header is split by ';': save it comma-separated"):
        write_events(read_table(semicolons), ratings, "rating>=4:click", tmp_path / "out")
    assert not (tmp_path / "items.jsonl").exists()  # nothing written before the check


# ---------------------------------------------------------------------------- label rules

def test_label_rules_parse_and_print():
    rule = LabelRule.parse(" rating >= 4 : click , rating==5:COLLECT,stars<1.5e0:order")
    assert rule.conditions == (
        LabelCondition("rating", ">=", 4.0, "click"),
        LabelCondition("rating", "==", 5.0, "collect"),
        LabelCondition("stars", "<", 1.5, "order"),
    )
    assert str(rule) == "rating>=4:click,rating==5:collect,stars<1.5:order"
    assert rule.columns == ("rating", "stars")


@pytest.mark.parametrize("text", [
    "", " ", ",", "rating>=4", "rating=>4:click", "rating>=4:impression", "rating>=4:buy",
    "rating>=four:click", ">=4:click", "rating>=4:click,", "rating>=nan:click",
    "rating>=inf:click", "4rating>=4:click", "rating>=4:click:order", "rating!=4:click",
])
def test_bad_label_rules_say_what_is_wrong(text):
    with pytest.raises(ValueError, match=r"label rule|cannot parse|finite"):
        LabelRule.parse(text)


conditions = st.builds(
    LabelCondition,
    column=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True),
    op=st.sampled_from([">=", ">", "<=", "<", "=="]),
    threshold=st.floats(allow_nan=False, allow_infinity=False, width=64),
    action=st.sampled_from(["click", "order", "collect"]),
)


@given(st.lists(conditions, min_size=1, max_size=4))
def test_printed_rules_parse_back_to_themselves(parts):
    rule = LabelRule(tuple(parts))
    assert LabelRule.parse(str(rule)) == rule


@given(st.text(max_size=40))
def test_any_text_parses_or_raises_value_error(text):
    try:
        rule = LabelRule.parse(text)
    except ValueError as exc:
        assert str(exc)
    else:
        assert LabelRule.parse(str(rule)) == rule


def test_rated_rows_become_an_impression_and_matching_follow_ups(tmp_path):
    items = pa.table({"item_id": ["i1"], "title": ["Hat"]})
    ratings = pa.table({"user_id": ["u1", "u1", "u2"], "item_id": ["i1"] * 3,
                        "timestamp": [T0_S, T0_S + 60, T0_S], "rating": [5.0, 3.0, 4.0]})
    summary = write_events(items, ratings, "rating>=4:click,rating>=5:collect", tmp_path)
    events = decoded(tmp_path)[1]
    got = [(e.user_id, e.action.value, e.event_time - T0, e.request_id) for e in events]
    us = timedelta(microseconds=1)
    r1, r2 = f"u1@{T0_S * 10**6}", f"u2@{T0_S * 10**6}"
    assert got == [
        ("u1", "impression", 0 * us, r1), ("u2", "impression", 0 * us, r2),
        ("u1", "click", us, r1), ("u1", "collect", us, r1), ("u2", "click", us, r2),
        ("u1", "impression", timedelta(seconds=60), f"u1@{(T0_S + 60) * 10**6}"),
    ]
    assert summary.behavior_events == {"impression": 3, "click": 2, "order": 0, "collect": 1}


def test_action_rows_pass_through_and_follow_ups_inherit_the_request(tmp_path):
    items = pa.table({"item_id": ["i1", "i2"], "title": ["Hat", "Cap"]})
    inter = pa.table({
        "user_id": ["u1", "u1", "u1", "u2"],
        "item_id": ["i1", "i2", "i1", "i2"],
        "timestamp": [T0_S, T0_S, T0_S + 30, T0_S + 40],
        "action": ["impression", "IMPRESSION", "Click", "order"],
        "position": [0, 1, None, None],
        "query": ["hat", "hat", None, None],
    })
    write_events(items, inter, None, tmp_path)
    events = decoded(tmp_path)[1]
    assert [e.action.value for e in events] == ["impression", "impression", "click", "order"]
    assert [e.position for e in events] == [0, 1, None, None]
    assert events[2].request_id == events[0].request_id == f"u1@{T0_S * 10**6}"
    # An order with no impression before it keeps its own request (the training log will
    # call it unmatched: users should include impressions).
    assert events[3].request_id == f"u2@{(T0_S + 40) * 10**6}"


def test_item_times_created_at_first_interaction_or_rejected(tmp_path):
    items = pa.table({
        "item_id": ["dated", "rated", "lonely", "old"],
        "title": ["A", "B", "C", "D"],
        "created_at": ["2024-01-01T00:00:00Z", None, None, "1985-05-05"],
    })
    inter = pa.table({"user_id": ["u1", "u1", "u1"], "item_id": ["dated", "rated", "old"],
                      "timestamp": [T0_S, T0_S + 10, T0_S], "action": ["impression"] * 3})
    summary = write_events(items, inter, None, tmp_path)
    times = {e.item_id: e.event_time for e in decoded(tmp_path)[0]}
    assert times == {"dated": datetime(2024, 1, 1, tzinfo=UTC),
                     "rated": T0 + timedelta(seconds=9), "old": MIN_EVENT_TIME}
    assert summary.items_dated_at_min == 1
    (rejected,) = lines(tmp_path / "rejected.jsonl")
    assert rejected["record"]["item_id"] == "lonely"
    assert "no created_at and no interaction" in rejected["reason"]


# ---------------------------------------------------------------------------- bad rows

def test_bad_rows_go_to_rejected_jsonl_with_reasons_and_counts_add_up(tmp_path):
    items = pd.DataFrame({
        "item_id": ["i1", "i2", "i1", None, "i5", "i6", "bad\x01id", "i8"],
        "title": ["Hat", "  ", "Hat again", "No id", "Cap", "Bag", "Ctl", "Big"],
        "price": ["1.5", "2", "3", "4", "abc", "-1", "1", "1"],
        "description": [None, None, None, None, None, None, None, "x" * 10_001],
    })
    ratings = pd.DataFrame({
        "user_id": ["u1", None, "u1", "u1", "u1", "u1", "u1", "u1", "u\n1", "u1"],
        "item_id": ["i1", "i1", "nope", "i5", "i1", "i1", "i1", "i1", "i1", "i1"],
        "timestamp": [str(T0_S), str(T0_S), str(T0_S), str(T0_S), "yesterday", "1989-12-31",
                      str(T0_S * 1000), str(T0_S), str(T0_S), None],
        "rating": ["4", "4", "4", "4", "4", "4", "4", "NaN?", "4", "4"],
    })
    items_csv, _ = write_both(tmp_path, "items", items)
    ratings_csv, _ = write_both(tmp_path, "ratings", ratings)
    summary = write_events(read_table(items_csv), read_table(ratings_csv), "rating>=4:click",
                           tmp_path / "out")
    rejected = lines(tmp_path / "out" / "rejected.jsonl")
    reasons = {(r["source"], r["row"]): r["reason"] for r in rejected}
    expected = {
        ("items", 1): "title: missing or blank",
        ("items", 2): "item_id: 'i1' repeats an earlier row",
        ("items", 3): "item_id: missing",
        ("items", 4): "price: not a number",
        ("items", 5): "price: Input should be greater than or equal to 0",
        ("items", 6): "item_id: String should match pattern",
        ("items", 7): "description: String should have at most 10000 characters",
        ("interactions", 1): "user_id: missing",
        ("interactions", 2): "item_id: not in the catalog",
        ("interactions", 3): "item_id: its catalog row was rejected",
        ("interactions", 4): "timestamp: not a time",
        ("interactions", 5): "is before 1990-01-01",
        ("interactions", 6): "(epoch milliseconds?",
        ("interactions", 7): "rating: missing or not a number",
        ("interactions", 8): "user_id: contains a control character",
        ("interactions", 9): "timestamp: missing",
    }
    assert set(reasons) == set(expected)
    for key, text in expected.items():
        assert text in reasons[key], (key, reasons[key])
    assert rejected[0]["record"] == {"item_id": "i2", "title": "  ", "price": "2",
                                     "description": None}
    assert (summary.items_read, summary.items_written, summary.items_rejected) == (8, 1, 7)
    assert (summary.interactions_read, summary.interactions_written,
            summary.interactions_rejected) == (10, 1, 9)
    assert sum(summary.rejected_by_field.values()) == len(rejected) == 16
    assert summary.rejected_by_field["interactions.timestamp"] == 4
    items_out, behaviors_out = decoded(tmp_path / "out")
    assert [e.item_id for e in items_out] == ["i1"] and len(behaviors_out) == 2


# Cells a careless export might hold, for every column.
junk = st.one_of(st.none(), st.text(max_size=6), st.sampled_from(
    ["i1", "i2", "u1", "4", "2.5", "1e400", "-3", "NaN", "2024-03-01T12:00:00Z",
     "2024-13-01", str(T0_S), "impression", "click", "view", "\x00"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(junk, junk, junk), min_size=1, max_size=6),
       st.lists(st.tuples(junk, junk, junk, junk), min_size=1, max_size=12))
def test_any_rows_are_written_or_rejected_never_lost(item_rows, rows):
    items = pa.table({"item_id": [r[0] for r in item_rows], "title": [r[1] for r in item_rows],
                      "created_at": [r[2] for r in item_rows]}, schema=pa.schema(
        [("item_id", pa.string()), ("title", pa.string()), ("created_at", pa.string())]))
    inter = pa.table({name: [r[k] for r in rows] for k, name in
                      enumerate(["user_id", "item_id", "timestamp", "action"])},
                     schema=pa.schema([(n, pa.string()) for n in
                                       ("user_id", "item_id", "timestamp", "action")]))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        s = write_events(items, inter, None, out)
        assert s.items_written + s.items_rejected == len(item_rows)
        assert s.interactions_written + s.interactions_rejected == len(rows)
        assert len(lines(out / "rejected.jsonl")) == s.items_rejected + s.interactions_rejected
        items_out, behaviors_out = decoded(out)
        assert len(items_out) == s.items_written and len(behaviors_out) == s.interactions_written


# ---------------------------------------------------------------------------- the output folder

def tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` (hidden ones too): file -> its bytes, folder -> None."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def small_import() -> tuple[pa.Table, pa.Table]:
    items = pa.table({"item_id": ["i1", "i2"], "title": ["Hat", "Cap"]})
    inter = pa.table({"user_id": ["u1", "u2"], "item_id": ["i1", "i2"],
                      "timestamp": [T0_S, T0_S + 60], "action": ["impression"] * 2})
    return items, inter


@pytest.mark.parametrize("run_file", [lambda paths: paths.checkpoint,
                                      lambda paths: paths.training_log.manifest],
                         ids=["checkpoint", "training_manifest"])
def test_ppm_import_into_a_folder_holding_a_run_refuses_and_touches_nothing(tmp_path, run_file,
                                                                            capsys):
    items_csv, _ = write_both(tmp_path, "items", shop_items(tmp_path))
    ratings_csv, _ = write_both(tmp_path, "ratings", shop_ratings())
    data = tmp_path / "data"
    paths = DataDir(data)
    write_events(*small_import(), None, paths.import_events)  # an earlier import's events
    run_path = run_file(paths)
    run_path.parent.mkdir(parents=True, exist_ok=True)
    run_path.write_bytes(b"a run")
    before = tree(data)

    assert main(["--data-dir", str(data), "import", "--items", str(items_csv), "--interactions",
                 str(ratings_csv), "--label-rule", "rating>=4:click", "--quiet"]) == 1
    assert f"already holds a run ({run_path.relative_to(data)})" in capsys.readouterr().err
    assert tree(data) == before  # byte for byte, and no temporary folder either
    with pytest.raises(FileExistsError):
        refuse_existing_run(data)


MS = T0_S * 1000  # epoch milliseconds, given where seconds are meant


@pytest.mark.parametrize("case, titles, rows, says", [
    ("milliseconds", ["Hat", "Cap"], [("u1", "i1", MS, "impression"),
                                      ("u2", "i2", MS + 60_000, "impression")],
     "none of the 2 interactions could be imported; the main reason: timestamp: "),
    # Row 0's own reason (no user) is not the cause of the other two.
    ("mixed", ["Hat", "Cap"], [(None, "i1", T0_S, "impression"),
                               ("u1", "i1", MS, "impression"),
                               ("u2", "i2", MS + 60_000, "impression")],
     "the main reason: timestamp: "),
    ("untitled", [None, " "], [("u1", "i1", T0_S, "impression")],
     "the main reason: no item could be imported: title: missing or blank"),
    ("clicks_only", ["Hat", "Cap"], [("u1", "i1", T0_S, "click"), ("u2", "i2", T0_S, "click")],
     "no impression among the 2 interactions imported"),
    ("no_rows", ["Hat", "Cap"], [], "the interactions file has no rows"),
    ("no_items", [], [("u1", "i1", T0_S, "impression")], "the items file has no rows"),
])
def test_an_import_that_leaves_nothing_to_stream_is_an_error_before_any_run(
        tmp_path, capsys, case, titles, rows, says):
    """Every row rejected (e.g. epoch milliseconds for seconds, which also leaves every item
    undated) used to stream an empty run and exit 0."""
    items = pa.table({"item_id": pa.array(["i1", "i2"][:len(titles)], pa.string()),
                      "title": pa.array(titles, pa.string())})
    users, item_ids, times, actions = zip(*rows, strict=True) if rows else ([],) * 4
    inter = pa.table({"user_id": pa.array(users, pa.string()),
                      "item_id": pa.array(item_ids, pa.string()),
                      "timestamp": pa.array(times, pa.int64()),
                      "action": pa.array(actions, pa.string())})
    pq.write_table(items, tmp_path / "items.parquet")
    pq.write_table(inter, tmp_path / "inter.parquet")
    data = tmp_path / "data"
    assert main(["--data-dir", str(data), "import", "--items", str(tmp_path / "items.parquet"),
                 "--interactions", str(tmp_path / "inter.parquet"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ppm import: error: ") and says in err, err
    paths = DataDir(data)
    assert not paths.checkpoint.exists() and not paths.training.exists()
    if case in ("milliseconds", "mixed"):
        assert "epoch milliseconds?" in err and str(paths.import_events / "rejected.jsonl") in err
        # Every row, and the items no readable time dates (in "mixed" row 0 dates i1).
        assert len(lines(paths.import_events / "rejected.jsonl")) == len(rows) + (
            2 if case == "milliseconds" else 1)


def test_an_output_folder_holding_other_files_is_refused_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "items.jsonl").write_text("old")
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match=r"holds files an import did not write \(notes"):
        write_events(*small_import(), None, out)
    assert tree(tmp_path) == before


def test_a_new_import_replaces_the_whole_folder(tmp_path):
    items, inter = small_import()
    write_events(items, inter, None, tmp_path / "out")
    write_events(items.slice(0, 1), inter.slice(0, 1), None, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or old folder left
    assert sorted(os.listdir(tmp_path / "out")) == sorted(catalog_import.OUTPUT_FILES)
    assert [e.item_id for e in decoded(tmp_path / "out")[0]] == ["i1"]


@pytest.mark.parametrize("earlier", [True, False], ids=["over an import", "into nothing"])
@pytest.mark.parametrize("fail_at", ["writing", "renaming"])
def test_a_failure_mid_write_leaves_the_old_folder_or_none(tmp_path, monkeypatch, earlier,
                                                          fail_at):
    items, inter = small_import()
    out = tmp_path / "out"
    if earlier:
        write_events(items.slice(0, 1), inter.slice(0, 1), None, out)
    before = tree(tmp_path)

    if fail_at == "writing":  # after items.jsonl and behaviors.jsonl are written
        def fail(*args):
            raise OSError("disk full")

        monkeypatch.setattr(catalog_import, "_rejected_lines", fail)
    else:  # the finished folder cannot be moved into place (the old one has stepped aside)
        rename = os.rename

        def fail(src, dst):
            if Path(src).name.endswith(".tmp"):
                raise OSError("disk full")
            rename(src, dst)

        monkeypatch.setattr(catalog_import.os, "rename", fail)
    with pytest.raises(OSError, match="disk full"):
        write_events(items, inter, None, out)
    assert tree(tmp_path) == before
    monkeypatch.undo()

    write_events(items, inter, None, out)  # and nothing is in the next import's way
    assert [e.item_id for e in decoded(out)[0]] == ["i1", "i2"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ---------------------------------------------------------------------------- time split

def test_temporal_split_is_a_share_of_time_not_rows(tmp_path):
    days = [0, 1, 2, 3, 100]
    inter = pa.table({"user_id": ["u1"] * 5, "item_id": ["i1"] * 5,
                      "timestamp": [T0_S + d * 86_400 for d in days],
                      "action": ["impression"] * 5})
    assert temporal_split_time(inter) == T0 + timedelta(days=80)
    assert temporal_split_time(inter, test_share=0.5) == T0 + timedelta(days=50)
    write_events(pa.table({"item_id": ["i1"], "title": ["Hat"]}), inter, None, tmp_path)
    assert temporal_split_time(tmp_path) == T0 + timedelta(days=80)
    with pytest.raises(ValueError, match="test_share"):
        temporal_split_time(inter, test_share=1.0)


# ---------------------------------------------------------------------------- MovieLens

def test_movielens_adapter_on_the_real_data(tmp_path, monkeypatch):
    started = time.time()
    monkeypatch.chdir(tmp_path)
    items, ratings, rule = movielens()
    assert str(rule) == "rating>=4:click"
    assert (items.num_rows, ratings.num_rows) == (9_066, 100_004)
    assert len(set(ratings.column("user_id").to_pylist())) == 671
    toy = items.filter(pa.compute.equal(items["item_id"], "m1")).to_pylist()[0]
    assert toy == {"item_id": "m1", "title": "Toy Story (1995)",
                   "text": "Genres: Adventure, Animation, Children, Comedy, Fantasy",
                   "category": "adventure"}
    assert items.column("category").null_count == 0 and "sci-fi" in set(
        items.column("category").to_pylist())

    s = write_events(items, ratings, rule, tmp_path / "ml")
    ts = np.array(ratings.column("timestamp").to_pylist())
    stars = np.array(ratings.column("rating").to_pylist())
    untitled = set(items.filter(items["title"].is_null()).column("item_id").to_pylist())
    no_title = np.isin(ratings.column("item_id").to_pylist(), list(untitled))
    assert len(untitled) == 5 and no_title.sum() == 7  # the data has 5 movies with no title
    # The event contract starts at MIN_EVENT_TIME (1990), before MovieLens (1995).
    assert (ts >= MIN_EVENT_TIME.timestamp()).all() and (stars >= 4).sum() == 51_568
    kept = ~no_title
    assert s.interactions_read == 100_004
    assert s.behavior_events["impression"] == s.interactions_written == kept.sum() == 99_997
    assert s.behavior_events["click"] == (kept & (stars >= 4)).sum() == 51_564
    assert s.interactions_rejected == 100_004 - 99_997
    assert s.rejected_by_field == {"interactions.item_id": 7, "items.title": 5}
    assert (s.items_written, s.items_rejected, s.items_dated_at_min) == (9_061, 5, 0)
    assert temporal_split_time(tmp_path / "ml").date().isoformat() == "2012-06-09"

    # Nothing lands in the working directory or in the repository.
    assert sorted(os.listdir(tmp_path)) == ["ml"]
    data_suffixes = {".csv", ".parquet", ".jsonl", ".rda", ".zip"}
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in {".git", ".venv", "__pycache__", "node_modules"}]
        for name in files:
            path = Path(folder, name)
            if path.suffix in data_suffixes:
                assert path.stat().st_mtime < started, f"{path} written during the import"


# ---------------------------------------------------------------------------- the pipeline

def test_the_history_preset_overrides_only_its_pipeline_settings():
    cfg = Config()
    history = cfg.with_preset("history")
    overrides = PRESETS["history"]["pipeline"]
    assert set(PRESETS["history"]) == {"pipeline"}
    assert {k: getattr(history.pipeline, k) for k in overrides} == overrides
    assert history.pipeline.attribution_window_s == cfg.pipeline.attribution_window_s
    assert history.encoders == cfg.encoders


@pytest.mark.slow
def test_import_into_pipeline_embeds_items_and_logs_samples(tmp_path, item_encoder, cfg):
    rng = np.random.default_rng(7)
    n_items, n_rows = 30, 300
    items = pa.table({
        "item_id": [f"i{k:02d}" for k in range(n_items)],
        "title": [f"{c} {w}" for c, w in zip(rng.choice(["Red", "Blue", "Black"], n_items),
                                             rng.choice(["coat", "hat", "bag"], n_items),
                                             strict=True)],
        "category": rng.choice(["coat", "hat", "bag"], n_items),
    })
    # Ten weeks of ratings; every item rated at least once.
    inter = pa.table({
        "user_id": [f"u{k}" for k in rng.integers(0, 20, n_rows)],
        "item_id": [f"i{k % n_items:02d}" for k in range(n_rows)],
        "timestamp": np.sort(T0_S + rng.integers(0, 70 * 86_400, n_rows)),
        "rating": rng.choice([1.0, 2.0, 3.0, 4.0, 5.0], n_rows),
    })
    events = tmp_path / "events"
    s = write_events(items, inter, "rating>=4:click", events)
    assert (s.items_written, s.interactions_written) == (30, 300)

    run = import_into_pipeline(cfg, events, progress=False, encoder=item_encoder)
    assert run.finished and run.dead_letters == 0 and run.image_errors == 0
    assert run.items_embedded == 30 and run.item_events == 30
    log = run.training_log
    assert log["samples_logged"] == log["impressions"] == 300
    assert log["attributed_followups"] == s.behavior_events["click"] and log["late_events"] == 0
    windows = sorted(cfg.paths.training_log.windows.glob("*.parquet"))
    assert run.windows_closed == len(windows) in (10, 11)  # 7-day windows over 70 days
    samples = ds.dataset(windows, format="parquet").to_table()
    assert samples.num_rows == 300
    assert samples.column("click").to_pylist().count(1) == s.behavior_events["click"]
    # Items are published before their first rating, so every sample sees an embedding.
    assert samples.column("item_encoder_version").null_count == 0
    assert not cfg.paths.item_warnings.exists() or not cfg.paths.item_warnings.read_text()
    with pytest.raises(FileExistsError, match="already holds a run"):
        import_into_pipeline(cfg, events, progress=False, encoder=item_encoder)


def test_parquet_types_round_trip(tmp_path):
    """Integer ids and created_at timestamps from parquet become text ids and UTC times."""
    pq.write_table(pa.table({"item_id": [1, 2], "title": ["A", "B"],
                             "created_at": pa.array([T0, T0], pa.timestamp("s", tz="UTC"))}),
                   tmp_path / "items.parquet")
    pq.write_table(pa.table({"user_id": [7, 7], "item_id": [1, 2], "timestamp": [T0_S, T0_S],
                             "action": ["impression", "click"]}), tmp_path / "inter.parquet")
    write_events(read_table(tmp_path / "items.parquet"), read_table(tmp_path / "inter.parquet"),
                 None, tmp_path / "out")
    items, behaviors = decoded(tmp_path / "out")
    assert [(e.item_id, e.event_time) for e in items] == [("1", T0), ("2", T0)]
    assert [(e.user_id, e.item_id) for e in behaviors] == [("7", "1"), ("7", "2")]
