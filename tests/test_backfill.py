"""Encoder versions side by side: a backfill to a new version, killed and resumed, while a
model of the old version keeps serving it; then the switch to a model of the new one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from feature_repo.item_log import ItemLog, read_item_log
from ppm.config import Config
from ppm.events import ItemEvent, ItemOp
from streams.backfill import Backfill
from streams.item_embedder import ItemEmbedder

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TITLES = ["black wool coat", "red cotton dress", "blue denim jeans", "white linen shirt",
          "grey knit sweater", "brown leather boots", "green silk scarf"]


def events() -> list[ItemEvent]:
    items = [ItemEvent(item_id=f"i{k}", event_time=T0 + timedelta(minutes=k),
                       title=f"Acme {TITLES[k % len(TITLES)]} {k}", category="coat",
                       brand="acme") for k in range(14)]
    # One item changed, one withdrawn: the backfill embeds the newest content, skips the other.
    changed = items[3].model_copy(update={"event_time": T0 + timedelta(hours=1),
                                          "title": "Acme white linen shirt, now on sale"})
    gone = ItemEvent(item_id="i5", op=ItemOp.DELETE, event_time=T0 + timedelta(hours=1))
    return [*items, changed, gone]


@pytest.mark.slow  # the real encoder's content hash
def test_the_history_is_each_contents_first_event_and_a_price_change_is_not_one(item_encoder):
    stream = events()
    cut = stream[1].model_copy(update={"event_time": T0 + timedelta(hours=2), "price": 9.0})
    starts, withdrawn = Backfill(item_encoder, None, None).history(reversed([*stream, cut]))
    assert withdrawn == {"i5"}
    assert [e.title for e in starts["i3"]] == ["Acme white linen shirt 3",
                                               "Acme white linen shirt, now on sale"]
    assert [e.event_time for e in starts["i1"]] == [T0 + timedelta(minutes=1)]  # price only
    assert len(starts["i5"]) == 1  # withdrawn, but its content is history


class Crash(RuntimeError):
    pass


@pytest.mark.slow  # two real encoders
def test_a_killed_backfill_resumes_and_the_old_version_serves_until_the_switch(
        tmp_path, item_encoder, online, cfg):
    from encoders.item_encoder import ItemEncoder
    from trainer.registry import Registry
    from trainer.serving.ranker import Ranker
    from trainer.train import new_model

    old = item_encoder
    new = ItemEncoder.from_config(Config(encoders={"image_size": 96}))
    assert new.encoder_version != old.encoder_version
    log = ItemLog(cfg.paths.item_log)
    stream = events()
    ItemEmbedder(old, online, log).process(stream)
    ids = sorted(f"i{k}" for k in range(14) if k != 5)
    newest = {e.item_id: e for e in stream if e.op is ItemOp.UPSERT}  # the later i3 wins
    want_old = dict(zip(ids, old.encode([newest[i] for i in ids]).vectors, strict=True))
    want_new = dict(zip(ids, new.encode([newest[i] for i in ids]).vectors, strict=True))

    # A model of the old version is the champion and serves.
    small = Config(model={"d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32,
                          "expert_dim": 8, "tower_dim": 8, "n_experts": 2})
    registry = Registry(cfg.paths.registry("ppm"))
    registry.promote(registry.register(new_model(small, "ppm"),
                                       {"trained_on": [], "encoder_version": old.encoder_version}))
    ranker = Ranker(online, registry, reload_every_s=0.0, cache_s=0.0)

    def serves(encoder_version: str, vectors: dict) -> None:
        ranked = ranker.rank("u1", ids)
        assert registry.champion().meta["encoder_version"] == encoder_version
        assert ranked.model_version == registry.champion().name
        assert ranked.missing["item_embedding"] == 0  # every candidate had a usable vector
        # ... of the model's version: the very vectors that encoder computes, up to float
        # rounding (the stream embedded them in other batches, whose padding differs; the
        # two versions' vectors differ by far more).
        read = ranker.items.read(ids, True, encoder_version)
        for i in ids:
            assert read[i].state.encoder_version == encoder_version
            np.testing.assert_allclose(read[i].embedding, vectors[i], rtol=0, atol=1e-6)

    serves(old.encoder_version, want_old)

    # The backfill dies after its second batch is durable.
    class Flaky:
        def __init__(self, store, fail_on: int):
            self.store, self.calls, self.fail_on = store, 0, fail_on

        def fetch_items(self, *a, **kw):
            return self.store.fetch_items(*a, **kw)

        def write_item_embeddings(self, rows, newest=True):
            assert newest is False  # a backfill never overwrites what the stream wrote
            self.calls += 1
            if self.calls == self.fail_on:
                raise Crash("store went away")
            self.store.write_item_embeddings(rows, newest)

    # Items in id order, four per batch: i0 i1 i10 i11 | i12 i13 i2 i3 (two contents) |
    # i4 i5 i6 i7 | i8 i9. The third batch reaches the item log, then the store fails.
    done = []
    with pytest.raises(Crash):
        Backfill(new, Flaky(online, fail_on=3), log, batch_size=4).run(
            stream, on_batch=lambda r: done.append(r.encoded))
    assert done == [4, 9]
    serves(old.encoder_version, want_old)  # mid-backfill: the old version still serves

    resumed = Backfill(new, online, log, batch_size=4).run(stream)
    # The log had batch three; i4, i6 and i7 were not online yet: embedded again, with i8, i9.
    assert (resumed.items, resumed.withdrawn, resumed.contents) == (13, 1, 15)
    assert (resumed.already, resumed.encoded) == (10, 5)
    assert not resumed.rejected
    serves(old.encoder_version, want_old)  # the backfill finished: still the old version
    # Every listed item is readable under the new version, by identity.
    read = online.fetch_items(ids, True, new.encoder_version)
    assert {i for i in ids if read[i].state.encoder_version == new.encoder_version} == set(ids)
    # ... and the offline log holds every content under the new version, from the event that
    # first carried it: i3's two, and the withdrawn i5's.
    table = read_item_log(cfg.paths.item_log).to_pandas()
    backfilled = table[table.encoder_version == new.encoder_version]
    assert set(backfilled.item_id) == set(ids) | {"i5"}
    assert sorted(backfilled[backfilled.item_id == "i3"].content_time.dt.minute) == [0, 3]
    assert len(backfilled.drop_duplicates(["item_id", "content_hash"])) == 15
    # A rerun has nothing left to do.
    again = Backfill(new, online, log, batch_size=4).run(stream)
    assert (again.already, again.encoded) == (15, 0)

    # The switch: promoting a model of the new version makes the server read the new one.
    registry.promote(registry.register(new_model(small, "ppm"),
                                       {"trained_on": [], "encoder_version": new.encoder_version}))
    serves(new.encoder_version, want_new)


def test_a_model_reads_only_its_own_version_and_a_backfilled_one_stands_in_for_the_recorded(
        tmp_path):
    """The staleness lab's small world (item log of version ``enc``, samples recording
    ``enc``), backfilled with version ``enc-b``: a model from scratch reads ``enc-b`` (the
    version written last) wherever the stream had an ``enc`` vector (where it had none,
    ``tests/test_features.py`` shows no version is read); a champion of ``enc`` keeps
    reading ``enc``; ``trainer.encoder_version`` picks one for a model from scratch."""
    from feature_repo.online_features import ItemEmbeddingRow
    from tests.test_staleness import T0_US, world
    from trainer.registry import Registry
    from trainer.train import IncrementalTrainer, new_model
    from trainer.windows import closed_windows

    cfg = world(tmp_path, hours=6)
    log = read_item_log(cfg.paths.item_log).to_pandas()
    ItemLog(cfg.paths.item_log).append(
        [ItemEmbeddingRow(r.item_id, -np.asarray(r.embedding, np.float32), "enc-b",
                          r.content_hash, int(r.content_time.value // 1000), T0_US + 1)
         for r in log.itertuples()], [T0_US + 1] * len(log))
    windows = closed_windows(cfg.paths.training)

    scratch = IncrementalTrainer(cfg, variant="ppm", from_scratch=True)
    assert scratch.modal.encoder_version == "enc-b"
    model = new_model(cfg, "ppm", scratch.modal.dim)
    data = scratch.dataset_for(model, windows)
    rows = data.features["target_modal_row"]
    assert (rows > 0).all()  # every sample recorded a vector then: enc-b stands in
    np.testing.assert_array_equal(
        scratch.modal.vectors[rows[:5]],
        -np.stack(log.set_index("item_id").loc[[data.item_ids[i] for i in range(5)],
                                               "embedding"].map(np.asarray).tolist()))

    registry = Registry(cfg.paths.registry("ppm"))
    registry.promote(registry.register(model, {"trained_on": [], "encoder_version": "enc"}))
    assert IncrementalTrainer(cfg, variant="ppm").modal.encoder_version == "enc"
    pinned = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(
        update={"encoder_version": "enc"})})
    assert IncrementalTrainer(pinned, variant="ppm", from_scratch=True
                              ).modal.encoder_version == "enc"
