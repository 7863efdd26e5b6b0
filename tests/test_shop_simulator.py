"""The seeded shop simulator: determinism, wire contracts, causality, freshness, content signal."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import re
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ppm.config import SimulatorConfig
from ppm.events import BehaviorEvent, DeadLetter, ItemEvent, ItemOp, decode
from streams.sources.shop_simulator import (
    CATEGORIES,
    COLOURS,
    CONTENT_ONLY,
    MATERIALS,
    ORACLE_FILE,
    PATTERNS,
    PHOTO_ONLY,
    SEARCH_INTENT,
    STRUCTURED,
    STYLES,
    TEXT_ONLY,
    ShopSimulator,
    render_photo,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)  # decode's received_at: no wall clock in tests
DAY = timedelta(days=1)
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
SMALL = {"n_users": 300, "days": 2.0, "initial_items": 200, "items_per_day": 150}


def _lines(path: Path) -> list[bytes]:
    """Records of a JSONL file, split on newline bytes only (malformed ones may hold odd bytes)."""
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return data.split(b"\n")[:-1]


def _decode_all(lines: list[bytes], kind: str) -> list:
    return [decode(line, kind, f"file:{kind}:{n}", now=NOW) for n, line in enumerate(lines)]


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank-based ROC AUC (Mann-Whitney U), ties counted half."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based ranks, tied groups averaged
    ranks = average_rank[inverse]
    pos, neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def test_auc_helper() -> None:
    assert _auc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 1.0
    assert _auc([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert _auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    config = SimulatorConfig(seed=5, malformed_share=0.05, **SMALL)
    first = ShopSimulator(config).write_jsonl(tmp_path / "a")
    second = ShopSimulator(config).write_jsonl(tmp_path / "b")
    other = ShopSimulator(config.model_copy(update={"seed": 6})).write_jsonl(tmp_path / "c")
    assert first == second
    for name in ("items.jsonl", "behaviors.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    assert first != other


def test_lines_decode_to_the_typed_events_and_malformed_to_dead_letters(tmp_path: Path) -> None:
    sim = ShopSimulator(SimulatorConfig(seed=3, malformed_share=0.2, delete_share=0.1, **SMALL))
    summary = sim.write_jsonl(tmp_path)
    typed = list(sim.events())
    dead: list[DeadLetter] = []
    for kind, event_type in (("item", ItemEvent), ("behavior", BehaviorEvent)):
        lines = _lines(tmp_path / f"{kind}s.jsonl")
        assert lines == [line for k, line in sim.records() if k == kind]
        decoded = _decode_all(lines, kind)
        valid = [(line, e) for line, e in zip(lines, decoded, strict=True)
                 if not isinstance(e, DeadLetter)]
        expected = [e for e in typed if isinstance(e, event_type)]
        assert [e for _, e in valid] == expected
        # The fast behavior formatter writes exactly what the models would.
        assert [line for line, _ in valid] == [e.to_json() for e in expected]
        dead += [e for e in decoded if isinstance(e, DeadLetter)]

    assert summary.item_events + summary.behavior_events == len(typed)
    assert summary.behavior_events == sum(summary.by_action.values())
    assert summary.malformed == len(dead) > 0.1 * len(typed)
    assert summary.items == len(sim.catalog)
    reasons = " | ".join(d.reason for d in dead)
    for defect in ("not JSON", "payload is not UTF-8", "expected a JSON object", "kind:",
                   "event_time:", "longer than", "image:", "Field required"):
        assert defect in reasons


def test_event_time_order_and_causality() -> None:
    config = SimulatorConfig(seed=11, delete_share=0.3, search_share=0.5, **SMALL)
    sim = ShopSimulator(config)
    catalog = sim.catalog.set_index("item_id")
    events = list(sim.events())
    times = [e.event_time for e in events]
    assert times == sorted(times)

    listed: set[str] = set()
    withdrawn: set[str] = set()
    shown: dict[tuple[str, str], BehaviorEvent] = {}
    clicked: dict[tuple[str, str], BehaviorEvent] = {}
    positions: dict[str, list[int]] = defaultdict(list)
    for e in events:
        if isinstance(e, ItemEvent):
            (withdrawn if e.op is ItemOp.DELETE else listed).add(e.item_id)
            continue
        assert e.item_id in listed and e.item_id not in withdrawn
        item = catalog.loc[e.item_id]
        assert item.arrival < e.event_time
        assert pd.isna(item.deleted_at) or e.event_time < item.deleted_at
        key = (e.request_id, e.item_id)
        if e.action == "impression":
            assert key not in shown  # a request shows an item once
            shown[key] = e
            positions[e.request_id].append(e.position)
        elif e.action == "click":
            impression = shown[key]
            assert impression.user_id == e.user_id and impression.position == e.position
            assert impression.event_time <= e.event_time
            assert e.event_time - impression.event_time < timedelta(minutes=30)
            clicked[key] = e
        else:
            click = clicked[key]
            assert click.event_time <= e.event_time
            assert e.event_time - shown[key].event_time < timedelta(minutes=30)
    assert all(p == list(range(len(p))) for p in positions.values())
    assert len(withdrawn) > 50  # the deletion path was exercised
    assert sum(1 for e in events if isinstance(e, BehaviorEvent) and e.query) > 0


def test_a_steady_share_of_impressions_goes_to_items_younger_than_a_day(tmp_path: Path) -> None:
    config = SimulatorConfig(seed=2, n_users=500, days=3.0)
    sim = ShopSimulator(config)
    arrival: dict[str, datetime] = {}
    fresh, total = np.zeros(3), np.zeros(3)
    for e in sim.events():
        if isinstance(e, ItemEvent):
            arrival.setdefault(e.item_id, e.event_time)
        elif e.action == "impression":
            day = (e.event_time - config.start) // DAY
            total[day] += 1
            fresh[day] += e.event_time - arrival[e.item_id] < DAY
    share = fresh / total
    assert (share[1:] > 0.10).all(), share
    assert np.allclose(share, config.fresh_share, atol=0.05), share
    summary = sim.write_jsonl(tmp_path)
    assert summary.fresh_impression_share == pytest.approx(fresh.sum() / total.sum())


def test_content_beats_popularity_on_young_items() -> None:
    """The acceptance test of the world: for impressions of items younger than a day, a model
    of user affinities to content words learned from earlier days ranks clicks better than
    popularity. Everything is estimated from the wire records, none from ground truth."""
    days = 4
    sim = ShopSimulator(SimulatorConfig(seed=1, n_users=1500, days=days,
                                        sessions_per_user_per_day=2.0))
    split = sim.config.start + (days - 1) * DAY  # learn before, evaluate after
    content: dict[str, set[str]] = {}  # item -> features: title words, category, brand
    arrival: dict[str, datetime] = {}
    behaviors = []
    for kind, line in sim.records():
        record = json.loads(line)
        if kind == "behavior":
            behaviors.append(record)
        elif record["op"] == "upsert" and record["item_id"] not in content:
            content[record["item_id"]] = ({f"word:{w}" for w in record["title"].lower().split()}
                                          | {f"category:{record['category']}",
                                             f"brand:{record['brand']}"})
            arrival[record["item_id"]] = datetime.fromisoformat(record["event_time"])
    clicks = {(b["request_id"], b["item_id"]) for b in behaviors if b["action"] == "click"}

    user_seen, user_clicks = defaultdict(int), defaultdict(int)  # (user, feature) -> count
    seen, clicked = defaultdict(int), defaultdict(int)  # feature -> count
    item_seen, item_clicks = defaultdict(int), defaultdict(int)  # running, for popularity
    young = []  # (user, item, clicked, item's clicks so far, its impressions so far)
    for b in behaviors:
        item, user, t = b["item_id"], b["user_id"], datetime.fromisoformat(b["event_time"])
        if b["action"] == "click":
            item_clicks[item] += 1
        if b["action"] != "impression":
            continue
        label = (b["request_id"], item) in clicks
        if t < split:
            for f in content[item]:
                user_seen[user, f] += 1
                user_clicks[user, f] += label
                seen[f] += 1
                clicked[f] += label
        elif t - arrival[item] < DAY:
            young.append((user, item, label, item_clicks[item], item_seen[item]))
        item_seen[item] += 1

    prior = 5.0  # pseudo-impressions at the global rate
    overall = sum(clicked[f] for f in seen if f.startswith("category:")) / sum(
        seen[f] for f in seen if f.startswith("category:"))

    def rate(f: str) -> float:
        return (clicked[f] + prior * overall) / (seen[f] + prior)

    def affinity(user: str, item: str) -> float:  # naive-Bayes-like sum of smoothed log-CTRs
        return sum(np.log((user_clicks[user, f] + prior * rate(f)) / (user_seen[user, f] + prior))
                   for f in content[item])

    def category(item: str) -> str:
        return next(f for f in content[item] if f.startswith("category:"))

    labels = np.array([y for _, _, y, _, _ in young])
    content_auc = _auc([affinity(u, i) for u, i, *_ in young], labels)
    popularity_aucs = {
        "clicks so far": _auc([c for *_, c, _ in young], labels),
        "smoothed item CTR": _auc([(c + prior * rate(category(i))) / (n + prior)
                                   for _, i, _, c, n in young], labels),
        "category CTR": _auc([rate(category(i)) for _, i, *_ in young], labels),
    }
    print(f"young impressions {len(labels)}, clicks {labels.sum()}, content AUC "
          f"{content_auc:.3f}, popularity AUCs {popularity_aucs}")
    assert len(labels) > 3000 and labels.sum() > 200
    assert content_auc > 0.6
    assert content_auc >= max(popularity_aucs.values()) + 0.03


def test_photos_come_from_fashion_mnist_of_the_item_class() -> None:
    labels_file = FASHION_MNIST / "train-labels-idx1-ubyte.gz"
    if not labels_file.is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    labels = np.frombuffer(gzip.decompress(labels_file.read_bytes()), np.uint8, offset=8)
    catalog = ShopSimulator(SimulatorConfig(n_users=10, days=1.0)).catalog
    class_of = {c.id: label for label, c in enumerate(CATEGORIES)}
    assert (labels[catalog.photo] == catalog.category.map(class_of)).all()
    assert catalog.photo.nunique() > 0.9 * len(catalog)


def test_missing_fashion_mnist_warns_and_falls_back_to_decodable_images(tmp_path: Path) -> None:
    config = SimulatorConfig(n_users=20, days=0.5, fashion_mnist_dir=tmp_path / "absent")
    with pytest.warns(UserWarning, match="Fashion-MNIST not found"):
        sim = ShopSimulator(config)
    items = [decode(line, "item", "test", now=NOW) for kind, line in sim.records()
             if kind == "item"]
    assert items and all(isinstance(e, ItemEvent) for e in items)
    for event in items[:20]:
        png = base64.b64decode(event.image.partition(",")[2])
        with Image.open(io.BytesIO(png)) as img:
            assert img.size == (28, 28)
            covered = (np.asarray(img) < 250).any(axis=2).mean()  # share of non-white pixels
            assert 0.05 < covered < 0.95  # a shape, not a blank square
    assert (sim.catalog.photo == -1).all()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(-(2**40), 2**40), days=st.floats(0.05, 1.5),
       malformed=st.floats(0.0, 0.5), deleted=st.floats(0.0, 1.0),
       world=st.sampled_from(["v1", "v2"]), signal=st.floats(0.0, 1.0))
def test_any_world_gives_valid_events_and_dead_letters(seed: int, days: float, malformed: float,
                                                       deleted: float, world: str,
                                                       signal: float) -> None:
    config = SimulatorConfig(seed=seed, days=days, n_users=40, initial_items=30,
                             items_per_day=40, malformed_share=malformed, delete_share=deleted,
                             world=world, content_signal=signal)
    sim = ShopSimulator(config)
    records = list(sim.records())
    assert all(b"\n" not in line for _, line in records)
    decoded = [decode(line, kind, "test", now=NOW) for kind, line in records]
    events = list(sim.events())
    assert [e for e in decoded if not isinstance(e, DeadLetter)] == events
    oracle = sim.oracle()
    assert len(oracle) == sum(1 for e in events
                              if isinstance(e, BehaviorEvent) and e.action == "impression")
    assert oracle.p_click.between(0, 1).all() and np.isfinite(oracle.logit_structured).all()


# --------------------------------------------------------------------------- worlds and oracle

FAIR_SMALL = {"world": "v2", "n_users": 300, "days": 2.0, "initial_items": 200,
              "items_per_day": 150, "sessions_per_user_per_day": 2.0}


def _v1_digests(sim: ShopSimulator) -> tuple[str, str, str]:
    """sha256 prefixes of (the first 20,000 records' behavior lines, the item events without
    their photos, the photos' pixels): photos apart, so that a different PNG encoder or a
    missing Fashion-MNIST changes only the last."""
    behaviors, items, pixels = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    for n, (kind, line) in enumerate(sim.records()):
        if n == 20_000:
            break
        if kind == "behavior":
            behaviors.update(line + b"\n")
    for e in sim.events():
        if isinstance(e, ItemEvent):
            items.update(e.model_copy(update={"image": None}).to_json() + b"\n")
            if e.image:
                with Image.open(io.BytesIO(base64.b64decode(e.image.partition(",")[2]))) as img:
                    pixels.update(np.asarray(img).tobytes())
    return behaviors.hexdigest()[:16], items.hexdigest()[:16], pixels.hexdigest()[:16]


def test_world_v1_is_unchanged() -> None:
    """v1 stays the default, and its output is what it was before v2 existed: the digests
    were computed with the simulator of commit bf981eb (before v2)."""
    config = SimulatorConfig(seed=3, malformed_share=0.1, delete_share=0.1, **SMALL)
    assert config.world == "v1"
    behaviors, items, pixels = _v1_digests(ShopSimulator(config))
    assert (behaviors, items) == ("a70d99ae3741e1e2", "30b5b35a32e36fec")
    if (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        assert pixels == "d89cff4dc98e2ef4"


def test_world_v2_is_seeded(tmp_path: Path) -> None:
    config = SimulatorConfig(seed=5, malformed_share=0.05, **FAIR_SMALL)
    ShopSimulator(config).write_jsonl(tmp_path / "a")
    ShopSimulator(config).write_jsonl(tmp_path / "b")
    ShopSimulator(config.model_copy(update={"seed": 6})).write_jsonl(tmp_path / "c")
    for name in ("items.jsonl", "behaviors.jsonl", ORACLE_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    v1 = ShopSimulator(config.model_copy(update={"world": "v1"})).write_jsonl(tmp_path / "d")
    assert v1.behavior_events > 0
    assert (tmp_path / "a" / "behaviors.jsonl").read_bytes() != (
        tmp_path / "d" / "behaviors.jsonl").read_bytes()


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+(?:-[a-z]+)*", text.lower()))


def test_v2_text_names_text_only_attributes_and_never_photo_only_ones() -> None:
    sim = ShopSimulator(SimulatorConfig(seed=2, **FAIR_SMALL))
    catalog = sim.catalog.set_index("item_id")
    photo_words = set(COLOURS) | set(PATTERNS)
    upserts = queries = 0
    for e in sim.events():
        if isinstance(e, ItemEvent) and e.op is ItemOp.UPSERT:
            upserts += 1
            item = catalog.loc[e.item_id]
            text = " ".join([e.title, e.description or "", e.category or "", e.brand or ""])
            assert not _words(text) & photo_words, text
            assert {item.material, item.style} <= _words(e.title) & _words(e.description)
            assert (e.category, e.brand, e.shop) == (item.category, item.brand, item.shop)
            assert e.price is not None
        elif isinstance(e, BehaviorEvent) and e.query:
            queries += 1
            assert not _words(e.query) & photo_words, e.query
    assert upserts >= len(catalog) and queries > 100
    assert set(PHOTO_ONLY) | set(TEXT_ONLY) == set(CONTENT_ONLY)
    assert not set(CONTENT_ONLY) & set(STRUCTURED)
    # Every value of every attribute occurs, and the price tier follows the price.
    for name in STRUCTURED + CONTENT_ONLY:
        assert catalog[name].nunique() > 1, name
    assert set(catalog["material"]) <= set(MATERIALS) and set(catalog["style"]) <= set(STYLES)
    by_tier = catalog.groupby("price_tier").price.median()
    assert by_tier["budget"] < by_tier["premium"]


def test_v2_photo_shows_colour_and_pattern_and_nothing_of_the_text() -> None:
    grey = np.zeros((28, 28), np.uint8)
    grey[4:24, 6:22] = 200  # a garment-sized block
    shots = {(c, p): render_photo(grey, c, p).tobytes()
             for c in range(len(COLOURS)) for p in range(len(PATTERNS))}
    assert len(set(shots.values())) == len(shots)  # every colour x pattern looks different
    assert render_photo(grey, 3, None).tobytes() == shots[3, PATTERNS.index("plain")]

    images = FASHION_MNIST / "train-images-idx3-ubyte.gz"
    if not images.is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    pictures = np.frombuffer(gzip.decompress(images.read_bytes()), np.uint8,
                             offset=16).reshape(-1, 28, 28)
    sim = ShopSimulator(SimulatorConfig(seed=4, **FAIR_SMALL | {"days": 0.3}))
    catalog = sim.catalog.set_index("item_id")
    checked = 0
    for e in sim.events():
        if isinstance(e, ItemEvent) and e.image and checked < 40:
            item = catalog.loc[e.item_id]
            with Image.open(io.BytesIO(base64.b64decode(e.image.partition(",")[2]))) as img:
                shown = np.asarray(img)
            # The photo is a function of the picture, the colour and the pattern alone.
            expected = render_photo(pictures[item.photo], COLOURS.index(item.colour),
                                    PATTERNS.index(item.pattern))
            assert np.array_equal(shown, expected)
            checked += 1
    assert checked == 40


def _oracle_with_ground_truth(sim: ShopSimulator) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The oracle, and per row the user's summed tastes for the item's structured and
    content-only values, from the public ground truth (catalog, user_tastes)."""
    oracle = sim.oracle()
    catalog, tastes = sim.catalog.set_index("item_id"), sim.user_tastes
    users = tastes.index.get_indexer(oracle.user_id)
    items = catalog.loc[oracle.item_id]

    def summed(names: tuple[str, ...]) -> np.ndarray:
        return sum(tastes[a].to_numpy()[users, tastes[a].columns.get_indexer(items[a])]
                   for a in names)

    oracle["quality"] = items.quality.to_numpy()
    return oracle, summed(STRUCTURED), summed(CONTENT_ONLY)


def test_v2_click_logit_is_structured_tastes_plus_dialled_content() -> None:
    """The logit minus quality and search intent is an exact affine function of the summed
    structured and content-only tastes; at content_signal 0 the content slope is 0, so two
    items equal in catalog fields and quality get the same logit from every user."""
    slopes = {}
    for signal in (0.0, 0.5, 1.0):
        sim = ShopSimulator(SimulatorConfig(seed=8, content_signal=signal, **FAIR_SMALL))
        oracle, structured, content = _oracle_with_ground_truth(sim)
        rest = (oracle.logit - oracle.quality - SEARCH_INTENT * oracle.searched).to_numpy()
        design = np.stack([np.ones(len(rest)), structured, content], axis=1)
        coef, *_ = np.linalg.lstsq(design, rest, rcond=None)
        assert np.abs(design @ coef - rest).max() < 1e-9
        slopes[signal] = coef[1:]
        if signal == 0.0:
            assert coef[2] == pytest.approx(0.0, abs=1e-12)
            assert np.array_equal(oracle.logit, oracle.logit_structured)
    ratio = [content / structured for structured, content in slopes.values()]
    assert abs(ratio[0]) < 1e-12 and 0 < ratio[1] < ratio[2]


def test_oracle_rows_are_the_impressions(tmp_path: Path) -> None:
    sim = ShopSimulator(SimulatorConfig(seed=9, malformed_share=0.1, **FAIR_SMALL))
    oracle = sim.oracle()
    impressions = [e for e in sim.events()
                   if isinstance(e, BehaviorEvent) and e.action == "impression"]
    assert list(oracle.request_id) == [e.request_id for e in impressions]
    assert list(oracle.item_id) == [e.item_id for e in impressions]
    assert list(oracle.user_id) == [e.user_id for e in impressions]
    assert list(oracle.position) == [e.position for e in impressions]
    assert list(oracle.searched) == [e.query is not None for e in impressions]
    assert list(oracle.impression_time) == [e.event_time for e in impressions]
    assert not oracle.duplicated(["request_id", "item_id"]).any()
    assert oracle.p_click.between(0, 1, inclusive="neither").all()
    top = oracle.position == 0
    np.testing.assert_allclose(oracle.p_click[top], 1 / (1 + np.exp(-oracle.logit[top])))
    assert (oracle.p_click[~top] < 1 / (1 + np.exp(-oracle.logit[~top]))).all()

    sim.write_jsonl(tmp_path)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / ORACLE_FILE), oracle)
    sim.write_jsonl(tmp_path, oracle=False)
    assert not (tmp_path / ORACLE_FILE).exists()
    # v1 has an oracle too.
    v1 = ShopSimulator(SimulatorConfig(seed=9, **SMALL | {"days": 0.5}))
    assert len(v1.oracle()) == sum(1 for e in v1.events()
                                   if isinstance(e, BehaviorEvent) and e.action == "impression")


