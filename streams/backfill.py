"""Backfill: embed the whole catalog with a new encoder version beside the one serving.

A fine-tuned encoder (``ppm finetune``) has a new ``encoder_version``. Its vectors cannot
replace the old ones in place: the model serving now was trained on the old version, and
reads only that one (``trainer.features.usable_vectors``). So a backfill writes the new
version's vectors through the normal write path, offline item log first, then the online
store, but online only under ``(item, version)`` keys
(``feature_repo.feature_definitions.embedding_key``), never over the newest vector the
stream wrote: the old version keeps serving, untouched, the whole time.

The switch is the champion's: train a model on the new version (name it in
``trainer.encoder_version``: by default the trainer reads the version written last, which a
stream still running the old encoder makes the old one again), and promote it. Promotion
replaces one pointer file (``trainer.registry``), and a server reads the vectors of its
model's version (``OnlineFeatures.fetch_items``), so no request ever mixes a model with
another version's vectors. Then restart the stream workers with the new
encoder configuration, and run the backfill once more: it embeds what changed meanwhile.

A backfill embeds each content an item ever had, available from the event that first
carried it, so the trainer's history under the new version is as long as under the old one;
online it writes only each listed item's newest content. It resumes by construction: it
skips every content the item log already holds under the new version and every listed item
the store already holds with its newest content, so a killed run, started again, embeds
only the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from encoders.encoder_process import EncoderProcess
from encoders.item_encoder import ItemEncoder
from feature_repo.item_log import ItemLog
from feature_repo.online_features import OnlineFeatures
from ppm.clock import now_us
from ppm.events import ItemEvent, ItemOp
from streams.item_embedder import embedded, embedding_rows, encode_each


@dataclass
class BackfillResult:
    """What a backfill did. Every item of the catalog is counted in ``items`` (listed: its
    newest event an upsert) or ``withdrawn``; every content it ever had (a run of upserts
    with the same content hash) in ``encoded``, ``already`` or ``rejected``."""

    encoder_version: str
    items: int = 0
    withdrawn: int = 0
    """Items whose newest event is a delete: their past contents go to the item log (the
    trainer's history), nothing online."""
    contents: int = 0
    encoded: int = 0
    already: int = 0
    """Contents the item log (and, for a listed item's newest, the store) already held under
    this version: done by an earlier run."""
    rejected: dict[str, str] = field(default_factory=dict)
    """item_id -> why the encoder failed on it alone (its item event is kept, unembedded)."""


class Backfill:
    """Embeds a catalog's history with ``encoder`` into ``log`` and ``store``, beside what
    serves.

    Every content an item ever had is embedded, available from the event that first
    carried it (as the stream embedded it on arrival), so a model trained on the new
    version sees as much history as one trained on the old; online, only each listed
    item's newest content is written, under its (item, version) key.

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

    def history(self, events: Iterable[ItemEvent]
                ) -> tuple[dict[str, list[ItemEvent]], set[str]]:
        """Per item (sorted by id), the events that started each of its contents, oldest
        first: an upsert whose content hash differs from the item's previous upsert's (a
        price change is not a new content; a re-listing of the same content neither, as in
        the stream); and the items whose newest event is a delete."""
        by_item: dict[str, list[ItemEvent]] = {}
        for event in sorted(events, key=lambda e: e.event_time):  # stable for equal times
            by_item.setdefault(event.item_id, []).append(event)
        starts: dict[str, list[ItemEvent]] = {}
        withdrawn = set()
        for item_id in sorted(by_item):
            last_hash, firsts = None, []
            for event in by_item[item_id]:
                if event.op is ItemOp.UPSERT:
                    h = self.encoder.content_hash(event)
                    if h != last_hash:
                        firsts.append(event)
                        last_hash = h
            starts[item_id] = firsts
            if by_item[item_id][-1].op is ItemOp.DELETE:
                withdrawn.add(item_id)
        return starts, withdrawn

    def run(self, events: Iterable[ItemEvent], progress: bool = False,
            on_batch: Callable[[BackfillResult], None] | None = None) -> BackfillResult:
        """Embed every content of ``events``' items not yet in the item log under this
        version, and write each listed item's newest content to the store unless it holds
        it already. ``on_batch`` sees the running result after each batch is durable (log
        and store written). Raises when the store, the log or the encoder itself fails;
        what earlier batches wrote stays, and a new run resumes after it."""
        from tqdm import tqdm

        from feature_repo.item_log import read_item_log

        version = self.encoder.encoder_version
        self.log.record_version(self.encoder.provenance)  # before any vector of it is logged
        starts, withdrawn = self.history(events)
        log = read_item_log(self.log.folder)
        done = {(i, h) for i, v, h in zip(log["item_id"].to_pylist(),
                                          log["encoder_version"].to_pylist(),
                                          log["content_hash"].to_pylist(), strict=True)
                if v == version}
        ids = [i for i in starts if starts[i]]
        gone = withdrawn & set(ids)
        result = BackfillResult(version, items=len(ids) - len(gone), withdrawn=len(gone),
                                contents=sum(len(starts[i]) for i in ids))
        bar = tqdm(total=len(ids), desc=f"backfill {version[:24]}", unit="item",
                   disable=not progress)
        for start in range(0, len(ids), self.batch_size):
            batch = ids[start:start + self.batch_size]
            listed = [i for i in batch if i not in withdrawn]
            held = self.store.fetch_items(listed, encoder_version=version)
            online = {i for i in listed if not embedded(
                held[i].state if i in held else None, self.encoder, starts[i][-1])}
            todo = [e for i in batch for e in starts[i]
                    if (i, self.encoder.content_hash(e)) not in done
                    or (i in online and e is starts[i][-1])]
            result.already += sum(len(starts[i]) for i in batch) - len(todo)
            rows, newest = [], []
            # encode() keeps one event per item: the k-th contents of the items, round by round.
            for k in range(max((len(starts[i]) for i in batch), default=0)):
                round_ = [e for e in todo if len(starts[e.item_id]) > k
                          and starts[e.item_id][k] is e]
                if not round_:
                    continue
                embeddings, failed = encode_each(self.encoder, round_)
                for event, exc in failed:
                    result.rejected[event.item_id] = f"encoder failed: {str(exc)[:500]}"
                bad = {id(e) for e, _ in failed}
                kept = [e for e in round_ if id(e) not in bad]
                got = embedding_rows(kept, embeddings, version, now_us())
                rows += got
                newest += [r for r, e in zip(got, kept, strict=True)
                           if e.item_id in online and e is starts[e.item_id][-1]]
            # Offline first, then online (as the stream): a crash between repeats the batch.
            self.log.append(rows, [r.embedded_at_us for r in rows])
            self.store.write_item_embeddings(newest, newest=False)
            done |= {(r.item_id, r.content_hash) for r in rows}
            result.encoded += len(rows)
            bar.update(len(batch))
            if on_batch:
                on_batch(result)
        bar.close()
        return result
