"""The direct online reads (``features.online_reads="direct"``) against Feast's SDK path
(``"feast"``) on one store: the same values for every read the ranker and the stream make.
Used by ``tests/test_features.py`` (SQLite) and ``tests/integration`` (Redis)."""

from __future__ import annotations

import numpy as np

from feature_repo.online_features import ItemEmbeddingRow, OnlineFeatures, StoredItem
from ppm.records import ItemState, UserSequence

T = 1_767_225_600_000_000  # 2026-01-01, µs


def fill(online: OnlineFeatures) -> None:
    """Profiles, vectors of two encoder versions, a tombstone, a plug-in's outputs and
    sequences, with items that lack some of them."""
    rng = np.random.default_rng(0)
    online.write_item_profiles([
        ItemState(f"i{k}", "coat", f"b{k}", "s1", k, T, T + k, deleted=k == 3)
        for k in range(6)])

    def rows(ids, version, dim):
        return [ItemEmbeddingRow(i, rng.normal(size=dim).astype(np.float32), version,
                                 f"h-{i}", T + k, T + 10 + k) for k, i in enumerate(ids)]

    online.write_item_embeddings(rows(["i0", "i1", "i2", "i3"], "A", 16))
    online.write_item_embeddings(rows(["i0", "i2"], "B", 16), newest=False)
    online.write_projections(rows(["i0", "i1"], "A", 4), "P")
    online.write_sequences([UserSequence("u1", ("i0", "i1"), ("click", "order"), (T, T + 5)),
                            UserSequence("u2")])


def _same(a: dict[str, StoredItem], b: dict[str, StoredItem]) -> None:
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].state == b[i].state, i
        assert (a[i].embedded_at_us, a[i].with_embedding) == (
            b[i].embedded_at_us, b[i].with_embedding), i
        if a[i].embedding is None or b[i].embedding is None:
            assert a[i].embedding is None and b[i].embedding is None, i
        else:
            assert np.array_equal(a[i].embedding, b[i].embedding), i


def check_reads_agree(online: OnlineFeatures) -> None:
    """Every read of ``online`` (filled by :func:`fill`) returns the same through both
    paths, unknown ids included."""
    direct, feast = online, OnlineFeatures(online.store, online.definitions,
                                           online.freshness_window_s, reads="feast")
    assert direct.reads == "direct"
    ids = ["i0", "i1", "i2", "i3", "i4", "i5", "never"]
    for with_embeddings in (False, True):
        for version in (None, "A", "B", "C"):
            got = direct.fetch_items(ids, with_embeddings, version)
            _same(got, feast.fetch_items(ids, with_embeddings, version))
            assert set(got) == {f"i{k}" for k in range(6)}
    newest = direct.fetch_items(ids, False, "A")
    projected = direct.fetch_projections(newest, "P")
    _same(projected, feast.fetch_projections(newest, "P"))
    assert set(projected) == {"i0", "i1"} and projected["i0"].embedding.shape == (4,)
    assert direct.read_sequences(["u1", "u2", "never"]) == feast.read_sequences(
        ["u1", "u2", "never"])
    assert direct.read_sequences(["u1"])["u1"].item_ids == ("i0", "i1")
