"""Shared fixtures: the real encoders (loaded once per session) and a real Feast store."""

from __future__ import annotations

from pathlib import Path

import pytest

from ppm.config import Config


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
