"""``serving.compile``: the ranker's compiled forward scores as the eager model does, is
reused by a newly promoted model, and steps aside (one candidate, a failed compile)."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

from ppm.config import DataDir
from tests.test_features import CONFIG, ENC, ITEMS, TARGETS, USER, MemoryStore, T
from trainer.model import UnifiedRanker
from trainer.registry import Registry
from trainer.serving.ranker import Ranker

WINDOW_S = 24 * 3600.0


def promote(registry: Registry, seed: int, variant: str = "ppm") -> None:
    torch.manual_seed(seed)
    model = UnifiedRanker(replace(CONFIG, variant=variant)).eval()
    registry.promote(registry.register(model, {"trained_on": [], "encoder_version": ENC}))


def same_ranking(a: Ranker, b: Ranker, targets: list[str]) -> None:
    want, got = a.rank(USER.user_id, targets, now=T), b.rank(USER.user_id, targets, now=T)
    assert got.item_ids == want.item_ids and got.model_version == want.model_version
    for task, scores in want.scores.items():
        torch.testing.assert_close(torch.tensor(got.scores[task]), torch.tensor(scores),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # compiles: tens of seconds the first time on a machine
@pytest.mark.parametrize("variant", ["ppm", "idrec"])
def test_a_compiled_champion_scores_as_the_eager_one_and_the_next_reuses_its_code(
        tmp_path, variant):
    registry = Registry(DataDir(tmp_path).registry(variant))
    promote(registry, seed=1, variant=variant)
    store = MemoryStore(ITEMS, WINDOW_S)
    eager = Ranker(store, registry, reload_every_s=0.0, cache_s=0.0)
    compiled = Ranker(store, registry, reload_every_s=0.0, cache_s=0.0, compile=True)
    graphs = counters["stats"]["unique_graphs"]  # compiled at load; never again below

    # Requests of other sizes (candidates, vector rows) than the example it compiled on.
    for targets in (TARGETS, TARGETS[:2], TARGETS[:1], list(reversed(TARGETS))):
        same_ranking(eager, compiled, targets)
    assert compiled.counters["compiled_requests"] == 3  # one candidate runs eagerly

    # Another model of the same configuration, other weights: loaded by the next request
    # and scored as its own, by the same compiled code (the weights are its inputs).
    promote(registry, seed=2, variant=variant)
    same_ranking(eager, compiled, TARGETS)
    assert compiled.counters["reloads"] == 2 and compiled.counters["compiled_requests"] == 4
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_failed_compile_serves_the_model_uncompiled(tmp_path, monkeypatch, caplog):
    registry = Registry(DataDir(tmp_path).registry("ppm"))
    promote(registry, seed=1)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    store = MemoryStore(ITEMS, WINDOW_S)
    with caplog.at_level(logging.WARNING, logger="trainer.serving.compiled"):
        compiled = Ranker(store, registry, cache_s=0.0, compile=True)
    assert "serving the model uncompiled" in caplog.text and "no C++ compiler" in caplog.text
    same_ranking(Ranker(store, registry, cache_s=0.0), compiled, TARGETS)
    assert compiled.counters["compiled_requests"] == 0
