"""Named presets and the worker's knobs in ppm.config (the rest: tests/test_config.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ppm.config import PRESETS, Config, load_config


def changed(before: Config, after: Config) -> dict[str, dict]:
    """section -> {field: new value} of every field that differs."""
    a, b = before.model_dump(), after.model_dump()
    return {section: {k: v for k, v in b[section].items() if a[section][k] != v}
            for section in b if isinstance(b[section], dict) and a[section] != b[section]}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_changes_exactly_what_it_names(name):
    cfg = Config()
    assert changed(cfg, cfg.with_preset(name)) == PRESETS[name]


def test_the_quick_preset_is_the_small_demo():
    quick = Config().with_preset("quick")
    assert (quick.simulator.days, quick.simulator.n_users, quick.simulator.initial_items,
            quick.simulator.items_per_day) == (2.0, 500, 200, 150)
    assert quick.pipeline.log_window_s == 3 * 3600 and quick.trainer.warmup_windows == 8


def test_the_fair_preset_is_world_v2_and_quick_shrinks_it():
    fair = Config().with_preset("fair")
    assert fair.simulator.world == "v2" and fair.simulator.content_signal == 1.0
    assert fair.simulator.sessions_per_user_per_day == 2.0
    quick_fair = fair.with_preset("quick")  # `ppm --preset fair demo --quick`
    assert quick_fair.simulator.world == "v2" and quick_fair.simulator.n_users == 500
    assert quick_fair.simulator.sessions_per_user_per_day == 2.0


def test_a_preset_wins_over_the_values_it_names_only():
    cfg = load_config(env={"PPM__PIPELINE__LOG_WINDOW_S": "60", "PPM__SIMULATOR__SEED": "9"})
    quick = cfg.with_preset("quick")
    assert quick.pipeline.log_window_s == 3 * 3600 and quick.simulator.seed == 9


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'fast'; presets: quick, fair, history"):
        Config().with_preset("fast")


def test_worker_knobs_keep_their_former_defaults():
    cfg = Config()
    assert cfg.kafka.retry_delays_s == (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
    assert cfg.kafka.table_cache_items == 100_000
    assert cfg.kafka.freshness_save_s == 2.0 and cfg.kafka.commit_interval_s == 1.0
    assert cfg.pipeline.behavior_batch_wait_s == 1.0


def test_retry_delays_from_the_environment_are_comma_separated():
    cfg = load_config(env={"PPM__KAFKA__RETRY_DELAYS_S": "0.5, 2,10"})
    assert cfg.kafka.retry_delays_s == (0.5, 2.0, 10.0)


@pytest.mark.parametrize("env", [
    {"PPM__KAFKA__RETRY_DELAYS_S": ""},
    {"PPM__KAFKA__RETRY_DELAYS_S": "1,0"},
    {"PPM__KAFKA__RETRY_DELAYS_S": "1,x"},
    {"PPM__KAFKA__TABLE_CACHE_ITEMS": "0"},
    {"PPM__KAFKA__FRESHNESS_SAVE_S": "0"},
    {"PPM__KAFKA__COMMIT_INTERVAL_S": "-1"},
    {"PPM__PIPELINE__BEHAVIOR_BATCH_WAIT_S": "0"},
])
def test_worker_knobs_are_validated(env):
    with pytest.raises(ValidationError):
        load_config(env=env)
