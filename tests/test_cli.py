"""The ``ppm`` command line: fast help, config errors, and the simulate/demo commands."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ppm.cli.commands import main
from ppm.data_dir import DataDir, TrainingLogDir

HEAVY = ("torch", "transformers", "feast", "faust", "pandas", "pyarrow")


def test_help_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from ppm.cli.commands import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: ppm" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_bad_config_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("PPM__ENCODERS__IMAGE_SIZE", "huge")
    assert main(["config"]) == 2
    line = one_error_line(capsys.readouterr().err, "config")
    assert "bad configuration" in line and "image_size" in line and "PPM__" in line


def test_config_prints_the_effective_values(monkeypatch, capsys):
    monkeypatch.setenv("PPM__SIMULATOR__SEED", "42")
    assert main(["config"]) == 0
    assert json.loads(capsys.readouterr().out)["simulator"]["seed"] == 42


def test_a_preset_is_laid_over_the_config_and_wins(monkeypatch, capsys):
    monkeypatch.setenv("PPM__PIPELINE__LOG_WINDOW_S", "60")
    monkeypatch.setenv("PPM__PIPELINE__ATTRIBUTION_WINDOW_S", "90")
    assert main(["--preset", "history", "config"]) == 0
    pipeline = json.loads(capsys.readouterr().out)["pipeline"]
    assert pipeline["log_window_s"] == 7 * 86_400  # the preset's
    assert pipeline["attribution_window_s"] == 90  # not in the preset: the environment's
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "nope", "config"])
    assert exc.value.code == 2


def test_simulate_same_seed_gives_byte_identical_files(tmp_path, capsys):
    # The acceptance command, run twice.
    for out in ("a", "b"):
        assert main(["simulate", "--days", "3", "--seed", "1", "--out", str(tmp_path / out),
                     "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["behavior_events"] > 10_000 and summary["items"] > 0
    for name in ("items.jsonl", "behaviors.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    main(["simulate", "--days", "3", "--seed", "2", "--out", str(tmp_path / "c"), "--quiet"])
    assert (tmp_path / "c" / "behaviors.jsonl").read_bytes() != (
        tmp_path / "a" / "behaviors.jsonl").read_bytes()


@pytest.mark.slow
def test_demo_quick_streams_the_shop_through_feast(tmp_path, capsys):
    assert main(["demo", "--quick", "--json", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    f = json.loads(out.strip().splitlines()[-1])
    for key in ("items_embedded", "behavior_events", "freshness_p50_ms", "freshness_p99_ms",
                "dead_letters", "windows_closed", "samples_logged"):
        assert key in f, key
    assert f["items_embedded"] > 300 and f["embedding_dim"] == 1664
    assert 0 < f["freshness_p50_ms"] <= f["freshness_p99_ms"]
    # Every impression became exactly one sample (the run finished, nothing pending).
    paths = DataDir(tmp_path)
    summary = json.loads(paths.summary.read_text())
    assert summary["finished"] and summary["training_log"]["pending_impressions"] == 0
    assert f["samples_logged"] == summary["training_log"]["impressions"] > 1_000
    assert f["windows_closed"] == len(list(paths.training_log.windows.glob("*.parquet")))
    # Malformed records are mixed in; each one is a dead letter with a reason, none lost.
    dead = paths.dead_letters.read_text().splitlines()
    assert f["dead_letters"] == len(dead) > 0
    assert all(json.loads(line)["reason"] for line in dead)
    assert summary["records"] == (summary["item_events"] + summary["behavior_events"]
                                  + summary["dead_letters"])
    # Cold items are not blank ids: almost every impression of a new item finds its embedding.
    assert 0.1 < f["cold_sample_share"] < 0.5 and f["cold_samples_with_embedding"] > 0.9
    # The ranker was trained window by window; every variant, the shuffled-vector control
    # included, reports AUCs on unseen windows, next to the baselines and the oracle, each
    # with a bootstrap interval over users.
    assert f["windows_evaluated"] >= 5
    models = ("idrec", "ppm", "ppm_shuffled", "baseline_logreg", "baseline_rate", "oracle")
    for key in (f"auc_{bucket}{m}" for bucket in ("", "cold_") for m in models):
        lo, hi = f[f"{key}_ci95"]
        assert 0 <= lo <= hi <= 1 and 0 <= f[key] <= 1, key
    for bucket in ("", "cold_"):
        # Nothing beats the truth the clicks were drawn from.
        assert f[f"auc_{bucket}oracle"] > max(f[f"auc_{bucket}{m}"] for m in models[:-1])
        diff = f[f"auc_{bucket}diff_ppm_idrec"]
        assert diff == pytest.approx(f[f"auc_{bucket}ppm"] - f[f"auc_{bucket}idrec"])
        lo, hi = f[f"auc_{bucket}diff_ppm_idrec_ci95"]
        assert -1 <= lo < hi <= 1
    for variant in ("idrec", "ppm", "ppm_shuffled"):
        assert (paths.registry(variant) / "champion.json").exists()
    # The oracle lies where ppm eval --seeds finds it, with a logit for every sample.
    import pandas as pd

    oracle = pd.read_parquet(paths.simulated_oracle)
    samples = pd.concat([pd.read_parquet(w, columns=["request_id", "item_id"])
                         for w in paths.training_log.windows.glob("*.parquet")])
    known = set(zip(oracle["request_id"], oracle["item_id"], strict=True))
    assert len(samples) == f["samples_logged"] and oracle["logit"].notna().all()
    assert set(zip(samples["request_id"], samples["item_id"], strict=True)) <= known
    assert "The distributed path" in out  # it points to the Kafka/Faust/Redis path


def test_status_reads_every_workers_freshness_windows_and_dead_letters(tmp_path, monkeypatch,
                                                                       capsys):
    from streams.freshness import FreshnessStats, bucket_of
    from streams.worker_metrics import WorkerMetrics, write_endpoint

    monkeypatch.setattr("ppm.cli.commands._lag", lambda kafka: {})  # no broker here
    paths = DataDir(tmp_path)
    # Freshness: the local runner's file and two Faust workers' files.
    lags_ms = {paths.freshness: [10, 20], paths.worker_freshness("w1"): [30],
               paths.worker_freshness("w2"): [40, 50, 1000]}
    for i, (path, lags) in enumerate(lags_ms.items()):
        stats = FreshnessStats()
        for j, lag in enumerate(lags):
            stats.record([f"i{i}-{j}"], [0], [1_000_000], 1_000_000 + lag * 1000)
        path.parent.mkdir(exist_ok=True)
        stats.save(path)
    # Windows: partition 1 has closed only the first of partition 0's two hours.
    hours = ["2026-01-01T00:00:00+00:00", "2026-01-01T01:00:00+00:00",
             "2026-01-01T02:00:00+00:00"]
    for partition, closed in ((0, 2), (1, 1)):
        manifest = TrainingLogDir(paths.training_partition(partition)).manifest
        manifest.parent.mkdir(parents=True)
        manifest.write_text(json.dumps([
            {"start": hours[h], "end": hours[h + 1], "path": f"h{h}.parquet",
             "samples": 10 + partition, "closed_at_watermark": hours[h + 1]}
            for h in range(closed)]))
    letters = [{"reason": "json: bad", "stage": "decode"}, {"reason": "x", "stage": "decode"},
               {"reason": "image: too big", "stage": "process"}, {"reason": "old"}]
    paths.dead_letters.write_text(
        "".join(json.dumps(letter) + "\n" for letter in letters) + '{"reason": "half')
    # Workers' metrics endpoints: one answers, two were killed and left their files behind.
    metrics = WorkerMetrics("w2")
    metrics.items_embedded.inc(5)
    server, url = metrics.serve("127.0.0.1", 0)
    write_endpoint(paths.worker_metrics("w2"), "w2", url)
    gone, gone_url = WorkerMetrics("w1").serve("127.0.0.1", 0)  # not w2's port: it is taken
    gone.shutdown()
    gone.server_close()
    for worker in ("w0", "w1"):
        write_endpoint(paths.worker_metrics(worker), worker, gone_url)

    try:
        assert main(["--data-dir", str(tmp_path), "status"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    status = json.loads(capsys.readouterr().out)
    freshness = status["freshness"]
    assert freshness["items"] == 6 and freshness["max_ms"] == 1000
    # The median of all six lags (35 ms), not of one file's, within the histogram's bucket.
    assert bucket_of(freshness["p50_ms"]) in (bucket_of(30), bucket_of(40))
    assert {k: v["items"] for k, v in freshness["by_worker"].items()} == {
        "local": 2, "w1": 1, "w2": 3}
    assert freshness["by_worker"]["w2"]["max_ms"] == 1000
    workers = {w["worker"]: w for w in status["workers"]}
    assert not workers["w0"]["up"] and not workers["w1"]["up"] and workers["w2"]["up"]
    assert workers["w2"]["since_start"]["items_embedded"] == 5
    assert status["training"] == {
        "windows_closed": 1, "samples": 10 + 11, "closed_through": "h0.parquet",
        "sources": {"partition-0/windows": {"windows": 2, "last": "h1.parquet"},
                    "partition-1/windows": {"windows": 1, "last": "h0.parquet"}}}
    # The line still being written is not counted.
    assert status["dead_letter_file"] == {
        "dead_letters": 4, "by_stage": {"decode": 2, "process": 1, "unknown": 1},
        "by_reason": {"json": 1, "x": 1, "image": 1, "old": 1}}


def test_train_options_that_cannot_work_are_usage_errors(tmp_path, capsys):
    data = ["--data-dir", str(tmp_path / "mistyped")]
    for options, said in (
            (["--tune", "id_dropout=0,0.1"], "--tune goes with --batch"),  # not --batch
            (["--batch", "--freeze-plugin"], "--freeze-plugin goes with --plug-in"),
            (["--batch", "--plug-in", "champion", "--tune", "id_dropout=0,0.1"],
             "--plug-in and --tune do not go together"),
            (["--batch", "--tune", "id_dropout"], "FIELD=V1,V2"),
            (["--batch", "--tune", "no_such_field=1,2"], "unknown config field"),
            (["--batch", "--tune", "id_dropout=0,lots"], "--tune id_dropout=lots"),
            (["--batch", "--valid-share", "0.9"], "--valid-share 0.9"),
            (["--batch", "--test-share", "1"], "--test-share 1")):
        assert main([*data, "train", *options]) == 2, options
        assert said in one_error_line(capsys.readouterr().err, "train"), options
    # Told before the data dir is looked at (it holds no run), and nothing was created.
    assert not (tmp_path / "mistyped").exists()


# -----------------------------------------------------------------------------
# Mistakes end in one line, ``ppm <command>: error: ...``, and exit 1 (--debug: traceback)


def one_error_line(err: str, command: str) -> str:
    """The only line of ``err``, which must be ``command``'s error line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"ppm {command}: error: "), err
    return lines[0]


