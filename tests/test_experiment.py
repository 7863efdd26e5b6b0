"""trainer.experiment and ``ppm eval --seeds``: intervals that cover what they claim, the
whole experiment on tiny windows, and (slow) the shuffled-vector control on a streamed
world."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from ppm.config import Config
from trainer.experiment import Scored, compare_models, pooled_summary, t_interval
from trainer.registry import Registry

MODELS = {"idrec", "ppm", "ppm_shuffled", "baseline_logreg", "baseline_rate"}


def test_t_interval_by_hand():
    lo, hi = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(2 df) = 4.303
    assert (lo, hi) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    assert t_interval([0.7]) is None
    lo, hi = t_interval(np.arange(41.0))  # beyond the table: t(40 df) = 2.021
    assert (hi - lo) / 2 == pytest.approx(2.021 * np.std(np.arange(41.0), ddof=1) / np.sqrt(41),
                                          rel=1e-3)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_the_paired_interval_covers_a_known_difference():
    """Scores ``click + noise``: with normal noise of sd 1 the AUC is Phi(1 / sqrt(2)), with
    sd 2 Phi(1 / sqrt(8)). The worse model is the better one plus more noise (paired
    samples). Over 40 worlds of 500 users, the 95% paired interval over users covers the
    true difference about 95% of the time, and never contains 0."""
    truth = _normal_cdf(1 / math.sqrt(2)) - _normal_cdf(1 / math.sqrt(8))  # 0.122
    covered, widths = 0, []
    for world in range(40):
        rng = np.random.default_rng(world)
        users = np.repeat(np.arange(500), 4)
        y = (rng.random(users.size) < 0.3).astype(float)
        good = y + rng.normal(0, 1, users.size)
        worse = good + rng.normal(0, math.sqrt(3), users.size)
        diff = compare_models(y, users, {"a": good[None], "b": worse[None]},
                              pairs=[("a", "b")], resamples=200)["diffs"]["a-b"]
        lo, hi = diff["ci95"]
        assert lo < diff["auc"] < hi and lo > 0
        covered += lo <= truth <= hi
        widths.append(hi - lo)
    assert covered >= 34, covered  # 95% of 40 is 38; fewer than 34 is unlikely (p < 0.01)
    assert 0.02 < np.mean(widths) < 0.12


def test_compare_models_averages_seeds_and_reads_every_model_against_the_oracle():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(200), 5)
    y = (rng.random(users.size) < 0.4).astype(float)
    truth = y + rng.normal(0, 0.5, users.size)
    seeds = np.stack([truth + rng.normal(0, 1, users.size) for _ in range(3)])
    result = compare_models(y, users, {"ppm": seeds, "idrec": seeds[::-1], "oracle": truth[None]},
                            pairs=[("ppm", "idrec")])
    ppm, oracle = result["models"]["ppm"], result["models"]["oracle"]
    assert ppm["auc"] == pytest.approx(np.mean(ppm["aucs"])) and len(ppm["aucs"]) == 3
    assert ppm["ci95_seeds"][0] < ppm["auc"] < ppm["ci95_seeds"][1]
    assert oracle["ci95_seeds"] is None and oracle["oracle_share"] == 1.0
    assert ppm["oracle_share"] == pytest.approx((ppm["auc"] - 0.5) / (oracle["auc"] - 0.5))
    # The same seeds in another order: the mean difference is 0, on every resample too.
    assert result["diffs"]["ppm-idrec"] == {"auc": pytest.approx(0.0, abs=1e-12),
                                            "ci95": [pytest.approx(0.0, abs=1e-12)] * 2}
    assert (result["samples"], result["positives"]) == (1000, int(y.sum()))
    # Two seeds far apart: t(1 df) = 12.7 would put the interval beyond both ends (about
    # [-4.7, 5.7]); two close to 1 only beyond 1, and the lower end is left as it is.
    far = compare_models(y, users, {"a": np.stack([truth, -truth + 0.1 * seeds[0]]),
                                    "b": np.stack([truth, truth + 0.3 * seeds[0]])},
                         pairs=[])["models"]
    assert far["a"]["ci95_seeds"] == [0.0, 1.0]
    lo, hi = t_interval(far["b"]["aucs"])
    assert hi > 1.0 and far["b"]["ci95_seeds"] == [lo, 1.0]


def _world(seed: int, users: int = 150, noise: float = 1.0) -> Scored:
    """A made-up experiment: two seeds of ``good`` (clicks plus noise), ``bad`` (more)."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(users), 6).astype(str)
    y = (rng.random(ids.size) < 0.3).astype(float)
    good = np.stack([y + rng.normal(0, noise, ids.size) for _ in range(2)])
    bad = good + rng.normal(0, 2.0, good.shape)
    return Scored(y, ids, {"all": np.ones(ids.size, bool), "first": ids < "5"},
                  {"good": good, "bad": bad}, {"good": [{"seed": 0}, {"seed": 1}], "bad": []},
                  {"seeds": 2})


