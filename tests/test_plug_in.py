"""Pre-train the PPM module (the ``modal`` variant), plug it into a ``ppm`` model, frozen or
trained jointly (the paper's pre-train-then-plug-in)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_staleness import world
from trainer.registry import Registry
from trainer.train import new_model, plug_in, projection_key, split_windows, train_batch


def _ppm_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.ppm.state_dict().items()}


def test_a_plugged_in_module_stays_as_pretrained_when_frozen_and_trains_when_not(tmp_path):
    cfg = world(tmp_path, hours=24)
    split = split_windows(cfg, 0.2, 0.1)
    modal = Registry(cfg.paths.registry("modal"))
    pretrained = train_batch(cfg, split.train, "modal", epochs=2, progress=False,
                             valid=split.valid)
    source = modal.register(pretrained.model, pretrained.meta())
    weights = _ppm_state(pretrained.model)

    frozen = train_batch(cfg, split.train, "ppm", epochs=2, progress=False, valid=split.valid,
                         plug_in_from=source, freeze_plugin=True)
    assert all(torch.equal(weights[k], v) for k, v in frozen.model.ppm.state_dict().items())
    meta = frozen.meta()
    assert meta["plug_in"] == {"version": source.name, "variant": "modal",
                               "encoder_version": "enc", "frozen": True,
                               "projection": projection_key(frozen.model)}
    # Training read the plug-in's outputs, projected once: the same batch as the raw one.
    raw = frozen.trainer.dataset_for(frozen.model, split.valid)
    projected = frozen.trainer.dataset_for(frozen.model, split.valid)
    projected.project_with(frozen.model.ppm)
    rows = np.arange(min(64, raw.n))
    with torch.no_grad():
        torch.testing.assert_close(frozen.model.eval()(projected.batch(rows))[0],
                                   frozen.model(raw.batch(rows))[0])
    total = sum(p.numel() for p in frozen.model.parameters())
    plugin = sum(p.numel() for p in frozen.model.ppm.parameters())
    assert meta["trainable_parameters"] == total - plugin
    # The rest did train: the ID module moved from its (seeded) initial weights.
    initial = new_model(cfg, "ppm", frozen.model.config.modal_dim).id_module.state_dict()
    assert any(not torch.equal(initial[k], v)
               for k, v in frozen.model.id_module.state_dict().items())

    joint = train_batch(cfg, split.train, "ppm", epochs=2, progress=False, valid=split.valid,
                        plug_in_from=source)
    moved = [k for k, v in joint.model.ppm.state_dict().items() if not torch.equal(weights[k], v)]
    assert moved and joint.meta()["plug_in"]["frozen"] is False
    assert joint.meta()["trainable_parameters"] == total


def test_a_plug_in_of_another_shape_or_a_model_without_ppm_is_refused(tmp_path):
    cfg = world(tmp_path, hours=12)
    split = split_windows(cfg, 0.2, 0.1)
    modal = Registry(cfg.paths.registry("modal"))
    pretrained = train_batch(cfg, split.train, "modal", epochs=1, progress=False)
    source = modal.register(pretrained.model, pretrained.meta())
    wider = cfg.model_copy(update={"model": cfg.model.model_copy(update={"d_model": 16})})
    with pytest.raises(ValueError, match="does not fit"):
        train_batch(wider, split.train, "ppm", epochs=1, progress=False, plug_in_from=source)
    idrec = train_batch(cfg, split.train, "idrec", epochs=1, progress=False)
    with pytest.raises(ValueError, match="no PPM module"):
        plug_in(idrec.model, source)


def test_the_command_pre_trains_plugs_in_and_refuses_a_plug_in_without_batch(tmp_path, capsys):
    import json

    from ppm.cli.commands import main

    cfg = world(tmp_path, hours=24)
    toml = tmp_path / "ppm.toml"
    toml.write_text("[features]\nsequence_length = 4\n[model]\n" + "".join(
        f"{k} = {v}\n" for k, v in cfg.model.model_dump().items()
        if k in ("item_buckets", "category_buckets", "brand_buckets", "shop_buckets", "d_model",
                 "n_heads", "n_layers", "d_ff", "side_dim", "n_experts", "expert_dim",
                 "tower_dim", "user_buckets"))
        + "[trainer]\ninitial_epochs = 1\nbatch_size = 64\nlr = 0.01\nthreads = 1\n")
    base = ["--config", str(toml), "--data-dir", str(tmp_path), "train"]
    assert main([*base, "--plug-in", "champion"]) == 2
    assert main([*base, "--batch", "--variant", "ppm", "--plug-in", "champion"]) == 1  # none yet
    assert main([*base, "--batch", "--variant", "modal", "--quiet"]) == 0
    capsys.readouterr()
    assert main([*base, "--batch", "--variant", "ppm", "--plug-in", "champion",
                 "--freeze-plugin", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    meta = Registry(cfg.paths.registry("ppm")).champion().meta
    assert out["version"] == meta["version"] and meta["plug_in"]["frozen"] is True


def test_a_frozen_plug_in_serves_from_stored_outputs_and_scores_as_from_raw_vectors(
        tmp_path, online, cfg):
    """Two servers of one model on the real Feast store: one reads the raw vectors, the
    other the plug-in's stored outputs (d_model floats). Same scores; the second reads no
    raw vector until an item changes after its output was written, and then only that one,
    once: the output it computes is written back."""
    from datetime import UTC, datetime

    from feature_repo.online_features import ItemEmbeddingRow
    from ppm.records import ItemState, UserSequence
    from trainer.model import RankerConfig, UnifiedRanker
    from trainer.serving.projection import project_items
    from trainer.serving.ranker import Ranker
    from trainer.train import projection_key

    t = int(datetime(2026, 1, 1, 12, tzinfo=UTC).timestamp() * 1e6)
    ids = [f"i{k}" for k in range(6)]
    rng = np.random.default_rng(0)

    def embed(item_ids, content):
        online.write_item_embeddings([ItemEmbeddingRow(
            i, rng.normal(size=8).astype(np.float32), "enc", f"{i}:{content}", t - 60, t)
            for i in item_ids])

    online.write_item_profiles([ItemState(i, "coat", "acme", "s1", 3, t - 3600, t - 60,
                                          encoder_version="enc") for i in ids])
    embed(ids, 1)
    online.write_sequences([UserSequence("u1", ("i0", "i1"), ("click", "click"),
                                         (t - 600, t - 300))])
    torch.manual_seed(0)
    model = UnifiedRanker(RankerConfig(variant="ppm", modal_dim=8, max_seq_len=4,
                                       item_buckets=64, category_buckets=16, brand_buckets=16,
                                       shop_buckets=16, price_buckets=8, gap_buckets=8)).eval()
    key = projection_key(model)
    servers = {}
    for name, plug in (("raw", None), ("projected", {"frozen": True, "projection": key})):
        registry = Registry(tmp_path / name)
        registry.promote(registry.register(model, {"trained_on": [], "encoder_version": "enc",
                                                   "plug_in": plug}))
        servers[name] = Ranker(online, registry, cache_s=0.0)
    assert project_items(online, model, "enc", key, ids) == 6

    raw_reads = []
    fetch = online.fetch_items

    def spy(item_ids, with_embeddings=False, encoder_version=None):
        if with_embeddings:
            raw_reads.append(sorted(item_ids))
        return fetch(item_ids, with_embeddings, encoder_version)

    online.fetch_items = spy
    try:
        for changed in (False, True, False):
            if changed:
                embed(["i2"], 2)  # i2's content changed since its output was written
            raw_reads.clear()
            got = servers["projected"].rank("u1", ids, now=t)
            servers["projected"].flush()
            projected_reads = list(raw_reads)
            want = servers["raw"].rank("u1", ids, now=t)
            assert got.item_ids == want.item_ids
            np.testing.assert_allclose(got.scores["click"], want.scores["click"], rtol=1e-5)
            assert got.missing == want.missing
            assert projected_reads == ([["i2"]] if changed else [])
        assert servers["projected"].counters["plugin_outputs_computed"] == 1

        # A write back that fails is counted; the output is kept in the item cache meanwhile.
        cached = Ranker(online, registry, cache_s=60.0)
        embed(["i3"], 3)
        write = online.write_projections
        online.write_projections = lambda rows, projection: 1 / 0
        try:
            for _ in range(2):
                cached.rank("u1", ids, now=t)
                cached.flush()
        finally:
            online.write_projections = write
        assert cached.counters["plugin_outputs_computed"] == 1
        assert cached.counters["plugin_output_write_errors"] == 1
        cached.close()
    finally:
        online.fetch_items = fetch