def test_version_names_the_installed_package(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"ppm {metadata.version('ppm-stream')}"


def test_a_missing_input_file_is_one_line(tmp_path, capsys):
    data = ["--data-dir", str(tmp_path / "data")]
    nope = str(tmp_path / "nope.csv")
    assert main([*data, "import", "--items", nope, "--interactions", nope]) == 1
    assert "nope.csv" in one_error_line(capsys.readouterr().err, "import")
    assert main([*data, "stream", "--jsonl", str(tmp_path / "nope")]) == 1
    assert "no items.jsonl in" in one_error_line(capsys.readouterr().err, "stream")
    assert not (tmp_path / "data").exists()  # checked before a store was made


@pytest.mark.parametrize("command", [["status"], ["topics"],
                                     ["publish", "--simulate", "--days", "0.01"]])
def test_kafka_down_is_one_line_within_seconds(tmp_path, monkeypatch, capsys, command):
    monkeypatch.setenv("PPM__KAFKA__CONNECT_TIMEOUT_S", "1")
    DataDir(tmp_path).training.mkdir()  # a run, for status
    started = time.monotonic()
    assert main(["--data-dir", str(tmp_path), *command, "--bootstrap", "127.0.0.1:1"]) == 1
    assert time.monotonic() - started < 20  # kafka-python alone would wait 30 s
    line = one_error_line(capsys.readouterr().err, command[0])
    assert "could not reach Kafka at 127.0.0.1:1" in line
    assert "--bootstrap" in line and "PPM__KAFKA__BOOTSTRAP" in line


def test_an_unset_redis_address_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PPM__REDIS__URL", raising=False)
    monkeypatch.setenv("PPM__FEATURES__STORE_YAML",
                       str(Path(__file__).parent.parent / "feature_repo"
                           / "feature_store.redis.yaml"))
    DataDir(tmp_path).training.mkdir()
    assert main(["--data-dir", str(tmp_path), "features", "get", "--item", "i1"]) == 1
    assert "PPM__REDIS__URL" in one_error_line(capsys.readouterr().err, "features get")
    # Without a registry the views are unknown: the line says how to register them.
    monkeypatch.delenv("PPM__FEATURES__STORE_YAML")
    assert main(["--data-dir", str(tmp_path), "features", "get", "--item", "i1"]) == 1
    assert "ppm features apply" in one_error_line(capsys.readouterr().err, "features get")


def test_redis_down_is_one_line(tmp_path, monkeypatch, capsys):
    from feature_repo.online_features import OnlineFeatures
    from ppm.config import Config

    OnlineFeatures.open(Config(data_dir=tmp_path))  # the registry (a file either way)
    DataDir(tmp_path).training.mkdir()  # a run
    monkeypatch.setenv("PPM__REDIS__URL", "redis://127.0.0.1:1/0")  # nothing listens there
    assert main(["--data-dir", str(tmp_path), "features", "get", "--item", "i1"]) == 1
    line = one_error_line(capsys.readouterr().err, "features get")
    assert "could not reach Redis" in line and "PPM__REDIS__URL" in line


def test_a_wrong_partition_count_is_one_line(monkeypatch, capsys, tmp_path):
    def ensure_topics(kafka):  # what streams.topics.ensure_topics raises for it
        raise ValueError("topic 'items' has 2 partitions, the layout wants 4; delete it or "
                         "change kafka.partitions")

    monkeypatch.setattr("streams.topics.ensure_topics", ensure_topics)
    assert main(["--data-dir", str(tmp_path), "topics"]) == 1
    line = one_error_line(capsys.readouterr().err, "topics")
    assert line.endswith("has 2 partitions, the layout wants 4; delete it or change "
                         "kafka.partitions")


def test_debug_shows_the_traceback_and_the_line(tmp_path, capsys):
    assert main(["--debug", "--data-dir", str(tmp_path), "stream", "--jsonl",
                 str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "FileNotFoundError" in err
    assert err.strip().splitlines()[-1].startswith("ppm stream: error: no items.jsonl in")


@pytest.mark.parametrize("command", [
    ["features", "get", "--item", "i1"], ["eval"], ["project"],
    ["experiment", "staleness"], ["experiment", "ablation"], ["train"], ["train", "--batch"]])
def test_a_read_command_refuses_a_dir_without_a_run(tmp_path, capsys, command):
    name = " ".join(w for w in command if not w.startswith("-") and w != "i1")
    for data_dir in (tmp_path / "mistyped", tmp_path / "empty"):
        if data_dir.name == "empty":
            data_dir.mkdir()
        assert main(["--data-dir", str(data_dir), *command]) == 1
        line = one_error_line(capsys.readouterr().err, name)
        assert line.endswith(f"no run in {data_dir} (nothing has been streamed there); give "
                             "--data-dir or run ppm stream/import first")
        assert not data_dir.exists() if data_dir.name == "mistyped" else not any(
            data_dir.iterdir())


def test_features_get_imports_neither_torch_nor_transformers(tmp_path):
    """``ppm features get`` reads the store alone: it takes about 1 s, not 12, as long as
    nothing on its path imports PyTorch (Feast would, see feature_repo/lean_feast.py)."""
    from feature_repo.online_features import OnlineFeatures
    from ppm.config import Config
    from ppm.records import ItemState

    store = OnlineFeatures.open(Config(data_dir=tmp_path))
    store.write_item_profiles([ItemState("i1", "sneaker", "b1", "s1", 3, 10**15, 10**15)])
    DataDir(tmp_path).training.mkdir()  # a run
    code = (
        "import sys\n"
        "from ppm.cli.commands import main\n"
        f"assert main(['--data-dir', {str(tmp_path)!r}, 'features', 'get', '--item', 'i1',"
        " '--at', 'now']) == 0\n"
        "print([m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    *shown, heavy = out.stdout.strip().splitlines()
    assert json.loads("\n".join(shown))["items"]["i1"]["category"] == "sneaker"
    assert heavy == "[]"


def test_train_follow_serves_its_metrics_and_records_each_step(tmp_path, monkeypatch, capsys):
    import urllib.request
    from types import SimpleNamespace

    from trainer.train import IncrementalTrainer

    seen = {}

    def follow(self, poll_s, once, on_step, progress):  # one step, then stop
        on_step(SimpleNamespace(promoted=True, candidate={"click": {"all": {"auc": 0.7}}},
                                champion=None, version=SimpleNamespace(name="v000001"),
                                eval_window="w", scored_by="candidate"))
        seen["url"] = url_line(capsys.readouterr().err)
        seen["metrics"] = urllib.request.urlopen(seen["url"], timeout=10).read().decode()
        return 1

    def url_line(err: str) -> str:
        return next(line for line in err.splitlines()
                    if line.startswith("training metrics at ")).split(" at ")[1]

    monkeypatch.setattr(IncrementalTrainer, "follow", follow)
    monkeypatch.setattr("trainer.train.describe", lambda result: "described")
    DataDir(tmp_path).training.mkdir()
    assert main(["--data-dir", str(tmp_path), "train", "--follow", "--variant", "idrec"]) == 0
    assert seen["url"].startswith("http://127.0.0.1:")
    assert 'ppm_training_steps_total{variant="idrec"} 1.0' in seen["metrics"]
    assert 'ppm_training_promotions_total{variant="idrec"} 1.0' in seen["metrics"]
    assert 'ppm_training_click_auc{model="candidate",variant="idrec"} 0.7' in seen["metrics"]


@pytest.mark.parametrize(("command", "said"), [
    (["features", "get"], "give --item ID and/or --user ID"),
    (["eval", "--seeds", "2", "--variant", "idrec"], "drop --variant"),
    (["eval", "--validation"], "--validation goes with --seeds"),
    (["eval", "--seeds", "1", "--validation", "--valid-share", "0"],
     "--validation needs a --valid-share in (0, 0.4)"),
    (["eval", "--test-share", "1.5"], "--test-share 1.5"),
    (["experiment", "staleness", "--seeds", "0"], "--seeds must be at least 1, got 0"),
    (["experiment", "staleness", "--tolerance", "-0.1"], "--tolerance -0.1"),
    (["experiment", "staleness", "--validation", "--valid-share", "0"],
     "--validation needs a --valid-share in (0, 0.4)"),
    (["experiment", "worlds", "--validation", "--valid-share", "0.45"],
     "--validation needs a --valid-share in (0, 0.4)"),
    (["experiment", "ablation", "--finetuned", "enc-b"], "--finetuned needs --generic"),
    (["experiment", "ablation", "--valid-share", "0.8"], "--valid-share 0.8"),
    (["experiment", "ablation", "--validation", "--valid-share", "0.45"],
     "--validation needs a --valid-share in (0, 0.4)"),
    (["import", "--items", "items.csv"], "give --items FILE and --interactions FILE"),
    (["backfill", "--simulate", "--batch-size", "0"], "--batch-size 0"),
    (["finetune", "text", "--simulate", "--test-share", "0"], "--test-share 0"),
    (["serve", "--workers", "0"], "serving.workers"),
    (["serve", "--port", "70000"], "serving.port"),
    # Were laid over the world unchecked: an empty run, exit 0.
    (["simulate", "--days", "-1"], "--days -1: simulator.days: Input should be greater"),
    (["stream", "--jsonl", "events", "--days", "2"], "--days goes with --simulate"),
    (["simulate", "--users", "0", "--seed", "3"], "--seed 3 --users 0: simulator.n_users"),
    (["stream", "--simulate", "--malformed-share", "2"], "simulator.malformed_share"),
    (["finetune", "text", "--simulate", "--days", "0"], "--days 0: simulator.days"),
    (["backfill", "--simulate", "--users", "-2"], "--users -2: simulator.n_users"),
    (["train", "--batch", "--threads", "0"], "--threads 0: give at least 1"),
])
def test_a_command_line_that_cannot_work_exits_2_before_anything_runs(tmp_path, capsys,
                                                                      command, said):
    name = " ".join(w for w in command[:2] if not w.startswith("-"))
    data_dir = tmp_path / "mistyped"  # holds no run: the usage mistake is told first
    assert main(["--data-dir", str(data_dir), *command]) == 2
    assert said in one_error_line(capsys.readouterr().err, name)
    assert not data_dir.exists()


def test_debug_shows_the_traceback_of_a_usage_error_too(tmp_path, capsys):
    assert main(["--debug", "--data-dir", str(tmp_path), "features", "get"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UsageError" in err
    assert err.strip().splitlines()[-1].startswith("ppm features get: error: give --item")


def test_stream_into_a_finished_run_is_an_error(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    class FinishedRunner:
        def __init__(self, cfg, resume=True):
            self.summary = SimpleNamespace(finished=resume)  # --fresh: not resumed

        def run(self, records, source, speed, progress):
            return SimpleNamespace(streamed=True)

    monkeypatch.setattr("streams.local_runner.LocalRunner", FinishedRunner)
    data = ["--data-dir", str(tmp_path), "stream", "--simulate", "--days", "0.01", "--quiet"]
    assert main(data) == 1
    line = one_error_line(capsys.readouterr().err, "stream")
    assert line.endswith(f"{tmp_path} holds a finished run, so there is nothing to resume; "
                         "give --fresh to stream again from the start, or another --data-dir")
    assert main([*data, "--fresh"]) == 0
    assert json.loads(capsys.readouterr().out) == {"streamed": True}


def test_failures_found_while_running_exit_1(tmp_path, monkeypatch, capsys):
    DataDir(tmp_path).training.mkdir()  # a run, with no window closed yet
    data = ["--data-dir", str(tmp_path)]
    assert main([*data, "project"]) == 1
    line = one_error_line(capsys.readouterr().err, "project")
    assert "there is no champion in" in line and "--freeze-plugin" in line
    assert main([*data, "train", "--batch", "--variant", "idrec", "--quiet"]) == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert "no closed window in the train period" in line and "stream or import" in line
    assert main([*data, "eval", "--seeds", "1", "--oracle", str(tmp_path / "nope.parquet")]) == 1
    line = one_error_line(capsys.readouterr().err, "eval")
    assert f"no oracle file {tmp_path / 'nope.parquet'}" in line and "check the path" in line


def test_a_library_systemexit_with_a_message_is_an_error_line(tmp_path, monkeypatch, capsys):
    def evaluate_champions(cfg, variants, test_share):
        raise SystemExit("no closed windows in the test period")

    monkeypatch.setattr("trainer.train.evaluate_champions", evaluate_champions)
    DataDir(tmp_path).training.mkdir()
    assert main(["--data-dir", str(tmp_path), "eval"]) == 1
    line = one_error_line(capsys.readouterr().err, "eval")
    assert line == "ppm eval: error: no closed windows in the test period"


def test_help_names_every_preset_and_what_status_reports():
    from ppm.cli.commands import build_parser
    from ppm.config import PRESETS

    parser = build_parser()
    preset = next(a for a in parser._actions if "--preset" in a.option_strings)
    assert all(f"{name} (" in preset.help for name in PRESETS)
    commands = next(a for a in parser._actions if a.dest == "command")
    status = next(c for c in commands._choices_actions if c.dest == "status")
    assert "per topic and partition" in status.help and "per worker" in status.help


def test_finetune_text_offers_exactly_the_pairs_it_can_learn_from():
    """The parser writes ``--pairs``' choices out (it must not import torch to parse); they
    are the kinds ``trainer.finetune`` knows."""
    from ppm.cli.commands import build_parser
    from trainer.finetune import PAIRS

    commands = next(a for a in build_parser()._actions if a.dest == "command")
    encoders = next(a for a in commands.choices["finetune"]._actions if a.dest == "encoder")
    pairs = next(a for a in encoders.choices["text"]._actions if "--pairs" in a.option_strings)
    assert tuple(pairs.choices) == tuple(PAIRS)
