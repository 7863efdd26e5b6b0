"""ItemEmbedder on the real Feast SQLite store: push, read back, order and duplicates, deletes,
staleness, and the offline item log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from feature_repo.item_log import ItemLog, read_item_log
from ppm.clock import to_us
from ppm.events import ItemEvent, ItemOp
from streams.item_embedder import ItemEmbedder

T0 = datetime(2026, 1, 1, tzinfo=UTC)
pytestmark = pytest.mark.slow  # loads the pretrained encoders once per session


def item(item_id: str, minutes: float, title: str = "Acme black wool coat", **kw) -> ItemEvent:
    return ItemEvent(item_id=item_id, event_time=T0 + timedelta(minutes=minutes), title=title,
                     category=kw.pop("category", "coat"), brand="acme", shop="s1",
                     price=kw.pop("price", 50.0), **kw)


def delete(item_id: str, minutes: float) -> ItemEvent:
    return ItemEvent(item_id=item_id, op=ItemOp.DELETE, event_time=T0 + timedelta(minutes=minutes))


@pytest.fixture
def embedder(item_encoder, online, cfg):
    return ItemEmbedder(item_encoder, online, ItemLog(cfg.paths.item_log))


def test_the_item_log_records_how_a_version_is_made_before_any_vector_of_it(
        embedder, online, item_encoder, cfg):
    """What an evaluation reads to tell whether the vectors' encoder learned from clicks
    (``trainer.finetune.check_vector_periods``); a restarted writer records the same."""
    from feature_repo.item_log import version_provenance, versions_folder

    recorded = version_provenance(cfg.paths.item_log, item_encoder.encoder_version)
    assert recorded == item_encoder.provenance
    assert recorded["settings"]["text"] == item_encoder.text.identity
    assert recorded["text_fine_tuning"] is None  # the packaged model: no ppm finetune report
    assert read_item_log(cfg.paths.item_log).num_rows == 0
    ItemEmbedder(item_encoder, online, ItemLog(cfg.paths.item_log))
    assert [p.name for p in versions_folder(cfg.paths.item_log).iterdir()] == [
        f"{item_encoder.encoder_version}.json"]
    assert version_provenance(cfg.paths.item_log, "enc-other") is None


def test_push_and_read_back(embedder, online, item_encoder):
    result = embedder.process([item("a", 0), item("b", 1, title="Zed red cotton dress",
                                                  category="dress")])
    assert (result.applied, result.encoded) == (2, 2)
    got = online.read_items(["a", "b", "never"], with_embeddings=True, now=to_us(T0))
    assert set(got) == {"a", "b"}
    direct = item_encoder.encode([item("a", 0)]).vectors[0]
    np.testing.assert_allclose(got["a"].embedding, direct, rtol=0, atol=1e-6)
    assert got["b"].state.category == "dress"
    assert got["a"].state.encoder_version == item_encoder.encoder_version
    assert not got["a"].stale and got["a"].embedded_at_us is not None


def test_older_update_after_newer_is_ignored(embedder, online):
    embedder.process([item("a", 10, title="Acme new title coat", price=80.0)])
    result = embedder.process([item("a", 5, title="Acme old title coat", price=20.0)])
    assert (result.applied, result.older, result.encoded) == (0, 1, 0)
    state = online.read_items(["a"], now=to_us(T0))["a"].state
    assert state.updated_us == to_us(T0 + timedelta(minutes=10))
    assert state.price_bucket == embedder.state["a"].price_bucket  # still the newer price


def test_older_update_is_ignored_even_by_a_fresh_embedder(embedder, online, item_encoder, cfg):
    # A restarted process without local state must still not let the old event win.
    embedder.process([item("a", 10, title="Acme new title coat")])
    fresh = ItemEmbedder(item_encoder, online, ItemLog(cfg.paths.item_log))
    result = fresh.process([item("a", 5, title="Acme old title coat")])
    assert result.older == 1 and result.applied == 0
    assert online.read_items(["a"], now=to_us(T0))["a"].state.updated_us == to_us(
        T0 + timedelta(minutes=10))


def test_duplicate_is_a_no_op(embedder, online, cfg):
    embedder.process([item("a", 1)])
    before = online.read_items(["a"], with_embeddings=True, now=to_us(T0))["a"]
    parts = sorted(cfg.paths.item_log.iterdir())
    result = embedder.process([item("a", 1), item("a", 1)])
    assert (result.applied, result.duplicates, result.encoded) == (0, 2, 0)
    after = online.read_items(["a"], with_embeddings=True, now=to_us(T0))["a"]
    assert after.embedded_at_us == before.embedded_at_us
    assert sorted(cfg.paths.item_log.iterdir()) == parts


def test_newer_event_with_same_content_is_not_encoded_again(embedder, online):
    embedder.process([item("a", 1, price=50.0)])
    result = embedder.process([item("a", 2, price=25.0)])  # a sale: content unchanged
    assert (result.applied, result.encoded, result.unchanged) == (1, 0, 1)
    state = online.read_items(["a"], now=to_us(T0))["a"].state
    assert state.updated_us == to_us(T0 + timedelta(minutes=2))
    assert state.content_time_us == to_us(T0 + timedelta(minutes=1))


def test_changed_content_is_encoded_again(embedder, online):
    embedder.process([item("a", 1)])
    first = online.read_items(["a"], with_embeddings=True, now=to_us(T0))["a"]
    result = embedder.process([item("a", 2, title="Acme blue denim coat")])
    assert result.encoded == 1
    second = online.read_items(["a"], with_embeddings=True, now=to_us(T0))["a"]
    assert second.state.content_hash != first.state.content_hash
    assert not np.allclose(second.embedding, first.embedding)


def test_delete_is_a_tombstone_and_order_safe(embedder, online):
    embedder.process([item("a", 1)])
    embedder.process([delete("a", 5)])
    got = online.read_items(["a"], now=to_us(T0))["a"]
    assert got.state.deleted and got.stale and got.stale_reason == "deleted"
    assert embedder.process([item("a", 3)]).older == 1  # an older upsert cannot revive it
    embedder.process([item("a", 9)])  # a newer one can
    assert not online.read_items(["a"], now=to_us(T0))["a"].state.deleted


def test_stale_embedding_is_reported_stale(embedder, online, item_encoder):
    embedder.process([item("a", 0)])
    assert online.freshness_window_s is None  # by default age alone is never stale
    assert not online.read_items(["a"], now=to_us(T0 + timedelta(days=3650)))["a"].stale
    online.freshness_window_s = window = 3600.0
    fresh = online.read_items(["a"], now=to_us(T0 + timedelta(seconds=window - 1)))["a"]
    old = online.read_items(["a"], now=to_us(T0 + timedelta(seconds=window + 1)))["a"]
    assert not fresh.stale and old.stale and "freshness window" in old.stale_reason
    other = online.read_items(["a"], now=to_us(T0), encoder_version="enc-other")["a"]
    assert other.stale and "encoder version" in other.stale_reason


def test_batch_keeps_newest_per_item_and_logs_offline_once(embedder, cfg):
    result = embedder.process([item("a", 1), item("a", 3, title="Acme grey coat"),
                               item("a", 2), item("b", 1)])
    assert (result.applied, result.older, result.encoded) == (2, 2, 2)
    log = read_item_log(cfg.paths.item_log)
    assert sorted(log["item_id"].to_pylist()) == ["a", "b"]
    assert len(list(cfg.paths.item_log.glob("*.parquet"))) == 1
    assert len(log["embedding"][0]) == embedder.encoder.dim
    assert embedder.freshness.count == 2 and embedder.freshness.min_ms >= 0
    assert embedder.freshness.percentiles()["p99_ms"] is not None


def test_broken_photo_is_reported_and_retried(embedder):
    bad = item("a", 1, image="/definitely/not/here.png")
    result = embedder.process([bad])
    assert result.encoded == 1 and "a" in result.image_errors
    # Same content re-sent later: the photo is tried again instead of skipped as unchanged.
    again = embedder.process([item("a", 2, image="/definitely/not/here.png")])
    assert again.encoded == 1


def test_failed_store_write_leaves_state_untouched(embedder, online, monkeypatch):
    def broken(rows):
        raise ConnectionError("store down")

    monkeypatch.setattr(online, "write_item_profiles", broken)
    with pytest.raises(ConnectionError):
        embedder.process([item("a", 1)])
    assert "a" not in embedder.state
    monkeypatch.undo()
    assert embedder.process([item("a", 1)]).applied == 1  # the retry is not a "duplicate"


def test_ranker_item_cache_reuses_reads_for_its_max_age(embedder, online):
    import time

    from trainer.serving.ranker import ItemCache

    embedder.process([item("a", 0)])
    cache = ItemCache(online, max_age_s=0.5, max_items=10)
    first = cache.read(["a", "never"], True)
    assert set(first) == {"a"} and first["a"].state.category == "coat"
    assert first["a"].embedding is not None
    embedder.process([item("a", 5, title="Zed red cotton dress", category="dress")])
    assert cache.read(["a"], True)["a"].state.category == "coat"  # cached
    assert cache.counters == {"hits": 1, "misses": 2}
    time.sleep(0.55)  # past the longest an entry is kept
    assert cache.read(["a"], True)["a"].state.category == "dress"
    # Without embeddings cached, a read that needs them goes to the store.
    lean = ItemCache(online, max_age_s=60.0, max_items=1)
    assert lean.read(["a"], False)["a"].embedding is None
    assert lean.read(["a"], True)["a"].embedding is not None
    lean.read(["b", "a"], False)
    assert len(lean._entries) == 1  # bounded: the least recently read left


class PickyEncoder:
    """The real encoder, except that it fails on titles containing "poison" (a record the
    encoder rejects by itself), or on everything once ``dead`` is set."""

    def __init__(self, encoder, dead: bool = False):
        self.encoder, self.dead = encoder, dead
        self.encoder_version = encoder.encoder_version
        self.provenance = encoder.provenance
        self.content_hash = encoder.content_hash

    def encode(self, items):
        if self.dead or any("poison" in i.title for i in items):
            raise ValueError("cannot encode this")
        return self.encoder.encode(items)


def test_an_item_the_encoder_fails_on_alone_is_rejected_and_the_rest_applied(
        item_encoder, online, cfg):
    embedder = ItemEmbedder(PickyEncoder(item_encoder), online,
                            ItemLog(cfg.paths.item_log))
    result = embedder.process([item("a", 0), item("p", 1, title="Acme poison coat"),
                               item("b", 2)])
    assert (result.applied, result.encoded) == (2, 2)
    [(event, reason, error_type)] = result.rejected.values()
    assert event.item_id == "p" and "cannot encode" in reason and error_type == "ValueError"
    assert set(online.read_items(["a", "b", "p"], now=to_us(T0))) == {"a", "b"}
    assert "p" not in embedder.state  # a re-sent event is tried again


def test_a_batch_of_poison_items_only_is_rejected_not_a_crash(item_encoder, online, cfg):
    embedder = ItemEmbedder(PickyEncoder(item_encoder), online,
                            ItemLog(cfg.paths.item_log))
    result = embedder.process([item("p", 0, title="Acme poison coat"),
                               item("q", 1, title="Acme poison dress")])
    assert set(result.rejected) == {"p", "q"} and result.applied == 0


def test_a_batch_that_fails_as_a_whole_raises_and_changes_nothing(item_encoder, online, cfg):
    embedder = ItemEmbedder(PickyEncoder(item_encoder, dead=True), online,
                            ItemLog(cfg.paths.item_log))
    with pytest.raises(ValueError):
        embedder.process([item("a", 0), item("b", 1)])
    assert online.read_items(["a", "b"], now=to_us(T0)) == {} and not embedder.state
