"""The model registry: concurrent trainers never share a version, crashes leave none half
written, and only complete versions can become the champion."""

from __future__ import annotations

import json
import multiprocessing
import queue
import threading
from pathlib import Path

import pytest
import torch

from ppm.data_dir import DataDir
from trainer.model import RankerConfig, UnifiedRanker, load_checkpoint
from trainer.registry import Registry, Version

WRITERS, PER_WRITER = 4, 5


def tiny_model(seed: int) -> UnifiedRanker:
    """A model of a few thousand weights whose values depend on ``seed``."""
    torch.manual_seed(seed)
    return UnifiedRanker(RankerConfig(
        variant="idrec", item_buckets=64, category_buckets=8, brand_buckets=8, shop_buckets=8,
        user_buckets=8, max_seq_len=4, modal_dim=8, d_model=8, n_heads=2, n_layers=1,
        d_ff=16, side_dim=4, n_experts=2, expert_dim=8, tower_dim=8))


def fingerprint(model: UnifiedRanker) -> float:
    return float(sum(p.double().sum() for p in model.state_dict().values()))


def register_many(root: str, writer: int, start, results) -> None:
    """One trainer: ``PER_WRITER`` registrations, each with its own weights and meta; puts
    one message, the list of (name, meta) it got, or the error that stopped it."""
    done = []
    # A forked child must not enter OpenMP: the parent's thread pool did not come along, and
    # a parallel region (a large enough tensor) would wait for it forever.
    torch.set_num_threads(1)
    try:
        registry = Registry(Path(root))
        start.wait(timeout=60)  # all writers race for the same first names
        for k in range(PER_WRITER):
            model = tiny_model(seed=writer * 100 + k)
            version = registry.register(model, {"writer": writer, "k": k, "trained_on": [],
                                                "fingerprint": fingerprint(model)})
            done.append((version.name, version.meta))
    except BaseException as exc:  # reported to the test, which fails with it
        results.put(f"writer {writer} after {len(done)}: {exc!r}")
    else:
        results.put(done)


@pytest.mark.parametrize("kind", ["processes", "threads"])
def test_concurrent_registrations_get_distinct_whole_versions(tmp_path, kind):
    root = str(DataDir(tmp_path).registry("idrec"))
    if kind == "processes":
        # fork: the writers need no import of this test module (spawn would).
        ctx = multiprocessing.get_context("fork")
        start, results, spawn = ctx.Event(), ctx.Queue(), ctx.Process
    else:
        start, results, spawn = threading.Event(), queue.Queue(), threading.Thread
    writers = [spawn(target=register_many, args=(root, w, start, results))
               for w in range(WRITERS)]
    for w in writers:
        w.start()
    start.set()
    reports = [results.get(timeout=120) for _ in range(WRITERS)]
    for w in writers:
        w.join(timeout=60)
    assert not [r for r in reports if isinstance(r, str)], reports
    got = [pair for report in reports for pair in report]

    names = [name for name, _ in got]
    assert len(set(names)) == len(names) == WRITERS * PER_WRITER
    registry = Registry(Path(root))
    stored = {v.name: v for v in registry.versions()}
    assert set(stored) == set(names)
    for name, meta in got:
        version = stored[name]
        # What is on disk is what this version's registerer wrote, model and meta alike.
        assert version.meta == json.loads(json.dumps(meta)) and meta["version"] == name
        model, extra = load_checkpoint(version.model_path)
        assert extra == {"version": name}
        assert fingerprint(model) == pytest.approx(meta["fingerprint"], rel=1e-12)
    assert {(m["writer"], m["k"]) for _, m in got} == {
        (w, k) for w in range(WRITERS) for k in range(PER_WRITER)}
    assert not list(registry.versions_dir.glob(".*"))  # no temporary left


def test_a_crash_mid_write_leaves_no_version_and_blocks_nothing(tmp_path, monkeypatch):
    import trainer.model

    registry = Registry(tmp_path)
    real_save = trainer.model.save_checkpoint

    def crash(path, model, extra):
        Path(path).write_bytes(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(trainer.model, "save_checkpoint", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        registry.register(tiny_model(0), {"step": 1, "trained_on": []})
    monkeypatch.setattr(trainer.model, "save_checkpoint", real_save)

    assert registry.versions() == [] and registry.champion() is None
    (claim,) = (tmp_path / "versions").glob("v*")
    assert list(claim.iterdir()) == []  # an empty claim, not a version
    # Nobody can promote a version that is not whole (here: never will be).
    with pytest.raises(ValueError, match="not a complete version"):
        registry.promote(Version(claim.name, claim, {}))
    assert registry.champion() is None

    version = registry.register(tiny_model(1), {"step": 2, "trained_on": []})
    assert version.name > claim.name  # the dead claim is skipped, not reused
    registry.promote(version)
    assert registry.champion() == version
    assert [v.name for v in registry.versions()] == [version.name]


def test_a_leftover_temporary_folder_from_an_old_crash_is_cleared(tmp_path):
    registry = Registry(tmp_path)
    stale = tmp_path / "versions" / ".v000001.tmp"
    stale.mkdir()
    (stale / "model.pt").write_bytes(b"junk")
    version = registry.register(tiny_model(0), {"step": 1, "trained_on": []})
    assert version.name == "v000001" and not stale.exists()
    assert sorted(p.name for p in version.path.iterdir()) == ["meta.json", "model.pt"]
    assert load_checkpoint(version.model_path)[1] == {"version": "v000001"}


def test_a_version_says_what_it_trained_on_and_keeps_its_item_vocabulary(tmp_path):
    from trainer.features import IdVocabulary

    registry = Registry(tmp_path)
    with pytest.raises(ValueError, match="trained_on"):
        registry.register(tiny_model(0), {"step": 1})
    assert registry.versions() == []
    model = tiny_model(0)
    model.item_vocabulary = IdVocabulary({"a": 3, "b": 1}, min_count=2)
    version = registry.register(model, {"trained_on": ["20260101T000000Z.parquet"]})
    loaded = registry.load(version)
    assert loaded.item_vocabulary == model.item_vocabulary
    assert loaded.item_vocabulary.admits(["a", "b", "c", None]).tolist() == [
        True, False, False, False]
    assert registry.load(registry.register(tiny_model(1), {"trained_on": []})
                         ).item_vocabulary is None
