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
from trainer.refresh import EmbeddingRefresh
from trainer.staleness import REFERENCE, run_staleness, vectors_computed

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
                "item_clicks_before": 0})
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
    result = run_staleness(cfg, [REFERENCE, DAILY], seeds=2, out=tmp_path / "out",
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
    result = run_staleness(static, [REFERENCE, DAILY], seeds=2, out=tmp_path / "static-out",
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
        run_staleness(cfg, [REFERENCE, DAILY], **kwargs)
    assert len(list((tmp_path / "out" / "runs").iterdir())) == 1
    fits.clear()
    monkeypatch.setattr(staleness, "train_batch", real)
    first = run_staleness(cfg, [REFERENCE, DAILY], **kwargs)
    assert first["runs_resumed"] == 1
    monkeypatch.setattr(staleness, "train_batch", counted)
    again = run_staleness(cfg, [REFERENCE, DAILY], **kwargs)
    assert fits == [] and again["runs_resumed"] == 3
    assert again["buckets"] == first["buckets"]
    # Another sweep's folder is refused, not mixed in.
    with pytest.raises(ValueError, match="another sweep"):
        run_staleness(cfg, [REFERENCE, DAILY], **{**kwargs, "epochs": 2})


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
    assert list(result["policies"]) == [p.name for p in staleness.PRESETS["quick"]]
    folder = cfg.paths.staleness("quick")
    assert f"results in {folder}" in err and (folder / "results.md").is_file()
    assert list(result["updates"]["policies"]) == [
        u.name for u in staleness.UPDATE_PRESETS["quick"]]
    assert len(list((folder / "runs").iterdir())) == (  # the floor's too
        len(staleness.PRESETS["quick"]) + 1 + len(staleness.UPDATE_PRESETS["quick"]))
    assert main([*argv, "--seeds", "0"]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
    # The sweep's --preset is not the configuration's (ppm --preset quick|fair|history).
    from ppm.cli.commands import build_parser

    args = build_parser().parse_args(["experiment", "staleness", "--preset", "default"])
    assert args.sweep == "default" and args.preset is None


def test_model_updates_start_from_the_on_arrival_fit_and_fine_tune_on_closed_windows(
        tmp_path, monkeypatch):
    """Frozen, the update sweep's model is the on-arrival fit itself: the same scores.
    Updated every hour, it fine-tunes on each window once its labels are final."""
    from trainer.staleness import ModelUpdate
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
    result = run_staleness(cfg, [REFERENCE], seeds=1, out=tmp_path / "out", test_share=0.25,
                           valid_share=0.15, epochs=1, resamples=20, progress=False,
                           updates=[hourly, frozen])
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
