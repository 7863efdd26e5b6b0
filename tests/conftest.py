"""Shared fixtures: the real encoders (loaded once per session) and a real Feast store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ppm.config import Config


@pytest.fixture(autouse=True)
def _no_settings_from_the_shell(monkeypatch):
    """Each test sees only the settings it makes: a developer's shell may export
    ``PPM__...`` variables (``source .run/env`` sets ``PPM__REDIS__URL``, which would send
    every store to their Redis) or ``PPM_CONFIG``. The servers fixture reads its
    ``PPM__KAFKA__BOOTSTRAP``/``PPM__REDIS__URL`` before this runs (session scope first)."""
    for name in list(os.environ):
        if name.startswith("PPM__") or name == "PPM_CONFIG":
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def item_encoder():
    """The default ItemEncoder (packaged MiniLM + EfficientNet-Lite0); loading takes seconds."""
    from encoders.item_encoder import ItemEncoder

    return ItemEncoder.from_config(Config())


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    """A config whose data (Feast store, logs, windows) lives in the test's tmp folder."""
    return Config(data_dir=tmp_path / "data")


@pytest.fixture
def online(cfg: Config):
    """A registered Feast store on SQLite (the embedded default), empty."""
    from feature_repo.online_features import OnlineFeatures

    return OnlineFeatures.open(cfg)
