"""Online scoring: ``Ranker.rank(user_id, item_ids)`` from the online store, hot-swapping models.

Per request the ranker reads the user's sequence and the candidates' (and sequence items')
features from the Feast online store in one batched read each, builds the model's batch
(the same hashing, recency buckets and padding as training, ``trainer.dataset``), and scores
click, order and collect. Features that are missing or stale (see
``streams.online_features``) do not fail the request: the model gets its learned "missing"
vector, and the response counts them.

The champion model is re-read when the registry's pointer changes (checked at most every
``reload_every_s``); the swap is one reference assignment, so a request in flight finishes on
the model it started with and no request is dropped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from streams.online_features import OnlineFeatures, now_us
from streams.sequence_builder import UserSequence
from trainer.dataset import ACTION_CODES, TASKS, hash_ids
from trainer.model import UnifiedRanker, gap_bucket
from trainer.registry import Registry


@dataclass
class RankResult:
    """Candidates in descending click probability, with every task's probability."""

    item_ids: list[str]
    scores: dict[str, list[float]]
    """task -> probabilities, aligned with ``item_ids``."""
    model_version: str
    missing: dict[str, int] = field(default_factory=dict)
    """How many features were missing or stale: ``user_sequence``, ``item_profile``,
    ``item_embedding`` (candidates), ``sequence_embedding``."""


class Ranker:
    """Scores candidates for a user with the registry's champion.

    Args:
        store: the online store to read features from.
        registry: where the champion lives.
        reload_every_s: how often to look for a newly promoted champion.
    """

    def __init__(self, store: OnlineFeatures, registry: Registry, reload_every_s: float = 1.0):
        self.store = store
        self.registry = registry
        self.reload_every_s = reload_every_s
        self._lock = threading.Lock()
        self._checked_at = 0.0
        self._pointer: bytes | None = None
        self._model: tuple[str, UnifiedRanker, str | None] | None = None
        self.counters = {"requests": 0, "reloads": 0}
        self._maybe_reload(force=True)

    @property
    def model_version(self) -> str | None:
        return None if self._model is None else self._model[0]

    def _maybe_reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked_at < self.reload_every_s:
            return
        with self._lock:
            self._checked_at = now
            path = self.registry.champion_path
            pointer = path.read_bytes() if path.exists() else None
            if pointer is None or pointer == self._pointer:
                return
            champion = self.registry.champion()
            model = self.registry.load(champion)
            # One assignment: requests already running keep the model they started with.
            self._model = (champion.name, model, champion.meta.get("encoder_version"))
            self._pointer = pointer
            self.counters["reloads"] += 1

    def rank(self, user_id: str, item_ids: Sequence[str], now: int | None = None) -> RankResult:
        """Score ``item_ids`` for ``user_id``; ``now`` (µs, default wall clock) judges
        freshness. Raises RuntimeError when no model has been promoted yet."""
        self._maybe_reload()
        if self._model is None:
            raise RuntimeError(f"no champion model in {self.registry.root} yet")
        version, model, encoder_version = self._model  # this request's model, whatever swaps
        self.counters["requests"] += 1
        item_ids = list(item_ids)
        if not item_ids:
            return RankResult([], {t: [] for t in TASKS}, version)
        batch, missing = self.build_batch(model, encoder_version, user_id, item_ids, now)
        with torch.inference_mode():
            probs = torch.sigmoid(model(batch)[0]).numpy()
        order = np.argsort(-probs[:, 0], kind="stable")
        return RankResult(
            item_ids=[item_ids[i] for i in order],
            scores={task: probs[order, j].tolist() for j, task in enumerate(TASKS)},
            model_version=version,
            missing=missing,
        )

    def build_batch(self, model: UnifiedRanker, encoder_version: str | None, user_id: str,
                    item_ids: list[str], now: int | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """The model batch for one request, read from the online store (two batched reads),
        and the counts of missing or stale features."""
        now = now_us() if now is None else now
        c = model.config
        sequence = self.store.read_sequences([user_id]).get(user_id) or UserSequence(user_id)
        seq = sequence.before(now)
        seq_ids = list(seq.item_ids[-c.max_seq_len:])
        wanted = list(dict.fromkeys(item_ids + seq_ids))
        online = self.store.read_items(wanted, with_embeddings=c.uses_modal, now=now,
                                       encoder_version=encoder_version)

        # The modal table of this request: row 0 = missing, then every usable vector.
        usable = [i for i in wanted if i in online and not online[i].stale
                  and online[i].embedding is not None]
        row_of = {item_id: row + 1 for row, item_id in enumerate(usable)}
        table = np.zeros((len(usable) + 1, c.modal_dim), np.float32)
        for item_id, row in row_of.items():
            table[row] = online[item_id].embedding

        n, L, k = len(item_ids), c.max_seq_len, len(seq_ids)
        states = [online[i].state if i in online else None for i in item_ids]
        seq_item = np.zeros(L, np.int64)
        seq_action = np.zeros(L, np.int64)
        seq_gap = np.zeros(L, np.int64)
        seq_row = np.zeros(L, np.int64)
        if k:  # left-padded, as in training (trainer.dataset)
            seq_item[L - k:] = hash_ids(seq_ids, c.item_buckets)
            seq_action[L - k:] = [ACTION_CODES.get(a, 0) for a in seq.actions[-k:]]
            seq_gap[L - k:] = gap_bucket((now - np.asarray(seq.times_us[-k:])) / 1e6,
                                         c.gap_buckets)
            seq_row[L - k:] = [row_of.get(i, 0) for i in seq_ids]
        t = torch.from_numpy
        batch = {
            "item_id": t(hash_ids(item_ids, c.item_buckets)),
            "category": t(hash_ids([s.category if s else None for s in states],
                                   c.category_buckets)),
            "brand": t(hash_ids([s.brand if s else None for s in states], c.brand_buckets)),
            "shop": t(hash_ids([s.shop if s else None for s in states], c.shop_buckets)),
            "price_bucket": t(np.clip([s.price_bucket if s else 0 for s in states], 0,
                                      c.price_buckets - 1).astype(np.int64)),
            "seq_item_id": t(np.tile(seq_item, (n, 1))),
            "seq_action": t(np.tile(seq_action, (n, 1))),
            "seq_gap": t(np.tile(seq_gap, (n, 1))),
            "seq_mask": t(np.tile(seq_item > 0, (n, 1))),
            "modal_table": t(table),
            "target_modal_row": t(np.array([row_of.get(i, 0) for i in item_ids], np.int64)),
            "seq_modal_row": t(np.tile(seq_row, (n, 1))),
        }
        missing = {
            "user_sequence": int(k == 0),
            "item_profile": sum(s is None for s in states),
            "item_embedding": sum(i not in row_of for i in item_ids) if c.uses_modal else 0,
            "sequence_embedding": sum(i not in row_of for i in seq_ids) if c.uses_modal else 0,
        }
        return batch, missing
