"""Training curves: a tiny run appends its steps, epochs, validation and versions to the
registry's curves.jsonl, and ``ppm train --plot`` draws them."""

from __future__ import annotations

import json

import pytest

from ppm.cli.commands import main
from tests.test_trainer import tiny_world
from trainer.curves import CurveLog, read_curves
from trainer.plots import curves_plot
from trainer.registry import Registry
from trainer.train import IncrementalTrainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_a_batch_run_writes_its_curves_and_draws_them(tmp_path, monkeypatch, capsys):
    cfg = tiny_world(tmp_path / "run")
    for section in ("features", "model", "trainer"):  # the tiny world, for the command
        for key, value in getattr(cfg, section).model_dump(exclude_defaults=True).items():
            monkeypatch.setenv(f"PPM__{section.upper()}__{key.upper()}", str(value))
    png = tmp_path / "curves.png"
    assert main(["--data-dir", str(cfg.data_dir), "train", "--batch", "--variant", "idrec",
                 "--epochs", "3", "--valid-share", "0.2", "--quiet", "--plot", str(png)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    registry = Registry(cfg.paths.registry("idrec"))
    assert summary["curves"] == str(registry.curves_path)

    lines = read_curves(registry.curves_path)
    assert {line["run"] for line in lines} == {summary["run"]}
    steps = [line for line in lines if line["kind"] == "step"]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))  # monotone, whole
    assert all({"epoch", "loss", "lr", "samples", "samples_per_s", "time"} <= set(s)
               for s in steps)
    assert all(s["lr"] == cfg.trainer.lr and s["samples"] > 0 for s in steps)
    epochs = [line for line in lines if line["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, len(epochs) + 1))
    assert epochs[-1]["step"] == steps[-1]["step"]
    for e in epochs:
        assert set(e["train_task_losses"]) == set(cfg.model.tasks)
        assert e["train_loss"] > 0 and e["train_task_losses"]["click"] > 0
    valid = [line for line in lines if line["kind"] == "valid"]
    assert len(valid) == len(epochs) and all(0 <= v["click_auc"] <= 1 for v in valid)
    assert [line for line in lines if line["kind"] == "version"] == [
        {**lines[-1], "version": summary["version"], "promoted": True}]
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 10_000

    # A second run appends; its steps count from 1 again under its own name.
    assert main(["--data-dir", str(cfg.data_dir), "train", "--batch", "--variant", "idrec",
                 "--epochs", "1", "--quiet"]) == 0
    again = read_curves(registry.curves_path)
    runs = list(dict.fromkeys(line["run"] for line in again))
    assert len(runs) == 2 and again[: len(lines)] == lines
    assert next(s["step"] for s in again[len(lines):] if s["kind"] == "step") == 1


def test_incremental_steps_log_their_fits_decisions_and_versions(tmp_path):
    cfg = tiny_world(tmp_path, promote_tolerance=1.0)
    trainer = IncrementalTrainer(cfg, variant="idrec")
    trainer.curves = CurveLog(trainer.registry.curves_path, "idrec")
    assert trainer.follow(once=True) == 8
    lines = read_curves(trainer.registry.curves_path)
    steps = [line["step"] for line in lines if line["kind"] == "step"]
    assert steps == list(range(1, len(steps) + 1))
    assert [line["fit"] for line in lines if line["kind"] == "fit"] == list(range(1, 9))
    evals = [line for line in lines if line["kind"] == "eval"]
    versions = [line["version"] for line in lines if line["kind"] == "version"]
    assert len(evals) == 8 and all(e["promoted"] for e in evals)
    assert versions == [v.name for v in trainer.registry.versions()]
    out = curves_plot(lines, tmp_path / "follow.png")
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_a_torn_last_line_is_not_read_and_nothing_to_draw_is_an_error(tmp_path):
    log = CurveLog(tmp_path / "curves.jsonl", "ppm", run="r1")
    log.begin_fit()
    log.log_step(epoch=1, loss=float("nan"), lr=0.1, samples=4, samples_per_s=1.0)
    with open(log.path, "ab") as fh:
        fh.write(b'{"run": "r1", "kind": "st')
    lines = read_curves(log.path)
    assert [line["kind"] for line in lines] == ["fit", "step"] and lines[1]["loss"] is None
    assert read_curves(log.path, runs={"r2"}) == []
    with pytest.raises(ValueError, match="no training steps"):
        curves_plot(lines[:1], tmp_path / "none.png")
