"""One config: defaults, a TOML file, and PPM__ environment overrides, in that order."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ppm.config import Config, load_config


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


def test_missing_file_is_an_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "absent.toml", env={})


def test_malformed_variable_name():
    with pytest.raises(ValueError, match="empty path segment"):
        load_config(env={"PPM__ENCODERS____X": "1"})
