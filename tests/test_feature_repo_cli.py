"""feature_repo/ as a Feast repo: ``feast -c feature_repo plan|apply`` sees the objects ppm
registers, on the stores ppm uses; ppm opens the store from the same yaml, fills its
variables itself and leaves no ``feature_store.yaml`` in the data dir for ``feast apply``
to wipe views from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ppm.config import Config, RedisConfig
from ppm.records import ItemState

REPO = Path(__file__).resolve().parents[1]
FEAST = Path(sys.executable).with_name("feast")
VIEWS = {"item_embedding", "item_embedding_by_version", "item_projection", "item_profile",
         "user_sequence"}


def feast(*args: str, data_dir: Path) -> str:
    """Run Feast's own CLI on feature_repo/ for ``data_dir``; its output."""
    env = {**os.environ, "PPM__DATA_DIR": str(data_dir)}
    env.pop("PPM__REDIS__URL", None)
    done = subprocess.run([str(FEAST), "-c", str(REPO / "feature_repo"), *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    return out


def profile(item_id: str, updated_us: int) -> ItemState:
    return ItemState(item_id=item_id, category="shoes", brand="b1", shop="s1", price_bucket=3,
                     first_seen_us=1, updated_us=updated_us, deleted=False)


@pytest.mark.slow  # two runs of Feast's CLI: importing Feast takes it 5-10 s each
def test_feasts_cli_plans_and_applies_what_ppm_registers_and_reads_what_ppm_wrote(
        tmp_path, monkeypatch):
    from feast import FeatureStore

    from feature_repo.online_features import ItemEmbeddingRow, OnlineFeatures

    data = tmp_path / "data"
    online = OnlineFeatures.open(Config(data_dir=data))
    online.write_item_profiles([profile("i1", 2_000_000)])
    online.write_item_embeddings([ItemEmbeddingRow("i1", np.ones(4, np.float32), "v1", "h",
                                                   2_000_000, 3_000_000)])
    assert not (data / "feast" / "feature_store.yaml").exists()

    plan = feast("plan", data_dir=data)
    # The same objects: Feast would change nothing, above all delete no view. (Its infra
    # diff may list the SQLite tables as created: the SDK's apply, which ppm uses, does not
    # record them in the registry as `feast apply` does; creating them is IF NOT EXISTS.)
    assert "No changes to registry" in plan and "Deleted" not in plan, plan
    apply = feast("apply", data_dir=data)
    assert "Deleted" not in apply, apply

    # Feast's SDK on feature_repo/ (its yaml, PPM__DATA_DIR from the environment) reads
    # what ppm wrote, and ppm reads what the registry now holds.
    monkeypatch.setenv("PPM__DATA_DIR", str(data))
    store = FeatureStore(repo_path=str(REPO / "feature_repo"))
    assert {v.name for v in store.list_feature_views()} == VIEWS
    got = store.get_online_features(
        features=["item_profile:category", "item_embedding:embedding"],
        entity_rows=[{"item_id": "i1"}]).to_dict()
    assert got["category"] == ["shoes"]
    assert got["embedding"][0] == pytest.approx([1.0] * 4)
    again = OnlineFeatures.open(Config(data_dir=data), apply=False)
    assert again.read_items(["i1"])["i1"].state.category == "shoes"


def test_feasts_cli_refuses_an_unset_or_relative_data_dir(monkeypatch):
    import importlib

    monkeypatch.delenv("PPM__DATA_DIR", raising=False)
    sys.modules.pop("feature_repo.repo", None)
    with pytest.raises(RuntimeError, match="PPM__DATA_DIR"):
        importlib.import_module("feature_repo.repo")
    monkeypatch.setenv("PPM__DATA_DIR", "ppm-data")
    with pytest.raises(RuntimeError, match="absolute"):
        importlib.import_module("feature_repo.repo")


def test_the_repo_module_holds_ppms_objects_once(tmp_path, monkeypatch):
    import importlib

    from feast import Entity, FeatureService, FeatureView

    from feature_repo.feature_definitions import feature_definitions

    monkeypatch.setenv("PPM__DATA_DIR", str(tmp_path))
    sys.modules.pop("feature_repo.repo", None)
    repo = importlib.import_module("feature_repo.repo")
    sys.modules.pop("feature_repo.repo", None)
    found = [v for k, v in vars(repo).items() if not k.startswith("_")
             and isinstance(v, Entity | FeatureView | FeatureService)]
    assert sorted(o.name for o in found) == sorted(o.name for o in feature_definitions(
        tmp_path).all() if isinstance(o, Entity | FeatureView | FeatureService))
    assert {o.name for o in found if isinstance(o, FeatureView)} == VIEWS
    assert repo.item_embedding == feature_definitions(tmp_path).item_embedding
    # Only repo.py is imported by Feast: the others define nothing at module level.
    ignored = (REPO / "feature_repo" / ".feastignore").read_text().split()
    imported = sorted(p.name for p in (REPO / "feature_repo").glob("*.py")
                      if p.name not in ignored)
    assert imported == ["__init__.py", "repo.py"], "list a new module in .feastignore"


def test_ppm_fills_the_yaml_with_its_data_dir_and_removes_its_old_copy(tmp_path):
    from feature_repo.online_features import OnlineFeatures, store_config

    cfg = Config(data_dir=tmp_path / "data")
    legacy = cfg.paths.feast_repo / "feature_store.yaml"
    legacy.parent.mkdir(parents=True)
    legacy.write_text("project: ppm\n")
    config = store_config(cfg)
    assert config.registry.path == str(tmp_path / "data" / "feast" / "registry.db")
    assert config.online_store.path == str(tmp_path / "data" / "feast" / "online_store.db")
    OnlineFeatures.open(cfg)
    assert not legacy.exists()
    assert (cfg.paths.feast_repo / "registry.db").exists()


def test_a_redis_url_alone_chooses_the_redis_yaml_in_feasts_form(tmp_path):
    from feature_repo.online_features import store_config, store_yaml

    cfg = Config(data_dir=tmp_path, redis=RedisConfig(url="redis://10.0.0.5:6390/3"))
    assert store_yaml(cfg).name == "feature_store.redis.yaml"
    config = store_config(cfg)
    assert config.online_store.type == "redis"
    assert config.online_store.connection_string == "10.0.0.5:6390,db=3"
    assert store_yaml(Config(data_dir=tmp_path)).name == "feature_store.yaml"


def test_the_redis_yaml_without_a_url_names_the_variable(tmp_path):
    from feature_repo.online_features import store_config

    cfg = Config(data_dir=tmp_path, features={
        "store_yaml": REPO / "feature_repo" / "feature_store.redis.yaml"})
    with pytest.raises(ValueError, match="PPM__REDIS__URL"):
        store_config(cfg)


def test_other_variables_come_from_the_environment(tmp_path, monkeypatch):
    from feature_repo.online_features import store_config

    custom = tmp_path / "fs.yaml"
    custom.write_text("project: ${MY_PROJECT}\nprovider: local\nregistry: reg.db\n"
                      "online_store:\n  type: sqlite\n  path: online.db\n"
                      "entity_key_serialization_version: 3\n")
    cfg = Config(data_dir=tmp_path / "data", features={"store_yaml": custom})
    monkeypatch.delenv("MY_PROJECT", raising=False)
    with pytest.raises(ValueError, match="MY_PROJECT"):
        store_config(cfg)
    monkeypatch.setenv("MY_PROJECT", "mine")
    assert store_config(cfg).project == "mine"
    # Relative paths resolve under DATA_DIR/feast/, as before.
    assert store_config(cfg).repo_path == (tmp_path / "data" / "feast").resolve()


def test_ppm_prints_the_settings_it_resolved_for_feasts_cli(tmp_path, monkeypatch, capsys):
    import yaml

    from ppm.cli.commands import main

    monkeypatch.setenv("PPM__REDIS__URL", "redis://127.0.0.1:6399/2")
    assert main(["--data-dir", str(tmp_path), "features", "yaml"]) == 0
    settings = yaml.safe_load(capsys.readouterr().out)
    assert settings["online_store"] == {"type": "redis",
                                        "connection_string": "127.0.0.1:6399,db=2"}
    assert settings["registry"] == str(tmp_path.resolve() / "feast" / "registry.db")
