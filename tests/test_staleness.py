"""The staleness lab: refresh policies, the sweep's direction and its control, resuming."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_repo.item_log import ItemLog
from feature_repo.online_features import ItemEmbeddingRow
from ppm.config import Config
from ppm.data_dir import DataDir
from tests.test_dataset import SAMPLES
from trainer import staleness
from trainer.dataset import ModalTable
from trainer.refresh import EmbeddingRefresh, cached_reads, parse_duration
from trainer.staleness import REFERENCE, ModelUpdate, Sweep, run_staleness, vectors_computed
from trainer.train import split_windows

HOUR_US = 3_600 * 10**6
T0 = datetime(2026, 1, 1, tzinfo=UTC)  # a midnight: a daily batch runs at T0
T0_US = int(T0.timestamp() * 1e6)
DAILY = EmbeddingRefresh("periodic", period_s=86_400.0)


def test_policies_make_vectors_readable_when_they_say():
    content = [T0_US + 90 * 60 * 10**6, T0_US + 26 * HOUR_US, T0_US - HOUR_US]  # 01:30, +1d 02:00
    modal = ModalTable.of("enc", ["a", "b", "c"], np.zeros((3, 1)), content)
    start = T0_US

    def available(policy):
        got = policy.apply(modal, start)
        return dict(zip(got.item_ids[1:], got.available_us[1:].tolist(), strict=True))

    assert available(EmbeddingRefresh("recorded")) == dict(zip("abc", content, strict=True))
    assert available(EmbeddingRefresh("arrival", lag_s=600)) == {
        i: t + 600 * 10**6 for i, t in zip("abc", content, strict=True)}
    assert available(DAILY) == {"a": T0_US + 24 * HOUR_US, "b": T0_US + 48 * HOUR_US,
                                "c": T0_US}
    once = available(EmbeddingRefresh("catalog_once"))
    assert once["c"] == start and once["a"] > 10**18 and once["b"] > 10**18
    assert [EmbeddingRefresh(*a).name for a in [("arrival",), ("arrival", 3600.0),
                                                 ("periodic", 0.0, 21_600.0),
                                                 ("arrival", 600.0), ("catalog_once",)]] == [
        "arrival", "arrival+1h", "every 6h", "arrival+10min", "catalog once"]
    with pytest.raises(ValueError, match="mode"):
        EmbeddingRefresh("hourly")
    # Vectors computed: one per version on arrival; a daily batch embeds an item that
    # changed twice in one day once.
    twice = ModalTable.of("enc", ["a", "a", "b"], np.zeros((3, 1)),
                          [T0_US + HOUR_US, T0_US + 2 * HOUR_US, T0_US + 3 * HOUR_US])
    end = T0_US + 48 * HOUR_US
    assert vectors_computed(twice, REFERENCE, T0_US, end) == 3
    assert vectors_computed(twice, DAILY, T0_US, end) == 2


def world(tmp_path, hours: int = 72, new_items: bool = True, seed: int = 0) -> Config:
    """Hourly windows of a shop where an item's vector says whether it is good (clicked
    four times in five) or not (one in ten), and ids say nothing: with ``new_items``, four
    items arrive every hour and are shown only in their first six hours; without, all of
    them exist from the start (a static catalog) and are shown at random."""
    rng = np.random.default_rng(seed)
    paths = DataDir(tmp_path)
    n_items = 4 * hours if new_items else 96
    arrival_h = np.arange(n_items) // 4 if new_items else np.zeros(n_items, int)
    good = rng.random(n_items) < 0.5
    vectors = np.stack([good, ~good, rng.normal(size=n_items)], axis=1).astype(np.float32)
    ItemLog(paths.item_log).append(
        [ItemEmbeddingRow(f"i{k}", vectors[k], "enc", f"h{k}", T0_US + int(arrival_h[k]) * HOUR_US,
                          T0_US) for k in range(n_items)], [T0_US] * n_items)
    folder = paths.training_log.windows
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for h in range(hours):
        shown = np.flatnonzero((arrival_h <= h) & (arrival_h > h - 6)) if new_items else \
            np.arange(n_items)
        start = T0 + timedelta(hours=h)
        rows = []
        for n in range(40):
            k = int(rng.choice(shown))
            at = start + timedelta(seconds=60 * n + 30)
            rows.append({
                "sample_id": f"{h}:{n}", "user_id": f"u{rng.integers(20)}", "item_id": f"i{k}",
                "request_id": f"r{h}:{n}", "impression_time": at,
                "click": int(rng.random() < (0.8 if good[k] else 0.1)), "order": 0,
                "collect": 0, "seq_item_ids": [], "seq_actions": [], "seq_times_us": [],
                "item_encoder_version": "enc", "item_category": "c", "item_brand": "b",
                "item_shop": "s", "item_price_bucket": 1,
                "item_age_s": (at - (T0 + timedelta(hours=int(arrival_h[k])))).total_seconds(),
                "item_clicks_before": 0, "window_start": start})
        name = f"{start:%Y%m%dT%H%M%SZ}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, SAMPLES), folder / name)
        entries.append({"start": start.isoformat(), "end": (start + timedelta(hours=1)).isoformat(),
                        "path": name, "samples": len(rows),
                        "closed_at_watermark": (start + timedelta(hours=2)).isoformat()})
    paths.training_log.manifest.write_text(json.dumps(entries))
    return Config(data_dir=tmp_path, features={"sequence_length": 4},
                  model={"item_buckets": 1024, "category_buckets": 8, "brand_buckets": 8,
                         "shop_buckets": 8, "d_model": 8, "n_heads": 2, "n_layers": 1,
                         "d_ff": 16, "side_dim": 4, "n_experts": 2, "expert_dim": 8,
                         "tower_dim": 8, "user_buckets": 64},
                  trainer={"initial_epochs": 4, "batch_size": 64, "lr": 0.01, "threads": 1})


@pytest.mark.slow
def test_fresh_embeddings_beat_a_daily_batch_on_new_items_and_a_static_world_shows_no_cost(
        tmp_path):
    cfg = world(tmp_path / "trends")
    result = run_staleness(cfg, Sweep((REFERENCE, DAILY)), seeds=2, out=tmp_path / "out",
                           test_share=0.25, valid_share=0.15, resamples=100, progress=False)
    cold = result["buckets"]["age<1d"]
    assert cold["samples"] > 300
    lost = cold["diffs"]["every 24h-arrival"]
    assert lost["ci95"][1] < 0, lost  # on-arrival ahead, interval above zero
    assert cold["diffs"]["arrival-idrec"]["ci95"][0] > 0  # and the vectors are worth it
    for name in ("results.json", "results.md"):
        assert (tmp_path / "out" / name).is_file()
    assert "every 24h - arrival" in (tmp_path / "out" / "results.md").read_text()

    # The static world: every item embedded before the data begin, so both policies read
    # the same vectors and fit the same models: no difference at all.
    static = world(tmp_path / "static", hours=48, new_items=False)
    result = run_staleness(static, Sweep((REFERENCE, DAILY)), seeds=2, out=tmp_path / "static-out",
                           test_share=0.25, valid_share=0.15, resamples=100, progress=False)
    assert result["buckets"]["all"]["samples"] > 300
    for name, bucket in result["buckets"].items():
        diff = bucket["diffs"]["every 24h-arrival"]
        if name in ("all", "age1-7d") or diff["auc"] is not None:  # (new items: none here)
            assert diff["auc"] == 0.0 and diff["ci95"] == [0.0, 0.0], name


def test_a_resumed_sweep_recomputes_nothing_already_finished(tmp_path, monkeypatch):
    cfg = world(tmp_path / "w", hours=24)
    kwargs = dict(seeds=1, out=tmp_path / "out", test_share=0.25, valid_share=0.15,
                  epochs=1, resamples=20, progress=False)
    fits = []
    real = staleness.train_batch

    def counted(*args, **kw):
        fits.append(args[0].staleness.embedding_refresh)
        if len(fits) == 2:  # killed during the second run
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(staleness, "train_batch", counted)
    with pytest.raises(KeyboardInterrupt):
        run_staleness(cfg, Sweep((REFERENCE, DAILY)), **kwargs)
    assert len(list((tmp_path / "out" / "runs").iterdir())) == 1
    fits.clear()
    monkeypatch.setattr(staleness, "train_batch", real)
    first = run_staleness(cfg, Sweep((REFERENCE, DAILY)), **kwargs)
    assert first["runs_resumed"] == 1
    monkeypatch.setattr(staleness, "train_batch", counted)
    again = run_staleness(cfg, Sweep((REFERENCE, DAILY)), **kwargs)
    assert fits == [] and again["runs_resumed"] == 3
    assert again["buckets"] == first["buckets"]
    # A folder of before sweeps had a period (its spec has none) resumes as the test's.
    spec_path = tmp_path / "out" / "spec.json"
    spec = json.loads(spec_path.read_text())
    assert spec.pop("period") == "test"
    spec_path.write_text(json.dumps(spec))
    assert run_staleness(cfg, Sweep((REFERENCE, DAILY)), **kwargs)["runs_resumed"] == 3
    assert fits == []
    # Another sweep's folder is refused, not mixed in.
    with pytest.raises(ValueError, match="another sweep"):
        run_staleness(cfg, Sweep((REFERENCE, DAILY)), **{**kwargs, "epochs": 2})
    # So is one whose update and cache runs would start from another reference policy.
    with pytest.raises(ValueError, match="another sweep"):
        run_staleness(cfg, Sweep((DAILY, REFERENCE)), **kwargs)


def test_a_validation_sweep_replays_the_validation_period_and_never_reads_the_test_one(
        tmp_path):
    """``--validation`` (``period="validation"``): the split moved one period back, so a
    setting is chosen without reading the test period; the two sweeps never share a folder."""
    cfg = world(tmp_path / "w", hours=24)
    kwargs = dict(seeds=1, test_share=0.25, valid_share=0.15, epochs=1, resamples=20,
                  progress=False)
    sweep = Sweep((REFERENCE, DAILY), updates=(ModelUpdate(), ModelUpdate(6 * 3_600.0)),
                  serving_cache_s=(3_600.0,))
    moved = split_windows(cfg, 0.25, 0.15, "validation")
    tested = split_windows(cfg, 0.25, 0.15)
    assert moved.test == tested.valid and moved.test  # the period replayed
    # Every window of the test period unreadable: nothing of it may be read.
    for window in tested.test:
        for path in window.files:
            path.write_bytes(b"not parquet")
    result = run_staleness(cfg, sweep, out=tmp_path / "valid", period="validation", **kwargs)
    assert result["period"] == "validation"
    assert result["buckets"]["all"]["samples"] == sum(w.samples for w in moved.test)
    assert set(result["updates"]["policies"]) == {"model frozen", "model every 6h"}
    assert "click AUC on the validation period" in (tmp_path / "valid" / "results.md"
                                                      ).read_text()
    spec = json.loads((tmp_path / "valid" / "spec.json").read_text())
    assert spec["period"] == "validation"
    assert [name for name, _ in spec["test"]] == [w.name for w in moved.test]
    # The test period's sweep is refused in the validation sweep's folder (before it reads
    # a window), and its default folder is another one.
    with pytest.raises(ValueError, match="another sweep"):
        run_staleness(cfg, sweep, out=tmp_path / "valid", **kwargs)
    paths = DataDir(tmp_path)
    assert paths.staleness("quick", "validation") == paths.experiments / (
        "staleness-quick-validation")
    assert paths.staleness("quick") == paths.experiments / "staleness-quick"


def test_the_command_hands_validation_to_the_sweep_and_keeps_it_in_its_own_folder(
        tmp_path, capsys, monkeypatch):
    from ppm.cli.commands import main
    from tests.test_experiment import _set_env

    cfg = world(tmp_path, hours=24)
    _set_env(cfg, monkeypatch)
    calls = []

    def sweep(cfg, sweep, seeds, out, *args, period="test", **kwargs):
        calls.append((period, out))
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(f"click AUC on the {period} period\n")
        return {"period": period}

    monkeypatch.setattr(staleness, "run_staleness", sweep)
    argv = ["--data-dir", str(tmp_path), "experiment", "staleness", "--seeds", "1", "--quiet"]
    assert main([*argv, "--validation"]) == 0 and main(argv) == 0
    assert calls == [("validation", cfg.paths.staleness("quick", "validation")),
                     ("test", cfg.paths.staleness("quick"))]
    assert "on the validation period" in capsys.readouterr().err
    # --out is used as given, either period.
    assert main([*argv, "--validation", "--out", str(tmp_path / "mine")]) == 0
    assert calls[-1] == ("validation", tmp_path / "mine")


def test_the_command_sweeps_a_preset_and_says_where_the_results_are(tmp_path, capsys,
                                                                      monkeypatch):
    from ppm.cli.commands import main
    from tests.test_experiment import _set_env

    cfg = world(tmp_path, hours=24)
    _set_env(cfg, monkeypatch)
    argv = ["--data-dir", str(tmp_path), "experiment", "staleness", "--seeds", "1",
            "--epochs", "1", "--quiet", "--test-share", "0.25", "--valid-share", "0.15"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    quick = staleness.SWEEPS["quick"]
    assert list(result["policies"]) == [p.name for p in quick.embedding]
    folder = cfg.paths.staleness("quick")
    assert f"results in {folder}" in err and (folder / "results.md").is_file()
    assert list(result["updates"]["policies"]) == [u.name for u in quick.updates]
    # Every policy, the floor, each policy under each update (the grid), each cache, each TTL.
    assert len(list((folder / "runs").iterdir())) == (
        len(quick.embedding) + 1 + len(quick.embedding) * len(quick.updates)
        + len(quick.serving_cache_s) + len(quick.freshness_window_s))
    assert {p.name for p in folder.glob("*.png")} == {
        "embedding_refresh.png", "model_update.png", "grid.png", "ops.png"}
    assert main([*argv, "--seeds", "0"]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
    # The sweep's --preset is not the configuration's (ppm --preset quick|fair|drifting|history).
    from ppm.cli.commands import build_parser

    args = build_parser().parse_args(["experiment", "staleness", "--preset", "default"])
    assert args.sweep == "default" and args.preset is None


def test_model_updates_start_from_the_on_arrival_fit_and_fine_tune_on_closed_windows(
        tmp_path, monkeypatch):
    """Frozen, the update sweep's model is the on-arrival fit itself: the same scores.
    Updated every hour, it fine-tunes on each window once its labels are final."""
    from trainer.train import split_windows

    cfg = world(tmp_path / "w", hours=24).with_values({"fine_tune_lr": "0.001"})
    split = split_windows(cfg, 0.25, 0.15)
    trained_on: list[list[str]] = []
    real_fit = staleness.fit

    def recorded(model, data, epochs, batch_size, lr, *args, **kw):
        trained_on.append(sorted(set(data.request_id)))
        assert lr == 0.001  # trainer.fine_tune_lr, not the first fit's lr
        return real_fit(model, data, epochs, batch_size, lr, *args, **kw)

    monkeypatch.setattr(staleness, "fit", recorded)
    hourly, frozen = ModelUpdate(HOUR_US / 1e6), ModelUpdate(None)
    result = run_staleness(cfg, Sweep((REFERENCE,), (hourly, frozen)), seeds=1,
                           out=tmp_path / "out", test_share=0.25, valid_share=0.15, epochs=1,
                           resamples=20, progress=False)
    updates = result["updates"]["buckets"]["all"]
    assert updates["models"]["model frozen"]["aucs"] == result["buckets"]["all"]["models"][
        "arrival"]["aucs"]
    assert list(updates["diffs"]) == ["model frozen-model every 1h"]
    # One fine-tune an hour, each on the one window whose labels became final (its end
    # plus the 30-minute attribution window) by then: a test window starting at hour h is
    # scored by a model that trained through hour h - 2, never on hour h - 1 or later.
    hours_of = [sorted({int(r[1:].split(":")[0]) for r in ids}) for ids in trained_on]
    first_valid = int((split.valid[0].start_us - T0_US) // HOUR_US)
    last_test = int((split.test[-1].start_us - T0_US) // HOUR_US)
    assert hours_of == [[h] for h in range(first_valid, last_test - 1)]
    assert "model every 1h" in (tmp_path / "out" / "results.md").read_text()


def test_policy_labels_parse_back_and_a_spec_file_names_a_sweep(tmp_path):
    for label in ("arrival", "arrival+10min", "every 6h", "every 6h+1h", "every 7d",
                  "catalog once"):
        assert EmbeddingRefresh.parse(label).name == label
    for label in ("model every 1h", "model every 1h+1h", "model every 28d", "model frozen"):
        assert ModelUpdate.parse(label).name == label
    assert ModelUpdate.parse("every 2w").every_s == 14 * 86_400
    assert parse_duration("90") == 90.0 and parse_duration("1.5h") == 5_400.0
    for bad in ("hourly", "every", "arrival+soon"):
        with pytest.raises(ValueError):
            EmbeddingRefresh.parse(bad)
    spec = tmp_path / "weekly.toml"
    spec.write_text('embedding_refresh = ["arrival", "every 7d"]\nmodel_update = ["every 7d", '
                    '"frozen"]\nserving_cache = ["1h"]\nfreshness_window = ["30d"]\n'
                    'tolerance = 0.01\n')
    sweep = Sweep.from_toml(spec)
    assert sweep == Sweep((REFERENCE, EmbeddingRefresh("periodic", period_s=7 * 86_400.0)),
                          (ModelUpdate(7 * 86_400.0), ModelUpdate(None)), False, (3_600.0,),
                          (30 * 86_400.0,), 0.01)
    spec.write_text('embedding = ["arrival"]\n')
    with pytest.raises(ValueError, match="unknown keys"):
        Sweep.from_toml(spec)
    with pytest.raises(ValueError, match="once"):
        Sweep((REFERENCE, REFERENCE))


def test_the_serving_cache_replay_reuses_a_read_until_it_expires():
    # Item a read at 0, 10 s, 100 s; b at 5 s; a 60 s cache expires between 30 and 60 s.
    keys = ["a", "b", "a", "a"]
    at = np.array([0, 5, 10, 100]) * 10**6
    as_of, missed = cached_reads(keys, at, 60.0)
    assert as_of.tolist() == [0, 5 * 10**6, 0, 100 * 10**6]  # the 10 s read got the 0 s value
    assert missed.tolist() == [True, True, False, True]
    as_of, missed = cached_reads(keys, at, 0.0)  # no cache: every read its own
    assert as_of.tolist() == at.tolist() and missed.all()
    # Order of the input does not matter: reads are replayed in time order.
    as_of, _ = cached_reads(keys[::-1], at[::-1], 60.0)
    assert as_of[::-1].tolist() == [0, 5 * 10**6, 0, 100 * 10**6]


def test_the_ops_view_and_the_grid_report_costs_choices_and_plots(tmp_path):
    """Serving caches and TTLs beside their savings; the cheapest setting within the
    tolerance is named; every plot is written."""
    cfg = world(tmp_path / "w", hours=24)
    hourly = ModelUpdate(3_600.0)
    sweep = Sweep((REFERENCE, DAILY), (hourly, ModelUpdate(None)), grid=True,
                  serving_cache_s=(600.0, 6 * 3_600.0), freshness_window_s=(3_600.0,),
                  tolerance=1.0)
    out = tmp_path / "out"
    result = run_staleness(cfg, sweep, seeds=1, out=out, test_share=0.25, valid_share=0.15,
                           epochs=1, resamples=20, progress=False)
    rows = {(r["knob"], r["setting"]): r for r in result["ops"]["rows"]}
    no_cache = rows["serving_cache_s", "no cache"]
    assert no_cache["loss_cold"] == 0.0 and no_cache["store_reads_per_request"] >= 1.0
    # A longer cache reads less from the store; a TTL holds fewer vectors.
    reads = [rows["serving_cache_s", n]["store_reads_per_request"]
             for n in ("no cache", "cache 10min", "cache 6h")]
    assert reads[0] > reads[1] >= reads[2]
    assert (rows["freshness_window_s", "ttl 1h"]["vectors_held"]
            < rows["freshness_window_s", "no ttl"]["vectors_held"])
    assert rows["embedding_refresh", "every 24h"]["encoder_calls_per_hour"] <= rows[
        "embedding_refresh", "arrival"]["encoder_calls_per_hour"]
    # With a tolerance of a whole AUC point every setting passes: the cheapest is named.
    assert {knob: c["value"] for knob, c in result["ops"]["choice"].items()} == {
        "embedding_refresh": "every 24h", "serving_cache_s": 6 * 3_600.0,
        "freshness_window_s": 3_600.0}
    grid = result["grid"]
    assert grid["cells"]["every 24h"] == {"model every 1h": "every 24h, model every 1h",
                                          "model frozen": "every 24h, model frozen"}
    # Frozen, a policy's grid cell is its own fit: the same scores as its embedding run.
    assert (grid["buckets"]["all"]["models"]["every 24h, model frozen"]["aucs"]
            == result["buckets"]["all"]["models"]["every 24h"]["aucs"])
    for name in ("embedding_refresh.png", "model_update.png", "grid.png", "ops.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    text = (out / "results.md").read_text()
    assert "the ops view" in text and "`serving_cache_s`: cache 6h (21600 s)" in text


def test_an_ops_view_of_freshness_windows_alone_counts_the_uncached_reads(tmp_path):
    cfg = world(tmp_path / "w", hours=24)
    result = run_staleness(cfg, Sweep((REFERENCE,), freshness_window_s=(3_600.0,)), seeds=1,
                           out=tmp_path / "out", test_share=0.25, valid_share=0.15, epochs=1,
                           resamples=20, progress=False)
    rows = {r["setting"]: r for r in result["ops"]["rows"]}
    assert set(rows) == {"arrival", "no cache", "no ttl", "ttl 1h"}
    assert rows["ttl 1h"]["store_reads_per_request"] == rows["no ttl"][
        "store_reads_per_request"] == 1.0  # one item per request, no sequences
