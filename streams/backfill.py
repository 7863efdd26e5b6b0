"""Backfill: embed the whole catalog with a new encoder version beside the one serving.

A fine-tuned encoder (``ppm finetune``) has a new ``encoder_version``. Its vectors cannot
replace the old ones in place: the model serving now was trained on the old version, and
reads only that one (``trainer.features.usable_vectors``). So a backfill writes the new
version's vectors through the normal write path, offline item log first, then the online
store, but online only under ``(item, version)`` keys
(``feature_repo.feature_definitions.embedding_key``), never over the newest vector the
stream wrote: the old version keeps serving, untouched, the whole time.

The switch is the champion's: train a model on the new version (the trainer reads the
version with the newest writes in the item log, which after a backfill is the new one), and
promote it. Promotion replaces one pointer file (``trainer.registry``), and a server reads
the vectors of its model's version (``OnlineFeatures.fetch_items``), so no request ever
mixes a model with another version's vectors. Then restart the stream workers with the new
encoder configuration, and run the backfill once more: it embeds what changed meanwhile.

A backfill resumes by construction: before embedding a batch it reads what the store holds
under the new version and skips every item whose vector there was computed from the same
content (its content hash), so a killed run, started again, embeds only the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from encoders.encoder_process import EncoderProcess
from encoders.item_encoder import NO_IMAGE, ItemEncoder
from feature_repo.item_log import ItemLog
from feature_repo.online_features import ItemEmbeddingRow, OnlineFeatures
from ppm.clock import now_us, to_us
from ppm.events import ItemEvent, ItemOp
from streams.item_embedder import encode_each


@dataclass
class BackfillResult:
    """What a backfill did; every listed item is counted in exactly one of ``encoded``,
    ``already`` and ``rejected``."""

    encoder_version: str
    items: int = 0
    """Items listed in the catalog (its newest event an upsert)."""
    encoded: int = 0
    already: int = 0
    """Items the store already held under this version with the same content (resumed)."""
    withdrawn: int = 0
    """Items whose newest event is a delete: not embedded."""
    rejected: dict[str, str] = field(default_factory=dict)
    """item_id -> why the encoder failed on it alone (its item event is kept, unembedded)."""


def catalog(events: Iterable[ItemEvent]) -> tuple[list[ItemEvent], int]:
    """The newest event per item (the first of equal times, as the stream keeps it): the
    upserts, sorted by item id, and how many items were withdrawn (a delete last)."""
    newest: dict[str, ItemEvent] = {}
    for event in events:
        held = newest.get(event.item_id)
        if held is None or event.event_time > held.event_time:
            newest[event.item_id] = event
    listed = sorted((e for e in newest.values() if e.op is ItemOp.UPSERT),
                    key=lambda e: e.item_id)
    return listed, len(newest) - len(listed)


class Backfill:
    """Embeds a catalog with ``encoder`` into ``store`` and ``log``, beside what serves.

    Args:
        encoder: the new encoder (its ``encoder_version`` is the version written).
        store: the online store; written with ``newest=False`` only.
        log: the offline item log the trainer reads.
        batch_size: items per read, encode and write.
    """

    def __init__(self, encoder: ItemEncoder | EncoderProcess, store: OnlineFeatures,
                 log: ItemLog, batch_size: int = 256):
        self.encoder = encoder
        self.store = store
        self.log = log
        self.batch_size = batch_size

    def run(self, events: Iterable[ItemEvent], progress: bool = False,
            on_batch: Callable[[BackfillResult], None] | None = None) -> BackfillResult:
        """Embed every listed item of ``events`` (item events; the newest per item
        counts) not yet held under this version with its content. ``on_batch`` sees the
        running result after each batch is durable (log and store written). Raises when the
        store, the log or the encoder itself fails; what earlier batches wrote stays, and
        a new run resumes after it."""
        from tqdm import tqdm

        version = self.encoder.encoder_version
        listed, withdrawn = catalog(events)
        result = BackfillResult(version, items=len(listed), withdrawn=withdrawn)
        bar = tqdm(total=len(listed), desc=f"backfill {version[:24]}", unit="item",
                   disable=not progress)
        for start in range(0, len(listed), self.batch_size):
            batch = listed[start:start + self.batch_size]
            held = self.store.fetch_items([e.item_id for e in batch],
                                          encoder_version=version)
            todo = [e for e in batch if not self._held(held.get(e.item_id), e)]
            result.already += len(batch) - len(todo)
            embeddings, failed = encode_each(self.encoder, todo)
            for event, exc in failed:
                result.rejected[event.item_id] = f"encoder failed: {str(exc)[:500]}"
            todo = [e for e in todo if e.item_id not in result.rejected]
            sent_us = now_us()
            rows = [
                ItemEmbeddingRow(
                    item_id=item_id, embedding=vector, encoder_version=version,
                    # As the stream does: a failed photo never matches, so a rerun retries it.
                    content_hash=h + ("!image" if embeddings.image_errors.get(item_id) not in
                                      (None, NO_IMAGE) else ""),
                    content_time_us=to_us(e.event_time), embedded_at_us=sent_us)
                for e, item_id, vector, h in zip(todo, embeddings.item_ids,
                                                 embeddings.vectors,
                                                 embeddings.content_hashes, strict=True)]
            # Offline first, then online (as the stream): a crash between repeats the batch.
            self.log.append(rows, [sent_us] * len(rows))
            self.store.write_item_embeddings(rows, newest=False)
            result.encoded += len(rows)
            bar.update(len(batch))
            if on_batch:
                on_batch(result)
        bar.close()
        return result

    def _held(self, stored, event: ItemEvent) -> bool:
        return (stored is not None and stored.state.encoder_version == self.encoder.encoder_version
                and stored.state.content_hash == self.encoder.content_hash(event))