def test_worlds_pool_as_strata_the_mean_of_their_aucs_with_an_interval_over_worlds():
    from trainer.metrics import auc, gauc

    worlds = {f"w{k}": _world(k, noise=0.7 + 0.3 * k) for k in range(4)}
    result = pooled_summary(worlds, pairs=[("good", "bad")], resamples=100)
    assert result["worlds"] == ["w0", "w1", "w2", "w3"] and result["seeds"] == 2
    pooled = result["buckets"]["all"]
    per_world = [[auc(w.labels, row) for row in w.scores["good"]] for w in worlds.values()]
    good = pooled["models"]["good"]
    # A model's AUC is the mean of its worlds' (per seed), not the AUC of the pooled rows.
    assert good["aucs"] == pytest.approx(np.mean(per_world, axis=0))
    assert good["auc"] == pytest.approx(np.mean(per_world))
    assert good["strata"] == 4
    assert good["ci95_strata"] == pytest.approx(list(t_interval(np.mean(per_world, axis=1))))
    # The worlds differ (noise 0.7 .. 1.6): the interval over worlds is wider than over users.
    lo, hi = good["ci95_strata"]
    assert hi - lo > good["ci95_users"][1] - good["ci95_users"][0]
    diff = pooled["diffs"]["good-bad"]
    assert diff["strata"] == 4 and diff["ci95"][0] > 0 and diff["ci95_strata"][0] > 0
    assert pooled["samples"] == sum(len(w.labels) for w in worlds.values())
    # Users are kept apart by world (user "0" of w0 is not user "0" of w1): GAUC over
    # 4 x 150 users; and the first bucket pools each world's own.
    labels = np.concatenate([w.labels for w in worlds.values()])
    users = np.concatenate([[f"{n}/{u}" for u in w.users] for n, w in worlds.items()])
    scores = np.concatenate([w.scores["good"] for w in worlds.values()], axis=1)
    assert good["gauc"] == pytest.approx(np.mean([gauc(labels, row, users) for row in scores]))
    assert result["buckets"]["first"]["samples"] == sum(
        int(w.buckets["first"].sum()) for w in worlds.values())
    assert [f["world"] for f in result["fits"]["good"]] == ["w0", "w0", "w1", "w1", "w2",
                                                           "w2", "w3", "w3"]
    assert result["per_world"]["w2"]["buckets"]["all"]["models"]["good"]["auc"] == (
        pytest.approx(np.mean(per_world[2])))
    # A world with another set of models is refused.
    odd = _world(9)
    odd.scores.pop("bad")
    with pytest.raises(ValueError, match="scored other models, seeds or period"):
        pooled_summary({"w0": worlds["w0"], "odd": odd})
    # So is one that scored another period.
    validation = _world(9)
    validation.split["period"] = "validation"
    with pytest.raises(ValueError, match="scored other models, seeds or period"):
        pooled_summary({"w0": worlds["w0"], "valid": validation})


