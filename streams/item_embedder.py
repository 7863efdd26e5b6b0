"""Items embedded on arrival: micro-batches of item events into the online store.

:meth:`ItemEmbedder.process` takes one micro-batch (the caller decides its size and time
bound: the local runner's batcher, or Faust's ``stream.take(n, within)``) and

1. keeps the newest event per item; drops events older than, or as old as, what the item
   already has (an older update never overwrites a newer one; a duplicate is a no-op, on
   SQLite and Redis alike);
2. encodes only items whose content changed for this encoder version (content hash);
3. appends the new vectors to the offline item log, then writes vectors and ID features
   (with tombstones for deletes) to the online store, each in one batch;
4. only then updates its state, so a failed write can be retried with the same batch.

An event the encoder fails on by itself (any exception for that item alone) is left out and
reported in :attr:`EmbedResult.rejected`, for the caller's dead-letter route; the rest of the
batch goes on. A failure of the encoder itself (its process is gone, or every item fails
and so does a plain probe item) is raised, as is a store or log failure.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from encoders.encoder_process import EncoderProcess
from encoders.item_encoder import NO_IMAGE, ItemEncoder
from feature_repo.item_log import ItemLog
from feature_repo.online_features import ItemEmbeddingRow, OnlineItem
from ppm.clock import now_us, to_us
from ppm.events import ItemEvent, ItemOp
from ppm.records import ItemState, price_bucket
from streams.freshness import FreshnessStats


class ItemStore(Protocol):
    """The online store as the embedder needs it (``OnlineFeatures`` implements it)."""

    def read_items(self, item_ids: Sequence[str], *, encoder_version: str | None = None
                   ) -> dict[str, OnlineItem]: ...
    def write_item_embeddings(self, rows: Sequence[ItemEmbeddingRow], newest: bool = True
                              ) -> None: ...
    def write_item_profiles(self, states: Sequence[ItemState]) -> None: ...


@dataclass
class EmbedResult:
    """What one batch did. Every input event is counted in exactly one of ``applied``,
    ``older``, ``duplicates`` and ``rejected``."""

    applied: int = 0
    """Events written (upserts and deletes)."""
    encoded: int = 0
    """Items whose vector was computed (content new or changed)."""
    unchanged: int = 0
    """Applied upserts whose content was already embedded for this encoder version."""
    deleted: int = 0
    older: int = 0
    """Events older than what the item already had: ignored."""
    duplicates: int = 0
    """Events with the same time as what the item already had: ignored."""
    rejected: dict[str, tuple[ItemEvent, str, str]] = field(default_factory=dict)
    """item_id -> (event, reason, exception type) of events the encoder failed on alone:
    not applied, for the caller to dead-letter."""
    image_errors: dict[str, str] = field(default_factory=dict)
    """item_id -> reason its photo could not be used (the vector has a zero image part)."""


class ItemEmbedder:
    """Embeds item events and keeps the online store's item features current.

    Args:
        encoder: the frozen encoders, in this process or in a child
            (:class:`~encoders.encoder_process.EncoderProcess`).
        store: where vectors and ID features go (``OnlineFeatures``).
        log: the offline item-feature log.
        state: ``item_id -> ItemState`` of items this embedder has applied; owned by the
            caller (a dict, or a durable table). Items missing from it are looked up in the
            store, so a fresh embedder on an existing store keeps the order guarantees.
        freshness: where arrival-to-readable lags are recorded.
    """

    def __init__(
        self,
        encoder: ItemEncoder | EncoderProcess,
        store: ItemStore,
        log: ItemLog,
        state: MutableMapping[str, ItemState] | None = None,
        freshness: FreshnessStats | None = None,
    ):
        self.encoder = encoder
        self.store = store
        self.log = log
        log.record_version(encoder.provenance)  # before any vector of it is logged
        self.state: MutableMapping[str, ItemState] = {} if state is None else state
        self.freshness = freshness or FreshnessStats()

    def process(
        self, events: Sequence[ItemEvent], arrived_us: Sequence[int] | None = None
    ) -> EmbedResult:
        """Apply one micro-batch. ``arrived_us[i]`` is when ``events[i]`` reached the
        pipeline (wall clock, µs); default: now. Raises only when the store or the log
        fails, and then nothing of the batch counts as done."""
        arrived_us = list(arrived_us) if arrived_us is not None else [now_us()] * len(events)
        result = EmbedResult()

        # 1. The newest event per item; on equal times the first one wins (as on Redis).
        newest: dict[str, tuple[ItemEvent, int]] = {}
        for event, arrived in zip(events, arrived_us, strict=True):
            held = newest.get(event.item_id)
            if held is None or event.event_time > held[0].event_time:
                if held is not None:
                    result.older += 1
                newest[event.item_id] = (event, arrived)
            elif event.event_time == held[0].event_time:
                result.duplicates += 1
            else:
                result.older += 1
        known = self._known(list(newest))
        accepted: list[tuple[ItemEvent, int]] = []
        for item_id, (event, arrived) in newest.items():
            before = known.get(item_id)
            t = to_us(event.event_time)
            if before is not None and t < before.updated_us:
                result.older += 1
            elif before is not None and t == before.updated_us:
                result.duplicates += 1
            else:
                accepted.append((event, arrived))

        # 2. Encode what changed; an event the encoder fails on alone is left out.
        version = self.encoder.encoder_version
        to_encode = [
            (e, a) for e, a in accepted
            if e.op is ItemOp.UPSERT and not embedded(known.get(e.item_id), self.encoder, e)
        ]
        embeddings, failed = encode_each(self.encoder, [e for e, _ in to_encode])
        if failed:
            result.rejected = {e.item_id: (e, f"encoder failed: {str(exc)[:500]}",
                                           type(exc).__name__)
                               for e, exc in failed}
            to_encode = [(e, a) for e, a in to_encode if e.item_id not in result.rejected]
            accepted = [(e, a) for e, a in accepted if e.item_id not in result.rejected]
        result.image_errors = {i: r for i, r in embeddings.image_errors.items() if r != NO_IMAGE}
        rows = embedding_rows([e for e, _ in to_encode], embeddings, version, now_us())

        # 3. Offline first, then online: a crash in between repeats a batch, never loses it.
        self.log.append(rows, [a for _, a in to_encode])
        self.store.write_item_embeddings(rows)
        states = [self._next_state(known.get(e.item_id), e) for e, _ in accepted]
        by_id = {r.item_id: r for r in rows}
        states = [
            replace(s, encoder_version=version, content_hash=by_id[s.item_id].content_hash,
                    content_time_us=by_id[s.item_id].content_time_us)
            if s.item_id in by_id else s
            for s in states
        ]
        self.store.write_item_profiles(states)
        readable_us = now_us()

        # 4. Only now is the batch done.
        for s in states:
            self.state[s.item_id] = s
        self.freshness.record(
            [r.item_id for r in rows], [r.content_time_us for r in rows],
            [a for _, a in to_encode], readable_us)
        result.applied = len(accepted)
        result.encoded = len(rows)
        result.deleted = sum(e.op is ItemOp.DELETE for e, _ in accepted)
        result.unchanged = result.applied - result.deleted - result.encoded
        return result

    def _known(self, item_ids: list[str]) -> dict[str, ItemState]:
        known = {i: self.state[i] for i in item_ids if i in self.state}
        missing = [i for i in item_ids if i not in known]
        if missing:
            # This encoder's vectors where the store has them (a backfill may have written
            # them), so an item already embedded under this version is not embedded again.
            stored = {i: online.state for i, online in self.store.read_items(
                missing, encoder_version=self.encoder.encoder_version).items()}
            # What the store holds was applied (by this embedder before a restart, or another
            # one): remember it, so the state also covers items a replay finds unchanged.
            self.state.update(stored)
            known.update(stored)
        return known

    @staticmethod
    def _next_state(before: ItemState | None, event: ItemEvent) -> ItemState:
        t = to_us(event.event_time)
        first_seen = t if before is None else min(before.first_seen_us, t)
        if event.op is ItemOp.DELETE:
            if before is None:
                return ItemState(event.item_id, None, None, None, 0, first_seen, t, deleted=True)
            return replace(before, updated_us=t, first_seen_us=first_seen, deleted=True)
        carried = {} if before is None else {
            "encoder_version": before.encoder_version,
            "content_hash": before.content_hash,
            "content_time_us": before.content_time_us,
        }
        return ItemState(
            item_id=event.item_id,
            category=event.category,
            brand=event.brand,
            shop=event.shop,
            price_bucket=price_bucket(event.price),
            first_seen_us=first_seen,
            updated_us=t,
            **carried,
        )


def embedded(state: ItemState | None, encoder: ItemEncoder | EncoderProcess,
             event: ItemEvent) -> bool:
    """Whether ``state`` says the item already has ``encoder``'s vector of ``event``'s
    content (same encoder version, same content hash): the stream and the backfill skip it."""
    return (state is not None and state.encoder_version == encoder.encoder_version
            and state.content_hash == encoder.content_hash(event))


def embedding_rows(events: Sequence[ItemEvent], embeddings, version: str, sent_us: int
                   ) -> list[ItemEmbeddingRow]:
    """One row per event of ``events`` (all embedded, in the order ``embeddings`` holds
    them), available from the event's time. An item whose photo failed is stored under a
    hash that never matches, so a re-sent event (or a rerun backfill) retries the photo
    instead of skipping it as unchanged. Shared by the stream and ``streams.backfill``."""
    failed = {i for i, reason in embeddings.image_errors.items() if reason != NO_IMAGE}
    return [ItemEmbeddingRow(item_id=item_id, embedding=vector, encoder_version=version,
                             content_hash=h + ("!image" if item_id in failed else ""),
                             content_time_us=to_us(e.event_time), embedded_at_us=sent_us)
            for e, item_id, vector, h in zip(events, embeddings.item_ids, embeddings.vectors,
                                             embeddings.content_hashes, strict=True)]


def encode_each(encoder: ItemEncoder | EncoderProcess, events: list[ItemEvent]):
    """(embeddings of the events that encode, [(event, exception)] of those that fail on
    their own). Tried one by one only after the batch failed. When every one fails, a
    plain item tells the records' fault from the encoder's: if it fails too, its error is
    raised (nothing is dead-lettered for a broken encoder), as is any error when the
    encoder's process is gone. Shared by the stream and the backfill (``streams.backfill``)."""
    try:
        return encoder.encode(events), []
    except Exception as exc:
        if _encoder_gone(exc):
            raise
        failed = []
        for event in events:
            try:
                encoder.encode([event])
            except Exception as one:
                if _encoder_gone(one):
                    raise
                failed.append((event, one))
        if len(failed) == len(events):
            encoder.encode([_PROBE])  # raises if the encoder itself is broken
        bad = {id(e) for e, _ in failed}
        return encoder.encode([e for e in events if id(e) not in bad]), failed


def _encoder_gone(exc: BaseException) -> bool:
    """Whether ``exc`` says the encoder's child process died (no record's fault)."""
    import concurrent.futures.process

    return isinstance(exc.__cause__, concurrent.futures.process.BrokenProcessPool)


_PROBE = ItemEvent(item_id="ppm-encoder-probe", event_time="2026-01-01T00:00:00Z",
                   title="plain cotton shirt", category="shirt")
"""An item any working encoder encodes: tells a poison batch from a broken encoder."""
