"""One config: defaults, a TOML file, and PPM__ environment overrides, in that order; then
named presets. Each section's own knobs are checked too."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ppm.config import PRESETS, Config, describe_config_error, load_config


def test_defaults_need_no_file_or_environment():
    cfg = load_config(env={})
    assert cfg == Config()
    assert cfg.encoders.image_model == "efficientnet_lite0" and cfg.encoders.image_size == 112


def test_file_then_environment(tmp_path: Path):
    file = tmp_path / "ppm.toml"
    file.write_text('data_dir = "/srv/ppm"\n[encoders]\nimage_size = 160\nbatch_size = 32\n')
    cfg = load_config(file, env={"PPM__ENCODERS__BATCH_SIZE": "16", "PPM__SIMULATOR__SEED": "7"})
    assert cfg.data_dir == Path("/srv/ppm")
    assert cfg.encoders.image_size == 160  # from the file
    assert cfg.encoders.batch_size == 16  # the environment wins over the file
    assert cfg.simulator.seed == 7


def test_simulator_world_and_content_signal():
    assert (Config().simulator.world, Config().simulator.content_signal) == ("v1", 1.0)
    cfg = load_config(env={"PPM__SIMULATOR__WORLD": "v2",
                           "PPM__SIMULATOR__CONTENT_SIGNAL": "0.25"})
    assert (cfg.simulator.world, cfg.simulator.content_signal) == ("v2", 0.25)
    for env in ({"PPM__SIMULATOR__WORLD": "v3"}, {"PPM__SIMULATOR__CONTENT_SIGNAL": "1.5"},
                {"PPM__SIMULATOR__CONTENT_SIGNAL": "-0.1"}):
        with pytest.raises(ValidationError, match=r"simulator\."):
            load_config(env=env)


def test_config_path_from_environment(tmp_path: Path):
    file = tmp_path / "c.toml"
    file.write_text("[simulator]\ndays = 1.5\n")
    assert load_config(env={"PPM_CONFIG": str(file)}).simulator.days == 1.5


@pytest.mark.parametrize(
    "env",
    [
        {"PPM__ENCODERS__IMAGE_SIZE": "tiny"},
        {"PPM__ENCODERS__IMAGE_SZE": "160"},  # a typo is an error, not a silent default
        {"PPM__NOPE": "1"},
        {"PPM__ENCODERS__DTYPE": "int8"},
    ],
)
def test_bad_values_and_unknown_keys_are_errors(env):
    with pytest.raises(ValidationError):
        load_config(env=env)


@pytest.mark.parametrize("env, says", [
    ({"PPM__TRAINER__BATCHSIZE": "5"},
     "trainer.batchsize: no such setting (did you mean trainer.batch_size?)"),
    ({"PPM__TRAINER__XYZZY": "1"}, "trainer.xyzzy: no such setting (trainer has: variant, "),
    ({"PPM__NOPE__X": "1"}, "nope: no such setting (the config has: data_dir, encoders, "),
    ({"PPM__TRAINER__LR": "abc"}, "trainer.lr: Input should be a valid number, unable to "
                                  "parse string as a number (got 'abc')"),
    ({"PPM__TRAINER__LR": "abc", "PPM__MODEL__D_MODLE": "32"},
     "(got 'abc'); model.d_modle: no such setting (did you mean model.d_model?)"),
    ({"PPM__MODEL__TASK_WEIGHTS": "1,-1,1"},  # a list's item by its index, not as a key
     "model.task_weights[1]: Input should be greater than or equal to 0 (got '-1')"),
    ({"PPM__MODEL__N_HEADS": "3"}, "model: d_model 64 is not divisible by n_heads 3"),
    ({"PPM__REDIS__URL": "http://user:s3cret@host"},  # no password, no pydantic prefix
     "redis.url: not a redis://host:port/db URL: 'http://user:***@host'"),
])
def test_config_errors_name_each_setting_and_suggest_the_one_meant(env, says):
    with pytest.raises(ValidationError) as exc:
        load_config(env=env)
    said = describe_config_error(exc.value)
    assert says in said and "errors.pydantic.dev" not in said and "type=" not in said, said
    assert "Value error" not in said and "s3cret" not in said, said
    # --tune's values say it the same way.
    if list(env) == ["PPM__TRAINER__LR"]:
        with pytest.raises(ValueError, match=r"^trainer\.lr: Input should be a valid number"):
            Config().with_values({"lr": "abc"})
        with pytest.raises(ValueError, match=r"'batchsize'.*\(did you mean batch_size\?\)"):
            Config().with_values({"batchsize": "8"})


def test_a_long_value_is_echoed_shortened():
    with pytest.raises(ValidationError) as exc:
        load_config(env={"PPM__TRAINER__LR": "x" * 300})
    said = describe_config_error(exc.value)
    assert said.startswith("trainer.lr: Input should be a valid number") and len(said) < 200


def test_missing_file_is_an_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "absent.toml", env={})


def test_malformed_variable_name():
    with pytest.raises(ValueError, match="empty path segment"):
        load_config(env={"PPM__ENCODERS____X": "1"})


# -----------------------------------------------------------------------------
# [model]: the ranker's shape


def test_model_defaults_are_the_ranker_defaults_and_cover_its_fields():
    from dataclasses import fields

    from ppm.config import ModelConfig
    from trainer.model import RankerConfig
    from trainer.train import ranker_config

    assert ranker_config(Config(), "idrec") == RankerConfig(variant="idrec")
    # Every field a user may turn is in [model]; the others come from elsewhere.
    elsewhere = {"variant", "id_dropout", "max_seq_len", "modal_dim", "sequence_impressions"}
    assert {f.name for f in fields(RankerConfig)} == set(ModelConfig.model_fields) | elsewhere
    # The sequence a model reads: K interactions and M impressions (features.*).
    shaped = ranker_config(Config().with_values({"features.sequence_length": 20,
                                                 "features.sequence_impressions": 30}))
    assert (shaped.max_seq_len, shaped.sequence_impressions) == (50, 30)


def test_an_environment_override_reaches_the_model():
    from trainer.train import new_model

    cfg = load_config(env={"PPM__MODEL__D_MODEL": "32", "PPM__MODEL__N_HEADS": "4",
                           "PPM__MODEL__ATTENTION": "full", "PPM__MODEL__TASKS": "click,order",
                           "PPM__MODEL__TASK_WEIGHTS": "1,0.25",
                           "PPM__FEATURES__SEQUENCE_LENGTH": "20",
                           "PPM__TRAINER__ID_DROPOUT": "0.1"})
    c = new_model(cfg, "ppm", modal_dim=16).config
    assert (c.d_model, c.n_heads, c.attention) == (32, 4, "full")
    assert c.tasks == ("click", "order") and c.task_weights == (1.0, 0.25)
    assert c.max_seq_len == 20  # one knob: the store's K is the model's sequence length
    assert (c.variant, c.id_dropout, c.modal_dim) == ("ppm", 0.1, 16)
    assert new_model(cfg, "idrec").config.id_dropout == 0.0


@pytest.mark.parametrize(("env", "message"), [
    ({"PPM__MODEL__N_HEADS": "3"}, "d_model 64 is not divisible by n_heads 3"),
    ({"PPM__MODEL__TASKS": "click,view", "PPM__MODEL__TASK_WEIGHTS": "1,1"},
     r"unknown tasks \['view'\]"),
    ({"PPM__MODEL__TASKS": "click,click", "PPM__MODEL__TASK_WEIGHTS": "1,1"}, "twice"),
    ({"PPM__MODEL__TASKS": "click"}, "1 tasks but 3 task_weights"),
    ({"PPM__MODEL__TASK_WEIGHTS": "1,-1,1"}, "greater than or equal to 0"),
    ({"PPM__MODEL__DROPOUT": "1.5"}, r"model\.dropout"),
    ({"PPM__MODEL__ATTENTION": "sparse"}, r"model\.attention"),
    ({"PPM__MODEL__ITEM_BUCKETS": "1"}, r"model\.item_buckets"),
    ({"PPM__MODEL__D_MODLE": "32"}, r"model\.d_modle"),
    ({"PPM__FEATURES__SEQUENCE_LENGTH": "0"}, r"features\.sequence_length"),
])
def test_a_bad_model_value_is_refused_with_a_clear_error(env, message):
    with pytest.raises(ValidationError, match=message):
        load_config(env=env)


def test_trainer_and_serving_knobs_come_from_the_config():
    cfg = load_config(env={"PPM__TRAINER__GRAD_CLIP": "1.5", "PPM__TRAINER__REPLAY_WINDOWS": "3",
                           "PPM__SERVING__MAX_CANDIDATES": "5",
                           "PPM__SERVING__RELOAD_EVERY_S": "0"})
    assert (cfg.trainer.grad_clip, cfg.trainer.replay_windows) == (1.5, 3)
    assert (cfg.serving.max_candidates, cfg.serving.reload_every_s) == (5, 0.0)
    with pytest.raises(ValidationError, match=r"serving\.max_body_bytes"):
        load_config(env={"PPM__SERVING__MAX_BODY_BYTES": "0"})


# -----------------------------------------------------------------------------
# Presets: named overrides laid over a config


def changed(before: Config, after: Config) -> dict[str, dict]:
    """section -> {field: new value} of every field that differs."""
    a, b = before.model_dump(), after.model_dump()
    return {section: {k: v for k, v in b[section].items() if a[section][k] != v}
            for section in b if isinstance(b[section], dict) and a[section] != b[section]}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_changes_exactly_what_it_names(name):
    # ``static`` names the defaults (no drift): seen from the drifting world it changes them.
    cfg = Config().with_preset("drifting") if name == "static" else Config()
    assert changed(cfg, cfg.with_preset(name)) == PRESETS[name]


def test_the_quick_preset_is_the_small_demo():
    quick = Config().with_preset("quick")
    assert (quick.simulator.days, quick.simulator.n_users, quick.simulator.initial_items,
            quick.simulator.items_per_day) == (2.0, 500, 200, 150)
    assert quick.pipeline.log_window_s == 3 * 3600 and quick.trainer.warmup_windows == 8


def test_a_preset_wins_over_the_values_it_names_only():
    cfg = load_config(env={"PPM__PIPELINE__LOG_WINDOW_S": "60", "PPM__SIMULATOR__SEED": "9"})
    quick = cfg.with_preset("quick")
    assert quick.pipeline.log_window_s == 3 * 3600 and quick.simulator.seed == 9


def test_the_fair_preset_is_world_v2_and_quick_shrinks_it():
    fair = Config().with_preset("fair")
    assert fair.simulator.world == "v2" and fair.simulator.content_signal == 1.0
    assert fair.simulator.sessions_per_user_per_day == 2.0
    quick_fair = fair.with_preset("quick")  # `ppm --preset fair demo --quick`
    assert quick_fair.simulator.world == "v2" and quick_fair.simulator.n_users == 500
    assert quick_fair.simulator.sessions_per_user_per_day == 2.0


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'fast'; presets: quick, fair, "
                       "drifting, static, history"):
        Config().with_preset("fast")


# -----------------------------------------------------------------------------
# The Faust worker's knobs ([kafka], pipeline.behavior_batch_wait_s)


def test_worker_knobs_keep_their_former_defaults():
    cfg = Config()
    assert cfg.kafka.retry_delays_s == (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
    assert cfg.kafka.table_cache_items == 100_000
    assert cfg.kafka.freshness_save_s == 2.0 and cfg.kafka.commit_interval_s == 1.0
    assert cfg.pipeline.behavior_batch_wait_s == 1.0
    # /metrics on the loopback, a free port each: several workers on one host never collide.
    assert (cfg.kafka.metrics_host, cfg.kafka.metrics_port) == ("127.0.0.1", 0)


def test_retry_delays_from_the_environment_are_comma_separated():
    cfg = load_config(env={"PPM__KAFKA__RETRY_DELAYS_S": "0.5, 2,10"})
    assert cfg.kafka.retry_delays_s == (0.5, 2.0, 10.0)


@pytest.mark.parametrize("env", [
    {"PPM__KAFKA__RETRY_DELAYS_S": ""},
    {"PPM__KAFKA__RETRY_DELAYS_S": "1,0"},
    {"PPM__KAFKA__RETRY_DELAYS_S": "1,x"},
    {"PPM__KAFKA__TABLE_CACHE_ITEMS": "0"},
    {"PPM__KAFKA__FRESHNESS_SAVE_S": "0"},
    {"PPM__KAFKA__FRESHNESS_ITEMS_PART_S": "-1"},
    {"PPM__KAFKA__METRICS_PORT": "-2"},
    {"PPM__KAFKA__METRICS_PORT": "65536"},
    {"PPM__KAFKA__COMMIT_INTERVAL_S": "-1"},
    {"PPM__PIPELINE__BEHAVIOR_BATCH_WAIT_S": "0"},
])
def test_worker_knobs_are_validated(env):
    with pytest.raises(ValidationError):
        load_config(env=env)


def test_the_redis_address_is_one_url_in_the_config():
    assert Config().redis.url is None
    cfg = load_config(env={"PPM__REDIS__URL": "redis://:s3cret@cache:6380/4"})
    assert cfg.redis.url == "redis://:s3cret@cache:6380/4"
    assert cfg.redis.feast_connection_string() == "cache:6380,db=4,password=s3cret"
    assert load_config(env={"PPM__REDIS__URL": "redis://h"}).redis.feast_connection_string() \
        == "h:6379,db=0"
    assert "ssl=true" in load_config(
        env={"PPM__REDIS__URL": "rediss://h:1/0"}).redis.feast_connection_string()
    with pytest.raises(ValueError, match="PPM__REDIS__URL"):
        Config().redis.feast_connection_string()


@pytest.mark.parametrize("url", ["127.0.0.1:6379", "http://h:1/0", "redis://h:x/0",
                                 "redis://h:1/db"])
def test_a_redis_address_that_is_not_a_redis_url_is_refused(url):
    with pytest.raises(ValidationError, match="redis"):
        load_config(env={"PPM__REDIS__URL": url})


@pytest.mark.parametrize("url", ["redis://:p%2Cw@h/0", "redis://[::1]:6379/0",
                                 "redis://:null@h/0", "redis://:true@h/0", "redis://:1.50@h/0",
                                 "redis://u%3Dx:pw@h/0"])
def test_a_redis_url_feast_would_misread_is_refused(url):
    from ppm.config import RedisConfig

    with pytest.raises(ValueError):
        RedisConfig(url=url)


def test_a_redis_url_becomes_feasts_connection_string():
    from ppm.config import RedisConfig

    assert RedisConfig(url="rediss://u:pa%40ss@cache:7000/3").feast_connection_string() == (
        "cache:7000,db=3,username=u,password=pa@ss,ssl=true")
    assert RedisConfig(url="redis://:123@h/0").feast_connection_string() == (
        "h:6379,db=0,password=123")


def test_the_wide_part_reaches_the_variants_with_ids_and_needs_click_rates():
    from trainer.train import ranker_config

    cfg = load_config(env={"PPM__MODEL__WIDE_RATES": "true"})
    assert ranker_config(cfg, "idrec").wide_rates and ranker_config(cfg, "ppm").wide_rates
    assert not ranker_config(cfg, "modal").wide_rates  # the plug-in's pre-training still runs
    with pytest.raises(ValueError, match="needs id_rates"):
        load_config(env={"PPM__MODEL__WIDE_RATES": "true", "PPM__MODEL__ID_RATES": "false"})
    # On by default, it goes with the rates when they are turned off.
    no_rates = load_config(env={"PPM__MODEL__ID_RATES": "false"})
    assert not no_rates.model.wide_rates and not ranker_config(no_rates, "idrec").wide_rates
    assert not no_rates.with_preset("quick").model.wide_rates  # and stays off when re-read
    # ... and follows them both ways when they are tuned (ppm train --tune id_rates=...).
    assert not Config().with_values({"id_rates": "false"}).model.wide_rates
    assert no_rates.with_values({"id_rates": "true"}).model.wide_rates
    asked = load_config(env={"PPM__MODEL__WIDE_RATES": "false"})
    assert not asked.with_values({"id_rates": "true"}).with_preset("quick").model.wide_rates