def test_strata_without_both_classes_are_left_out_and_sparse_ones_do_not_void_resamples(
        monkeypatch):
    from trainer import experiment
    from trainer.metrics import auc, percentile_interval

    seen = []  # every bootstrap distribution an interval is taken of
    monkeypatch.setattr(experiment, "percentile_interval",
                        lambda x: seen.append(np.asarray(x)) or percentile_interval(x))

    rng = np.random.default_rng(3)
    parts = []
    for k, clicks in enumerate((60, 60, 1, 0)):  # stratum 2: one click; 3: none
        y = np.zeros(300)
        y[rng.choice(300, clicks, replace=False)] = 1.0
        parts.append((y, np.repeat(np.arange(50), 6).astype(str), np.full(300, k)))
    y, users, strata = (np.concatenate(c) for c in zip(*parts, strict=True))
    users = np.char.add(strata.astype(str), users)
    score = y + rng.normal(0, 1, y.size)
    result = compare_models(y, users, {"a": score[None], "b": -score[None]},
                            pairs=[("a", "b")], resamples=100, strata=strata)
    a = result["models"]["a"]
    assert a["strata"] == 3  # the stratum without a click has no AUC
    assert a["auc"] == pytest.approx(np.mean([auc(y[strata == k], score[strata == k])
                                              for k in range(3)]))
    # The one-click stratum is undefined in about a third of the resamples (its user not
    # drawn): they still count, as the mean of the other strata.
    lo, hi = a["ci95_users"]
    assert lo < a["auc"] < hi
    assert len(seen) == 3 and all(x.shape == (100,) and not np.isnan(x).any() for x in seen)
    lo, hi = result["diffs"]["a-b"]["ci95_strata"]
    assert -1.0 <= lo < hi <= 1.0  # clipped: three strata, wide


def _set_env(cfg: Config, monkeypatch) -> None:
    """Give the command line ``cfg``'s values, as ``PPM__`` variables."""
    for section in ("features", "model", "trainer"):
        for key, value in getattr(cfg, section).model_dump(exclude_defaults=True).items():
            monkeypatch.setenv(f"PPM__{section.upper()}__{key.upper()}", str(value))