def _clicked(sim: ShopSimulator, oracle: pd.DataFrame) -> np.ndarray:
    clicks = set()
    for kind, line in sim.records():
        if kind == "behavior" and b'"action":"click"' in line:
            record = json.loads(line)
            clicks.add((record["request_id"], record["item_id"]))
    return np.array([key in clicks for key in zip(oracle.request_id, oracle.item_id,
                                                  strict=True)])


def test_oracle_auc_and_what_content_adds() -> None:
    """Clicks follow p_click (calibrated, high AUC); a structured-only oracle loses AUC as
    the content signal grows and loses none at 0; the base CTR stays put along the dial."""
    config = SimulatorConfig(seed=1, **FAIR_SMALL | {"n_users": 500})
    full, structured, ctr = {}, {}, {}
    for signal in (0.0, 0.5, 1.0):
        sim = ShopSimulator(config.model_copy(update={"content_signal": signal}))
        oracle = sim.oracle()
        labels = _clicked(sim, oracle)
        full[signal] = _auc(oracle.p_click, labels)
        structured[signal] = _auc(oracle.p_click_structured, labels)
        ctr[signal] = labels.mean()
        # Calibration: observed click rate per decile of p_click matches its mean.
        decile = pd.qcut(oracle.p_click, 10, labels=False)
        observed = pd.Series(labels).groupby(decile).mean()
        expected = oracle.p_click.groupby(decile).mean()
        assert np.abs(observed - expected).max() < 0.03, (observed, expected)
    print(f"oracle AUC {full}, structured-only {structured}, CTR {ctr}")
    assert min(full.values()) > 0.75
    assert structured[0.0] == full[0.0]
    assert full[1.0] - structured[1.0] > 0.04
    assert 0 < full[0.5] - structured[0.5] < full[1.0] - structured[1.0]
    assert max(ctr.values()) < 1.25 * min(ctr.values())


