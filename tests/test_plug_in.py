"""Pre-train the PPM module (the ``modal`` variant), plug it into a ``ppm`` model, frozen or
trained jointly (the paper's pre-train-then-plug-in)."""

from __future__ import annotations

import pytest
import torch

from tests.test_staleness import world
from trainer.registry import Registry
from trainer.train import new_model, plug_in, split_windows, train_batch


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
                               "encoder_version": "enc", "frozen": True}
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
    assert main([*base, "--batch", "--variant", "ppm", "--plug-in", "champion"]) == 2  # none yet
    assert main([*base, "--batch", "--variant", "modal", "--quiet"]) == 0
    capsys.readouterr()
    assert main([*base, "--batch", "--variant", "ppm", "--plug-in", "champion",
                 "--freeze-plugin", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    meta = Registry(cfg.paths.registry("ppm")).champion().meta
    assert out["version"] == meta["version"] and meta["plug_in"]["frozen"] is True