def test_eval_seeds_reports_models_baselines_control_oracle_and_intervals(tmp_path, capsys,
                                                                          monkeypatch):
    from ppm.cli.commands import main
    from tests.test_trainer import tiny_world

    cfg = tiny_world(tmp_path)
    _set_env(cfg, monkeypatch)
    # A simulator's oracle for these windows: it knows that odd items are clicked.
    windows = ds.dataset(sorted(map(str, cfg.paths.training_log.windows.glob("*.parquet"))),
                         format="parquet").to_table(columns=["request_id", "item_id", "click"])
    cfg.paths.simulated.mkdir(parents=True)
    pq.write_table(windows.append_column("logit", pa.compute.cast(windows["click"],
                                                                  pa.float64())),
                   cfg.paths.simulated_oracle)
    table = tmp_path / "table.md"
    argv = ["--data-dir", str(tmp_path), "eval", "--seeds", "2", "--epochs", "1", "--quiet",
            "--markdown", str(table)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])

    assert result["seeds"] == 2 and result["windows"] == {"train": 7, "valid": 1, "test": 2}
    assert result["oracle_file"] == str(cfg.paths.simulated_oracle)
    assert [f["seed"] for f in result["fits"]["ppm_shuffled"]] == [0, 1]
    assert list(result["buckets"]) == ["all", "new_in_test", "age<1h", "age<1d", "age1-7d",
                                       "age>7d", "no_click_before"]
    everything = result["buckets"]["all"]
    assert everything["samples"] == 24 and set(everything["models"]) == MODELS | {"oracle"}
    for name in ("idrec", "ppm", "ppm_shuffled"):
        model = everything["models"][name]
        assert len(model["aucs"]) == 2 and model["auc"] == pytest.approx(np.mean(model["aucs"]))
        assert model["ci95_seeds"][0] <= model["auc"] <= model["ci95_seeds"][1]
    for name in MODELS:
        lo, hi = everything["models"][name]["ci95_users"]
        assert 0 <= lo <= hi <= 1
    assert everything["models"]["oracle"]["auc"] == 1.0
    # Every sample's item is a minute old: first seen in the test period (hours 8-9) for
    # the second hour's samples only.
    assert result["buckets"]["new_in_test"]["samples"] == 12
    assert result["buckets"]["age>7d"]["samples"] == 0
    assert set(everything["diffs"]) == {"ppm-idrec", "ppm-ppm_shuffled", "ppm_shuffled-idrec"}
    assert all(len(d["ci95"]) == 2 for d in everything["diffs"].values())
    # The tables, in the file and on stderr; the result under the data dir; nothing
    # registered.
    markdown = table.read_text()
    assert markdown in err and "| all | baseline_logreg |" in markdown
    assert "| all | ppm - ppm_shuffled |" in markdown
    saved = list(cfg.paths.experiments.glob("*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text()) == result
    assert Registry(cfg.paths.registry("ppm")).champion() is None

    # An oracle of other data is refused, not half used.
    pq.write_table(pa.table({"request_id": ["x"], "item_id": ["y"], "logit": [0.0]}),
                   cfg.paths.simulated_oracle)
    assert main(argv) == 1
    assert "describes other data" in capsys.readouterr().err
    # Without an oracle there is no ceiling; a missing --oracle file is an error.
    assert main([*argv, "--oracle", str(tmp_path / "nope.parquet")]) == 1
    cfg.paths.simulated_oracle.unlink()
    assert main([*argv[:4], "1", *argv[5:]]) == 0  # one seed is enough to see it
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["oracle_file"] is None and result["period"] == "test"
    assert set(result["buckets"]["all"]["models"]) == MODELS

    # --validation: the split one period back scores hour 7 (the validation period) after
    # training on hours 0-5 and choosing the epoch on hour 6, the oracle too. No window of
    # the test period (hours 8-9) is read: its files made unreadable change nothing.
    pq.write_table(windows.append_column("logit", pa.compute.cast(windows["click"],
                                                                  pa.float64())),
                   cfg.paths.simulated_oracle)
    for path in sorted(cfg.paths.training_log.windows.glob("*.parquet"))[-2:]:
        path.write_bytes(b"not parquet")
    assert main([*argv[:4], "1", *argv[5:], "--validation"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["period"] == "validation"
    assert result["windows"] == {"train": 6, "valid": 1, "test": 1}
    assert result["buckets"]["all"]["samples"] == 12
    assert result["buckets"]["all"]["models"]["oracle"]["auc"] == 1.0
    assert "click AUC on the validation period" in table.read_text()
    assert len(list(cfg.paths.experiments.glob("*-validation.json"))) == 1

    # The control: scoring the test period reads those files, and fails.
    assert main([*argv[:4], "1", *argv[5:]]) == 1
    capsys.readouterr()


@pytest.mark.slow
@pytest.mark.timeout(2400)  # streaming a world, then three fits: minutes, more when loaded
def test_the_shuffled_control_loses_ppms_gain_on_young_items(tmp_path, item_encoder):
    """PPM's claim, controlled, in the world of ``test_ppm_beats_idrec_on_new_items_in_a_small
    _world`` (simulator v1, where the title and photo describe the item): on items younger
    than a day, ppm ranks clicks better than the same model trained and scored on vectors
    shuffled across items (the paired 95% interval above 0), and the control is no better
    than idrec there: ppm's gain comes from what the vectors say about the
    item, not from having a vector at all. (In the fair world at this size, neither gain is
    distinguishable from 0: docs/results.md.)"""
    from streams.local_runner import LocalRunner
    from streams.sources.shop_simulator import ShopSimulator
    from tests.test_trainer import DENSE_WORLD
    from trainer.experiment import run_experiment

    cfg = Config(data_dir=tmp_path, pipeline={"log_window_s": 6 * 3600.0},
                 trainer={"batch_size": 512, "initial_epochs": 2})
    LocalRunner(cfg, encoder=item_encoder, resume=False).run(
        ShopSimulator(DENSE_WORLD).records(), "dense", progress=False)
    result = run_experiment(cfg, seeds=2, test_share=0.34, valid_share=0.1, progress=False)
    young = result["buckets"]["age<1d"]
    assert young["samples"] > 2_000 and young["positives"] > 200, young
    # The margins measured on this world are in docs/results.md (Evaluation). Two seeds: with
    # one, training randomness alone moved the lower end across 0 when the model's code
    # changed (same numbers, different rounding and initialisation).
    control = young["diffs"]["ppm-ppm_shuffled"]
    assert control["auc"] > 0 and control["ci95"][0] > 0, young
    shuffled = young["diffs"]["ppm_shuffled-idrec"]
    assert shuffled["ci95"][0] <= 0 or shuffled["auc"] < 0.01, young


def test_the_baselines_fit_on_the_training_windows_the_models_read(tmp_path, monkeypatch):
    """With ``trainer.history_share`` a fit reads only the most recent training windows; the
    baselines are fitted on exactly those samples (by request and item), not on the whole
    period."""
    import trainer.experiment
    from tests.test_trainer import tiny_world
    from trainer.experiment import TRAINED, score_models

    cfg = tiny_world(tmp_path).with_values({"trainer.history_share": "0.5"})
    fitted = {}

    def recorded(name, fit):
        def fit_(train, *args, **kwargs):
            fitted[name] = train
            return fit(train, *args, **kwargs)
        return fit_

    monkeypatch.setattr(trainer.experiment.LogisticBaseline, "fit",
                        recorded("logreg", trainer.experiment.LogisticBaseline.fit))
    monkeypatch.setattr(trainer.experiment.PositiveRate, "tuned",
                        recorded("rate", trainer.experiment.PositiveRate.tuned))
    scored = score_models(cfg, 1, epochs=1, progress=False, arms={"idrec": TRAINED["idrec"]})
    split = trainer.experiment.split_windows(cfg)
    read = trainer.experiment.recent(split.train, 0.5)
    assert 0 < len(read) < len(split.train)
    assert scored.fits["idrec"][0]["windows"] == len(read)
    rows = ds.dataset([str(f) for w in read for f in w.files], format="parquet").to_table(
        columns=["request_id", "item_id"])
    expected = sorted(zip(rows["request_id"].to_pylist(), rows["item_id"].to_pylist(),
                          strict=True))
    for name in ("logreg", "rate"):
        train = fitted[name]
        assert sorted(zip(train.request_id, train.item_ids, strict=True)) == expected


def test_the_ablation_scores_the_validation_period_when_asked(tmp_path, monkeypatch, capsys):
    """``ppm experiment ablation --validation`` hands the period to the experiment (whose
    split ``tests/test_dataset.py`` and ``test_eval_seeds_...`` check) and marks its result
    file; without the flag it scores the test period."""
    import trainer.experiment
    from ppm.cli.commands import main
    from tests.test_trainer import tiny_world

    cfg = tiny_world(tmp_path)
    _set_env(cfg, monkeypatch)
    periods = []

    def experiment(cfg, seeds, *args, period="test", **kwargs):
        periods.append(period)
        return {"period": period, "seeds": seeds, "buckets": {}, "fits": {}}

    monkeypatch.setattr(trainer.experiment, "run_experiment", experiment)
    argv = ["--data-dir", str(tmp_path), "experiment", "ablation", "--seeds", "1", "--quiet"]
    assert main([*argv, "--validation"]) == 0 and main(argv) == 0
    assert periods == ["validation", "test"]
    assert "click AUC on the validation period" in capsys.readouterr().err
    saved = sorted(p.name for p in cfg.paths.experiments.glob("ablation-*.json"))
    assert len(saved) == 2 and sum(n.endswith("Z-validation.json") for n in saved) == 1
    assert sum(n.endswith("Z.json") for n in saved) == 1


def test_an_arm_the_config_cannot_train_is_refused_before_any_fit(tmp_path, monkeypatch):
    """A frozen plug-in cannot train with ``model.content_affinity``: the ablation says so
    before its first fit, not when it reaches that arm after the others have run."""
    import trainer.experiment

    fits = []
    monkeypatch.setattr(trainer.experiment, "train_batch", lambda *a, **k: fits.append(a))
    cfg = Config(data_dir=tmp_path).with_values({"model.content_affinity": True})
    with pytest.raises(ValueError, match="frozen plug-in"):
        trainer.experiment.score_models(cfg, 1, arms=trainer.experiment.ablation_arms())
    assert fits == []
    # Without a frozen arm the same config gets as far as its (here empty) data.
    with pytest.raises(SystemExit, match="no closed windows"):
        trainer.experiment.score_models(cfg, 1)


def test_each_fit_of_an_experiment_keeps_its_best_restart_and_counts_every_epoch(
        tmp_path, monkeypatch):
    """``trainer.restarts`` 2 in ``ppm eval --seeds``: every model's fit keeps the restart
    with the better validation AUC and the cost counts both restarts' epochs; without a
    validation period the experiment is refused before the baselines or any fit."""
    import trainer.experiment
    from tests.test_staleness import world
    from trainer.experiment import run_experiment, score_models

    cfg = world(tmp_path, hours=24).with_values({"restarts": 2})
    result = run_experiment(cfg, 1, 0.2, 0.1, epochs=1, progress=False, resamples=20)
    for name in ("idrec", "ppm", "ppm_shuffled"):
        fit = result["fits"][name][0]
        tried = fit["restarts"]["tried"]
        assert [r["seed"] for r in tried] == [0, 1000], name
        aucs = [r["valid_click_auc"] for r in tried]
        assert fit["valid_click_auc"] == aucs[fit["restarts"]["chosen"]] == max(aucs), name
        assert fit["epochs_run"] == sum(r["epochs"] for r in tried) == 2, name
    fits = []
    monkeypatch.setattr(trainer.experiment, "train_batch", lambda *a, **k: fits.append(a))
    monkeypatch.setattr(trainer.experiment.LogisticBaseline, "fit",
                        lambda *a, **k: fits.append(a))
    with pytest.raises(ValueError, match="restarts = 2 needs validation windows"):
        score_models(cfg, 1, 0.2, 0.0)
    assert fits == []


def test_the_ablation_fits_every_arm_on_the_same_split_and_reports_its_cost(tmp_path):
    """Each arm of ``ppm experiment ablation`` on a small world with two encoder versions:
    the fine-tuned arm reads its version, the data-share arms fewer windows, the frozen
    plug-in trains fewer parameters; every arm is paired with ppm."""
    from feature_repo.item_log import ItemLog, read_item_log
    from feature_repo.online_features import ItemEmbeddingRow
    from tests.test_staleness import T0_US, world
    from trainer.experiment import ablation_arms, ablation_pairs, run_experiment, to_markdown

    cfg = world(tmp_path, hours=24)
    log = read_item_log(cfg.paths.item_log).to_pandas()
    ItemLog(cfg.paths.item_log).append(
        [ItemEmbeddingRow(r.item_id, np.asarray(r.embedding, np.float32)[::-1].copy(), "enc-b",
                          r.content_hash, int(r.content_time.value // 1000), T0_US + 1)
         for r in log.itertuples()], [T0_US + 1] * len(log))
    arms = ablation_arms(finetuned="enc-b", generic="enc")
    result = run_experiment(cfg, 1, 0.2, 0.1, epochs=1, progress=False, arms=arms,
                            pairs=ablation_pairs(arms), resamples=20)
    fits = {name: runs[0] for name, runs in result["fits"].items()}
    assert set(fits) == {"idrec", "ppm", "ppm_finetuned", "ppm_plugin_frozen",
                         "ppm_plugin_joint", "ppm_data50", "ppm_data25"}
    assert fits["ppm"]["encoder_version"] == "enc"
    assert fits["ppm_finetuned"]["encoder_version"] == "enc-b"
    full = fits["ppm"]["windows"]
    assert fits["ppm_data50"]["windows"] == round(full / 2)
    assert fits["ppm_data25"]["windows"] == round(full / 4)
    assert fits["ppm_plugin_frozen"]["trainable_parameters"] < \
        fits["ppm_plugin_joint"]["trainable_parameters"] == fits["ppm"]["trainable_parameters"]
    assert set(result["buckets"]["all"]["diffs"]) == {
        "ppm_finetuned-ppm", "ppm_plugin_frozen-ppm", "ppm_plugin_joint-ppm",
        "ppm_data50-ppm", "ppm_data25-ppm", "ppm-idrec"}
    table = to_markdown(result)
    assert "seconds per epoch" in table
    # Beside the cost, the validation AUC that chose the fit's epoch.
    row = next(line for line in table.splitlines()
               if line.startswith(f"| ppm | {fits['ppm']['windows']} |"))
    assert row.endswith(f"| {fits['ppm']['valid_click_auc']:.4f} |"), row


def test_scores_saved_come_back_only_for_the_same_spec(tmp_path):
    scored = _world(1)
    scored.buckets = {"all": np.ones(len(scored.labels), bool),
                      "age<1d": np.arange(len(scored.labels)) % 3 == 0}
    spec = {"seeds": 2, "test_share": 0.2, "epochs": None, "trainer": {"lr": 0.001},
            "models": ["good", "bad"]}
    path = tmp_path / "experiments" / "world-scores.npz"
    scored.save(path, spec)
    back = Scored.load(path, dict(spec))
    assert back is not None and back.fits == scored.fits and back.split == scored.split
    assert np.array_equal(back.labels, scored.labels) and list(back.users) == [
        str(u) for u in scored.users]
    assert back.buckets.keys() == scored.buckets.keys() and all(
        np.array_equal(back.buckets[b], scored.buckets[b]) for b in scored.buckets)
    assert back.scores.keys() == scored.scores.keys() and all(
        np.array_equal(back.scores[m], scored.scores[m]) for m in scored.scores)
    assert back.summary(resamples=50) == scored.summary(resamples=50)
    assert Scored.load(path, {**spec, "test_share": 0.25}) is None  # other settings
    assert Scored.load(tmp_path / "none.npz", spec) is None
    path.write_bytes(path.read_bytes()[:100])  # cut short: read as absent, not a crash
    assert Scored.load(path, spec) is None


@pytest.mark.slow
@pytest.mark.timeout(900)  # two small worlds streamed; seven runs, three of them reusing
def test_experiment_worlds_streams_each_world_once_and_pools_them(tmp_path, capsys,
                                                                  monkeypatch, item_encoder):
    from ppm.cli.commands import main
    from ppm.cli.worlds import stream_world
    from ppm.config import load_config
    from tests.test_trainer import TINY_MODEL

    settings = {"SIMULATOR__SEED": 5, "SIMULATOR__DAYS": 1.0, "SIMULATOR__N_USERS": 80,
                "SIMULATOR__INITIAL_ITEMS": 30, "SIMULATOR__ITEMS_PER_DAY": 40,
                "SIMULATOR__SESSIONS_PER_USER_PER_DAY": 3.0, "PIPELINE__LOG_WINDOW_S": 7200.0,
                "TRAINER__BATCH_SIZE": 64,
                **{f"MODEL__{k.upper()}": v for k, v in TINY_MODEL.items()}}
    for key, value in settings.items():
        monkeypatch.setenv(f"PPM__{key}", str(value))
    monkeypatch.setattr("encoders.item_encoder.ItemEncoder.from_config",
                        classmethod(lambda cls, cfg: item_encoder))  # loaded once per session
    argv = ["--data-dir", str(tmp_path), "experiment", "worlds", "--worlds", "2", "--seeds",
            "1", "--epochs", "1", "--test-share", "0.25", "--valid-share", "0.125", "--quiet"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])

    assert result["kind"] == "worlds" and result["worlds"] == ["seed-5", "seed-6"]
    cfg = load_config().model_copy(update={"data_dir": tmp_path})  # the settings above
    assert result["data_dirs"] == {f"seed-{s}": str(cfg.paths.world(s)) for s in (5, 6)}
    everything = result["buckets"]["all"]
    assert set(everything["models"]) == MODELS | {"oracle"}
    for name, model in everything["models"].items():
        assert model["strata"] == 2, name
        per_world = [result["per_world"][w]["buckets"]["all"]["models"][name]["auc"]
                     for w in result["worlds"]]
        assert model["auc"] == pytest.approx(np.mean(per_world)), name
    # Each world has its own oracle, which knows its clicks best.
    oracle = everything["models"]["oracle"]["auc"]
    assert all(oracle > m["auc"] for n, m in everything["models"].items() if n != "oracle")
    assert {f["world"] for f in result["fits"]["ppm"]} == {"seed-5", "seed-6"}
    assert "95% worlds" in err and "| all | ppm - idrec |" in err
    assert result["reused_scores"] == []
    # Run again: each world's scores are read back, not fitted, and pool to the same figures;
    # with other settings (here the epochs) or --refit, the worlds are fitted again.
    import ppm.cli.worlds as worlds_module

    fitted = []
    real_score_models = worlds_module.score_models
    monkeypatch.setattr(worlds_module, "score_models",
                        lambda world_cfg, *a, **k: fitted.append(world_cfg.data_dir)
                        or real_score_models(world_cfg, *a, **k))
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fitted == [] and again["reused_scores"] == ["seed-5", "seed-6"]
    assert again["buckets"] == result["buckets"] and again["fits"] == result["fits"]
    two_epochs = [*argv[:argv.index("--epochs") + 1], "2", *argv[argv.index("--epochs") + 2:]]
    assert main(two_epochs) == 0 and len(fitted) == 2  # other settings: fitted again
    assert main([*two_epochs, "--refit"]) == 0 and len(fitted) == 4  # the same, but asked
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reused_scores"] == []
    # --validation scores each world's validation period, kept apart from its test scores:
    # fitted once, then reused, while the test period's stay as they were.
    kept = [Config(data_dir=cfg.paths.world(s)).paths for s in (5, 6)]
    test_scores = [p.world_scores().read_bytes() for p in kept]
    assert main([*two_epochs, "--validation"]) == 0 and len(fitted) == 6
    out, err = capsys.readouterr()
    valid = json.loads(out.strip().splitlines()[-1])
    assert valid["period"] == "validation" and result["period"] == "test"
    assert "on the validation period" in err
    assert all(p.world_scores("validation").is_file() for p in kept)
    assert [p.world_scores().read_bytes() for p in kept] == test_scores
    assert main([*two_epochs, "--validation"]) == 0 and len(fitted) == 6
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reused_scores"] == [
        "seed-5", "seed-6"]
    assert main(two_epochs) == 0 and len(fitted) == 6  # the test period's, reused
    capsys.readouterr()
    # The two worlds differ (another simulator seed), and a finished one is not streamed
    # again.
    first = [Config(data_dir=cfg.paths.world(s)).paths.checkpoint for s in (5, 6)]
    assert first[0].read_bytes() != first[1].read_bytes()
    before = first[0].stat().st_mtime_ns
    world_cfg = stream_world(cfg, 5, item_encoder, progress=False)
    assert world_cfg.data_dir == cfg.paths.world(5) and first[0].stat().st_mtime_ns == before
    # A world of other settings under the same seed is refused, not silently reused:
    # other simulator settings, windows of another length, another encoder.
    for changed in ({"simulator.n_users": 81}, {"pipeline.log_window_s": 3600.0}):
        with pytest.raises(ValueError, match="streamed with other settings"):
            stream_world(cfg.with_values(changed), 5, item_encoder, progress=False)
    monkeypatch.setattr(item_encoder, "encoder_version", "enc-other")
    with pytest.raises(ValueError, match="streamed with other settings"):
        stream_world(cfg, 5, item_encoder, progress=False)