def test_drift_dials_change_content_and_clicks_and_leave_the_static_world_alone() -> None:
    """Price cuts lift clicks from the cut on; a restyle sends a new photo (and title) in a
    new colour; trends lift their value's items during the burst only; tastes move. The
    oracle is the click model, so each is checked on it."""
    from ppm.config import Config

    base = dict(seed=5, days=2.0, n_users=200, initial_items=80, items_per_day=120)
    drifting = Config().with_preset("drifting").simulator.model_copy(update=base)
    sim = ShopSimulator(drifting)
    static = ShopSimulator(SimulatorConfig(**base))
    catalog = sim.catalog
    items = [e for e in sim.events() if isinstance(e, ItemEvent) and e.op == ItemOp.UPSERT]
    by_item = defaultdict(list)
    for e in items:
        by_item[e.item_id].append(e)
    restyled = np.flatnonzero(sim._restyle < 2**62)
    assert len(restyled) > 10
    for k in restyled[:5]:
        first, *later = by_item[f"i{k:07d}"]
        changed = next(e for e in later if e.image != first.image)
        new, old = COLOURS[sim._new_colour[k]], catalog.loc[k, "colour"]
        assert new != old and f" {new} " in changed.title and f" {old} " in first.title
    # The same world's clicks differ only through the dials: sale boost, trends, drift.
    truth, before = sim.oracle(), static.oracle()
    assert len(truth) == len(before) and (truth.item_id == before.item_id).all()
    t = ((truth.impression_time - sim._start).dt.total_seconds() * 1e6).to_numpy()
    item = truth.item_id.str[1:].astype(int).to_numpy()
    lift = truth.logit.to_numpy() - before.logit.to_numpy()
    on_sale = sim._sale[item] <= t
    assert on_sale.sum() > 50 and lift[on_sale].mean() > lift[~on_sale].mean() + 0.5
    trending = np.zeros(len(t), bool)
    for name, value, start, end in sim._trends:
        trending |= (sim._value(name, item, t) == value) & (t >= start) & (t < end)
    assert trending.sum() > 50 and lift[trending].mean() > lift[~trending].mean() + 0.5
    # Drift: with no sale and no trend, the lift spreads out over time.
    quiet = ~on_sale & ~trending & (sim._restyle[item] > t)
    early, late = quiet & (t < 12 * 3_600e6), quiet & (t > 36 * 3_600e6)
    assert np.std(lift[late]) > 2 * np.std(lift[early])
    # The static preset is the default world.
    assert Config().with_preset("static").simulator == SimulatorConfig()
