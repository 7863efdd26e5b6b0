"""Online scoring: ``Ranker.rank(user_id, item_ids)`` from the online store, hot-swapping models.

Per request the ranker reads the user's sequence and the candidates' (and sequence items')
features from the Feast online store in one batched read each, builds the model's batch
with the functions training uses (``trainer.features``, with the item vocabulary the model
was trained with), and scores every task of the
model (click, order and collect by default). Item features are reused for
``features.serving_cache_s`` seconds (:class:`ItemCache`), so a request reads from the store
only the items it has not seen lately; the user's sequence is read on every request, and
encoded once for all candidates (``trainer.model.BehaviorTransformer``). A vector that is
missing or stale (``trainer.features.usable_vectors``, the rule training applies to its
targets) does not fail the request: the model gets its learned "missing" vector, and the
response counts them.

The champion model is re-read when the registry's pointer changes (checked at most every
``reload_every_s``: ``serving.reload_every_s``); the swap is one reference assignment, so a
request in flight finishes on the model it started with and no request is dropped.
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from feature_repo.online_features import ItemEmbeddingRow, OnlineFeatures, StoredItem
from ppm.clock import now_us
from ppm.config import Config
from ppm.records import UserSequence
from trainer.features import (
    Sequences,
    Targets,
    model_batch,
    sequence_features,
    target_features,
    taste_features,
    usable_vectors,
)
from trainer.model import UnifiedRanker
from trainer.registry import Registry
from trainer.serving.compiled import CompiledForward
from trainer.serving.projection import projection_of

log = logging.getLogger(__name__)


class NoChampionError(RuntimeError):
    """No model has been promoted in the ranker's registry yet."""


def served_tasks(model: UnifiedRanker) -> tuple[str, ...]:
    """The tasks whose probabilities ``model``'s answers carry: those it learned
    (``UnifiedRanker.trained_tasks``; a model trained on ratings turned into clicks has no
    order or collect head worth reading: an untrained head's output is noise), every task
    of a model that does not say (never trained)."""
    return model.config.tasks if model.trained_tasks is None else model.trained_tasks


@dataclass
class RankResult:
    """Candidates in descending probability of the first task the model learned (click,
    unless its data had none), with the probability of each task it learned
    (:func:`served_tasks`)."""

    item_ids: list[str]
    scores: dict[str, list[float]]
    """task -> probabilities, aligned with ``item_ids``."""
    model_version: str
    missing: dict[str, int] = field(default_factory=dict)
    """How many features were missing or stale: ``user_sequence``, ``item_profile``,
    ``item_embedding`` (candidates), ``sequence_embedding``."""


class ItemCache:
    """Items' stored features, reused for up to ``max_age_s`` seconds of wall clock.

    Each entry expires at a random moment between half and all of ``max_age_s`` after it was
    read, so the items one request read together are refreshed a few at a time by later
    requests rather than all by one (which would be as slow as no cache). Only values as
    stored (and a frozen plug-in's outputs of them) are cached; the caller judges staleness
    per request at its own clock (``trainer.features.usable_vectors``), so a cached vector
    still turns stale when the freshness window passes. Items unknown to the store are
    cached as unknown too (a new item becomes visible within ``max_age_s``). Safe to share
    between request threads.
    """

    def __init__(self, store: OnlineFeatures, max_age_s: float, max_items: int):
        self.store = store
        self.max_age_s = max_age_s
        self.max_items = max_items
        self._entries: OrderedDict[tuple[Hashable, str], tuple[float, StoredItem | None]] = (
            OrderedDict())
        self._lock = threading.Lock()
        self._jitter = random.Random(0)
        self.counters = {"hits": 0, "misses": 0}

    def read(self, item_ids: Sequence[str], with_embeddings: bool,
             encoder_version: str | None = None) -> dict[str, StoredItem]:
        """Like ``OnlineFeatures.fetch_items``: the known items as stored, with
        ``encoder_version``'s vectors where the store has them (entries are kept per
        version, so a model of another version never reads this one's)."""
        return self._read(item_ids, encoder_version, with_embeddings, lambda ids: (
            self.store.fetch_items(ids, with_embeddings, encoder_version)))

    def read_projected(self, item_ids: Sequence[str], space: tuple[str, str | None], fetch
                       ) -> dict[str, StoredItem]:
        """Items as ``fetch(ids)`` returns them for the ids not cached in ``space`` (a frozen
        plug-in's projection and encoder version): each with the plug-in's output for a
        vector where there is one, cached whole, so a request that finds them all cached
        does no more than one lookup per item."""
        return self._read(item_ids, space, False, fetch)

    def _read(self, item_ids: Sequence[str], space: Hashable, with_embeddings: bool,
              fetch) -> dict[str, StoredItem]:
        clock = time.monotonic()
        found: dict[str, StoredItem | None] = {}
        with self._lock:
            for item_id in item_ids:
                entry = self._entries.get((space, item_id))  # (expires_at, item)
                if entry is not None and entry[0] > clock and (
                        entry[1] is None or entry[1].with_embedding or not with_embeddings):
                    found[item_id] = entry[1]
            wanted = [i for i in item_ids if i not in found]
            self.counters["hits"] += len(found)
            self.counters["misses"] += len(wanted)
        if wanted:
            fetched_at = time.monotonic()
            stored = fetch(wanted)
            found |= {i: stored.get(i) for i in wanted}
            self._keep(space, {i: found[i] for i in wanted}, fetched_at)
        return {i: item for i, item in found.items() if item is not None}

    def _keep(self, space: Hashable, items: dict[str, StoredItem | None],
              fetched_at: float) -> None:
        with self._lock:
            for item_id, item in items.items():
                expires = fetched_at + self.max_age_s * self._jitter.uniform(0.5, 1.0)
                key = (space, item_id)
                self._entries[key] = (expires, item)
                self._entries.move_to_end(key)
            while len(self._entries) > self.max_items:
                self._entries.popitem(last=False)


class Ranker:
    """Scores candidates for a user with the registry's champion.

    Args:
        store: the online store to read features from.
        registry: where the champion lives.
        reload_every_s: how often to look for a newly promoted champion.
        cache_s: how long item features read from the store are reused (0: never), see
            ``features.serving_cache_s``.
        cache_items: the most items kept in that cache.
        compile: compile each champion's forward when it is loaded (``serving.compile``,
            ``trainer.serving.compiled``).
    """

    def __init__(self, store: OnlineFeatures, registry: Registry, reload_every_s: float = 1.0,
                 cache_s: float = 1.0, cache_items: int = 100_000, compile: bool = False):
        self.store = store
        self.registry = registry
        self.reload_every_s = reload_every_s
        self.compile = compile
        self.items = ItemCache(store, cache_s, cache_items)
        self._lock = threading.Lock()
        self._checked_at = 0.0
        self._pointer: bytes | None = None
        self._model: tuple[str, UnifiedRanker, str | None, str | None,
                           CompiledForward | None] | None = None
        self.counters = {"requests": 0, "reloads": 0, "compiled_requests": 0,
                         "plugin_outputs_read": 0,
                         "plugin_outputs_computed": 0, "plugin_output_write_errors": 0,
                         "plugin_output_writes_dropped": 0}
        self._counting = threading.Lock()  # request threads and the writer count at once
        # Outputs computed here are kept in the item cache and written back off the
        # request's path, one batch at a time, so an item is projected again only when
        # neither has it (a write still pending after its cache entry expired, say).
        self._writer = concurrent.futures.ThreadPoolExecutor(1, "ppm-projection-writes")
        self._writes: set[concurrent.futures.Future] = set()
        self.maybe_reload(force=True)

    @classmethod
    def from_config(cls, cfg: Config, variant: str) -> Ranker:
        """The ranker ``ppm serve`` runs: ``variant``'s champion in ``cfg``'s registry,
        features from ``cfg``'s online store, the config's reload and cache settings."""
        return cls(OnlineFeatures.open(cfg, apply=False), Registry(cfg.paths.registry(variant)),
                   reload_every_s=cfg.serving.reload_every_s,
                   cache_s=cfg.features.serving_cache_s,
                   cache_items=cfg.features.serving_cache_items, compile=cfg.serving.compile)

    def _count(self, name: str, n: int = 1) -> None:
        with self._counting:
            self.counters[name] += n

    def flush(self) -> None:
        """Wait until the plug-in outputs computed so far are written to the store."""
        concurrent.futures.wait(self._writes.copy())  # copy: one C call, under the GIL

    def close(self) -> None:
        """Stop writing plug-in outputs back (pending writes are dropped: computed again
        when next needed)."""
        self._writer.shutdown(wait=False, cancel_futures=True)

    MAX_PENDING_WRITES = 16
    """Batches of plug-in outputs waiting to be written; more are dropped (and counted)
    while the store is slow: the items are projected again when next needed."""

    def _write_back(self, rows: list[ItemEmbeddingRow], projection: str) -> None:
        if len(self._writes) >= self.MAX_PENDING_WRITES:
            self._count("plugin_output_writes_dropped")
            return

        def write() -> None:
            try:
                self.store.write_projections(rows, projection)
            except Exception as exc:  # computed again when next needed
                self._count("plugin_output_write_errors")
                log.warning("could not write %d plug-in outputs (%s: %s); they are computed "
                            "again when next needed", len(rows), type(exc).__name__, exc)

        try:
            future = self._writer.submit(write)
        except RuntimeError:  # closed
            return
        self._writes.add(future)
        future.add_done_callback(self._writes.discard)

    @property
    def model_version(self) -> str | None:
        return None if self._model is None else self._model[0]

    @property
    def tasks(self) -> tuple[str, ...] | None:
        """The tasks the loaded model's answers carry (:func:`served_tasks`); None before
        one is loaded."""
        return None if self._model is None else served_tasks(self._model[1])

    def maybe_reload(self, force: bool = False) -> None:
        """Load a newly promoted champion, looking at most every ``reload_every_s`` (every
        ``rank`` calls this; so does the server's ``/ready``). While one thread loads (and
        compiles: seconds for a new configuration), the others go on with the model they
        have instead of waiting for it."""
        now = time.monotonic()
        if not force and now - self._checked_at < self.reload_every_s:
            return
        if not self._lock.acquire(blocking=force):
            return
        try:
            self._checked_at = now
            path = self.registry.champion_path
            pointer = path.read_bytes() if path.exists() else None
            if pointer is None or pointer == self._pointer:
                return
            champion = self.registry.champion()
            model = self.registry.load(champion)
            projection = projection_of(champion.meta)
            compiled = CompiledForward.build(model, bool(projection)) if self.compile else None
            # One assignment: requests already running keep the model they started with.
            self._model = (champion.name, model, champion.meta.get("encoder_version"),
                           projection, compiled)
            self._pointer = pointer
            self._count("reloads")
        finally:
            self._lock.release()

    def rank(self, user_id: str, item_ids: Sequence[str], now: int | None = None) -> RankResult:
        """Score ``item_ids`` for ``user_id``; ``now`` (µs, default wall clock) judges
        freshness. Raises :class:`NoChampionError` when no model has been promoted yet."""
        self.maybe_reload()
        if self._model is None:
            raise NoChampionError(f"no champion model in {self.registry.root} yet")
        # This request's model, whatever is promoted meanwhile.
        version, model, encoder_version, projection, compiled = self._model
        self._count("requests")
        item_ids = list(item_ids)
        tasks = served_tasks(model)
        if not item_ids:
            return RankResult([], {t: [] for t in tasks}, version)
        batch, missing = self.build_batch(model, encoder_version, user_id, item_ids, now,
                                          projection)
        with torch.inference_mode():
            logits = compiled(batch) if compiled is not None and compiled.fits(batch) else None
            if logits is not None:
                self._count("compiled_requests")
            else:
                logits = model(batch)[0]
            probs = torch.sigmoid(logits).numpy()
        # By the first task the model learned (click, unless its data had none); a model
        # that learned none keeps the request's order.
        order = (np.argsort(-probs[:, model.config.tasks.index(tasks[0])], kind="stable")
                 if tasks else np.arange(len(item_ids)))
        return RankResult(
            item_ids=[item_ids[i] for i in order],
            scores={task: probs[order, j].tolist()
                    for j, task in enumerate(model.config.tasks) if task in tasks},
            model_version=version,
            missing=missing,
        )

    def build_batch(self, model: UnifiedRanker, encoder_version: str | None, user_id: str,
                    item_ids: list[str], now: int | None = None,
                    projection: str | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """The model batch for one request, read from the online store (two batched reads;
        with a frozen plug-in's ``projection``, its stored d-float outputs instead of the
        raw vectors, and the raw ones only for items it has none of), and the counts of
        missing or stale features."""
        now = now_us() if now is None else now
        c = model.config
        sequence = self.store.read_sequences([user_id]).get(user_id) or UserSequence(user_id)
        seq = sequence.before(now)
        # What the model reads of it (sequence_features' rule): read no more from the store.
        seq = seq.kept(c.max_seq_len - c.sequence_impressions, c.sequence_impressions)
        seq_ids = list(seq.item_ids)
        wanted = list(dict.fromkeys(item_ids + seq_ids))
        if projection and c.uses_modal:
            stored = self._projected(model, wanted, encoder_version, projection)
        else:
            stored = self.items.read(wanted, c.uses_modal, encoder_version)

        # This request's vector table: row 0 = missing, then every usable vector, in order
        # of first use (targets, then the sequence), as model_batch keeps it.
        found = [stored.get(i) for i in wanted]
        usable = usable_vectors(
            embedded=[o is not None and o.embedding is not None for o in found],
            encoder_versions=[o.state.encoder_version if o else None for o in found],
            content_time_us=[np.nan if o is None or o.state.content_time_us is None
                             else o.state.content_time_us for o in found],
            at_us=now, model_version=encoder_version,
            freshness_window_s=self.store.freshness_window_s,
            deleted=[o is not None and o.state.deleted for o in found])
        kept = [i for i, ok in zip(wanted, usable, strict=True) if ok]
        row_of = dict(zip(kept, range(1, len(kept) + 1), strict=True))
        width = c.d_model if projection and c.uses_modal else c.modal_dim
        vectors = np.zeros((len(kept) + 1, width), np.float32)
        if kept:  # copied in one call, not row by row
            vectors[1:] = np.stack([stored[i].embedding for i in kept])

        states = [stored[i].state if i in stored else None for i in item_ids]
        # One user and sequence row shared by every candidate: the model encodes it once.
        # Ids the model's vocabularies do not admit are unknown (0), as in its training.
        vocabulary = model.item_vocabulary
        targets = Targets.from_states(item_ids, states)
        batch = model_batch({
            **target_features(targets, c, vocabulary),
            **taste_features([user_id] * len(item_ids), targets, c,
                             model.taste_vocabulary, user_vocabulary=model.user_vocabulary),
            "target_modal_row": np.array([row_of.get(i, 0) for i in item_ids], np.int64),
            **sequence_features(Sequences.of([seq]), np.array([now], np.int64),
                                np.array([row_of.get(i, 0) for i in seq_ids], np.int64), c,
                                vocabulary, model.user_vocabulary),
        }, vectors)
        if projection and c.uses_modal:  # the rows are the plug-in's outputs already
            batch["modal_projected"] = batch.pop("modal_table")
        missing = {
            "user_sequence": int(not seq_ids),
            "item_profile": sum(s is None for s in states),
            "item_embedding": sum(i not in row_of for i in item_ids) if c.uses_modal else 0,
            "sequence_embedding": sum(i not in row_of for i in seq_ids) if c.uses_modal else 0,
        }
        return batch, missing

    def _projected(self, model: UnifiedRanker, item_ids: list[str], encoder_version: str | None,
                   projection: str) -> dict[str, StoredItem]:
        """``item_ids`` as stored, each with the frozen plug-in's output (d floats) for a
        vector: read from the store where it holds one of the item's current content, else
        computed here from the raw vector (an item embedded since the outputs were
        written) and written back to the store in the background."""
        return self.items.read_projected(item_ids, (projection, encoder_version), lambda ids: (
            self._fetch_projected(model, ids, encoder_version, projection)))

    def _fetch_projected(self, model: UnifiedRanker, item_ids: list[str],
                         encoder_version: str | None, projection: str) -> dict[str, StoredItem]:
        """:meth:`_projected` from the store, for the items the cache does not hold."""
        states = self.store.fetch_items(item_ids, False, encoder_version)  # profiles, meta
        found = self.store.fetch_projections(states, projection)
        rest = [i for i in states if i not in found]
        raw = self.store.fetch_items(rest, True, encoder_version) if rest else {}
        # Only vectors of the model's version (the store returns the newest where it has
        # none of it): the rest are unusable anyway, and may not even fit the projection.
        raw = {i: r for i, r in raw.items() if r.embedding is not None and not r.state.deleted
               and r.state.encoder_version == encoder_version}
        self._count("plugin_outputs_read", len(found))
        self._count("plugin_outputs_computed", len(raw))
        if raw:
            with torch.inference_mode():
                out = model.ppm.project(torch.from_numpy(np.stack(
                    [r.embedding for r in raw.values()]))).numpy()
            found |= {i: StoredItem(r.state, out[k], r.embedded_at_us, True)
                      for k, (i, r) in enumerate(raw.items())}
            self._write_back([ItemEmbeddingRow(i, out[k], r.state.encoder_version,
                                               r.state.content_hash, r.state.content_time_us,
                                               r.embedded_at_us)
                              for k, (i, r) in enumerate(raw.items())], projection)
        return {i: found.get(i, item) for i, item in states.items()}
