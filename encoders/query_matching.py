"""QM: fine-tune the text encoder on search queries and the items clicked for them.

The PPM paper fine-tunes its BERT on query matching before its vectors feed the ranker: a
query and the title of the item clicked for it should embed close together. Here the pairs
come from the labelled training log (any sample with a ``query``: the simulator's search
sessions, or imported interactions with a query column) and the loss is contrastive with
in-batch negatives (InfoNCE), plus one *hard* negative per pair: an item shown on the same
results page and not clicked. Without it a search for "black coat" would only learn that
black coats match it, which the pretrained model already knows; with it the encoder also
learns which black coats searchers pick.

The item side is :func:`encoders.item_encoder.item_text` of the item as it was at the
impression, the very text the stream embeds, and pooling is :func:`encoders.text_encoder.embed`,
so a fine-tuned model serves as it trained. Logs without queries (ratings) give
:func:`next_click_pairs` instead: a user's earlier click as the query, the next one as the
positive. :func:`retrieval` is the held-out check: recall@k (and MRR) of the clicked item
among every candidate text, by cosine to the query.
"""

from __future__ import annotations

import bisect
import copy
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from encoders.item_encoder import item_text
from encoders.text_encoder import TextEncoder, embed, embed_all
from ppm.events import ItemEvent, ItemOp


@dataclass(frozen=True)
class QueryPair:
    """One search result that was clicked: its query, the clicked item's text and, where the
    page showed one, the text of an item shown with it and not clicked."""

    query: str
    clicked: str
    clicked_id: str
    shown: str | None = None
    shown_id: str | None = None


@dataclass(frozen=True)
class QMConfig:
    """Query-matching fine-tuning settings (``ppm finetune text`` options)."""

    epochs: int = 3
    """Most passes over the pairs; the epoch with the best validation recall is kept."""
    batch_size: int = 64
    lr: float = 2e-5
    temperature: float = 0.05
    """Softmax temperature of the cosine similarities (sentence-transformers' default 20x
    scale)."""
    k: int = 10
    """Recall@k of :func:`retrieval`."""
    seed: int = 0


@dataclass
class QMResult:
    """What :func:`finetune` did: the retrieval metrics before and after, per epoch."""

    before: dict[str, float]
    after: dict[str, float]
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    """0: no epoch beat the pretrained model on validation, which is kept."""
    pairs: int = 0


class CatalogTexts:
    """Each item's text (:func:`~encoders.item_encoder.item_text`) through time, from its
    item events: :meth:`at` gives the text as of a moment, so a training pair never reads a
    title written after its impression."""

    def __init__(self, events: Iterable[ItemEvent]):
        self._history: dict[str, tuple[list[int], list[str | None]]] = {}
        for event in sorted(events, key=lambda e: e.event_time):
            times, texts = self._history.setdefault(event.item_id, ([], []))
            times.append(int(event.event_time.timestamp() * 1_000_000))
            texts.append(item_text(event) if event.op is ItemOp.UPSERT else None)

    def __len__(self) -> int:
        return len(self._history)

    def at(self, item_id: str, t_us: int) -> str | None:
        """The item's text at ``t_us``; None before its first event or after a delete."""
        history = self._history.get(item_id)
        if history is None:
            return None
        i = bisect.bisect_right(history[0], t_us) - 1
        return history[1][i] if i >= 0 else None

    def as_of(self, t_us: int) -> dict[str, str]:
        """Every item listed at ``t_us`` -> its text then: the candidates of a search."""
        texts = {item: self.at(item, t_us) for item in self._history}
        return {item: text for item, text in texts.items() if text is not None}


def query_pairs(log: pd.DataFrame, texts: CatalogTexts, seed: int = 0) -> list[QueryPair]:
    """The clicked search results of ``log`` (training-log rows: ``request_id``,
    ``item_id``, ``query``, ``click``, ``impression_time``) as pairs, each with one item of
    its page that was shown and not clicked (drawn with ``seed``), where there is one. Rows
    whose item has no text at the impression (unknown, deleted) are left out."""
    rng = random.Random(seed)
    searched = log[log["query"].notna()]
    pairs = []
    for _, page in searched.groupby("request_id", sort=True):
        rows = list(zip(page["item_id"], page["click"], page["query"], _micros(page),
                        strict=True))
        skipped = [(i, t) for i, c, _, t in rows if not c and texts.at(i, t) is not None]
        for item, click, query, t in rows:
            clicked = texts.at(item, t) if click else None
            if clicked is None:
                continue
            shown_id, shown_t = rng.choice(skipped) if skipped else (None, None)
            pairs.append(QueryPair(query, clicked, item,
                                   texts.at(shown_id, shown_t) if shown_id else None, shown_id))
    return pairs


def next_click_pairs(log: pd.DataFrame, texts: CatalogTexts, since_us: int | None = None,
                     seed: int = 0) -> list[QueryPair]:
    """Pairs for logs without search queries (ratings, browsing): each click of a user
    after an earlier click of another item, as (the earlier item's text, the clicked item's
    text). The hard negative is an item the same user was shown and did not click (drawn
    with ``seed``), where there is one. The encoder learns to put what a user clicks next
    near what the user clicked before.

    Args:
        log: training-log rows (``user_id``, ``item_id``, ``click``, ``impression_time``),
            in any order.
        since_us: only clicks at or after it become pairs, and only rows at or after it
            give hard negatives; earlier rows are history, so a period's first pairs
            follow the clicks before it. None: every row.
    """
    rng = random.Random(seed)
    start = -1 if since_us is None else since_us
    pairs = []
    for _, rows in log.sort_values(["user_id", "impression_time"], kind="stable").groupby(
            "user_id", sort=True):
        rows = list(zip(rows["item_id"], rows["click"], _micros(rows), strict=True))
        shown = [(i, t) for i, c, t in rows
                 if not c and t >= start and texts.at(i, t) is not None]
        previous = None
        for item, click, t in rows:
            if not click:
                continue
            clicked = texts.at(item, t)
            if (previous is not None and previous[0] != item and clicked is not None
                    and t >= start):
                query = texts.at(*previous)
                if query is not None:
                    shown_id, shown_t = rng.choice(shown) if shown else (None, None)
                    pairs.append(QueryPair(query, clicked, item, texts.at(shown_id, shown_t)
                                           if shown_id else None, shown_id))
            previous = (item, t)
    return pairs


def _micros(frame: pd.DataFrame) -> list[int]:
    return [int(t.timestamp() * 1_000_000) for t in frame["impression_time"]]


def retrieval(model: torch.nn.Module, tokenizer, pairs: Sequence[QueryPair],
              candidates: Mapping[str, str], k: int = 10, max_length: int = 64,
              batch_size: int = 128) -> dict[str, float]:
    """Recall@k and MRR of each pair's clicked item among ``candidates`` (item id -> text)
    ranked by cosine to the query; ``pairs`` whose clicked item is not a candidate are
    left out (``n`` counts those kept)."""
    ids = list(candidates)
    column = {item: i for i, item in enumerate(ids)}
    kept = [p for p in pairs if p.clicked_id in column]
    if not kept:
        return {"recall_at_k": float("nan"), "mrr": float("nan"), "n": 0, "k": k}
    docs = embed_all(model, tokenizer, [candidates[i] for i in ids], max_length, batch_size)
    queries = sorted({p.query for p in kept})
    q_vec = embed_all(model, tokenizer, queries, max_length, batch_size)
    scores = q_vec @ docs.T  # (Q, N)
    row = {q: i for i, q in enumerate(queries)}
    target = np.array([scores[row[p.query], column[p.clicked_id]] for p in kept])
    # Rank = 1 + candidates scored strictly higher: ties do not count against the target.
    ranks = 1 + np.array([(scores[row[p.query]] > t).sum() for p, t in zip(kept, target,
                                                                         strict=True)])
    return {"recall_at_k": float((ranks <= k).mean()), "mrr": float((1.0 / ranks).mean()),
            "n": len(kept), "k": k}


def contrastive_loss(q: torch.Tensor, docs: torch.Tensor, doc_ids: Sequence[str],
                     queries: Sequence[str], temperature: float) -> torch.Tensor:
    """InfoNCE of each query against every document of the batch.

    Args:
        q: ``(B, d)`` normalised query vectors; query ``i``'s positive is ``docs[i]``.
        docs: ``(B + H, d)`` normalised: the B clicked items, then H hard negatives.
        doc_ids: item id of each row of ``docs``.
        queries: the B query texts.

    A row holding an item clicked in the batch for the same query text (query ``i``'s own
    item included, as a duplicate or as another pair's hard negative) is not a negative for
    query ``i``: it is masked out rather than pushed away.
    """
    b = q.shape[0]
    logits = q @ docs.T / temperature  # (B, B + H)
    clicked: dict[str, set[str]] = {}
    for query, item in zip(queries, doc_ids[:b], strict=True):
        clicked.setdefault(query, set()).add(item)
    mask = torch.tensor([[j != i and item in clicked[queries[i]] for j, item in
                          enumerate(doc_ids)] for i in range(b)])  # (B, B + H)
    logits = logits.masked_fill(mask, float("-inf"))
    return torch.nn.functional.cross_entropy(logits, torch.arange(b))


def finetune(encoder: TextEncoder, train: Sequence[QueryPair], valid: Sequence[QueryPair],
             candidates: Mapping[str, str], cfg: QMConfig = QMConfig(),
             progress: bool = False,
             on_epoch: Callable[[dict[str, float]], None] | None = None) -> QMResult:
    """Fine-tune ``encoder.model`` in place on ``train`` pairs; keep the weights of the
    epoch whose validation recall@k (``valid`` pairs among ``candidates``) is best, the
    pretrained ones when no epoch beats them. The encoder is left frozen, in eval mode.

    Raises:
        ValueError: no training pairs, or no validation pair whose item is a candidate.
    """
    from tqdm import tqdm

    if not train:
        raise ValueError("no (query, clicked item) pairs to train on: the training period "
                         "has no clicked sample with a query")
    model, tokenizer, length = encoder.model, encoder.tokenizer, encoder.max_length

    def score() -> dict[str, float]:
        model.eval()
        return retrieval(model, tokenizer, valid, candidates, cfg.k, length)

    before = score()
    if not before["n"]:
        raise ValueError("no validation pair whose clicked item is among the candidates: "
                         "nothing would choose the epoch")
    torch.manual_seed(cfg.seed)
    order = random.Random(cfg.seed)
    best, best_state, best_epoch = before["recall_at_k"], copy.deepcopy(model.state_dict()), 0
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    model.requires_grad_(True)
    result = QMResult(before=before, after=before, pairs=len(train))
    pairs = list(train)
    for epoch in range(1, cfg.epochs + 1):
        order.shuffle(pairs)
        model.train()
        losses = []
        steps = range(0, len(pairs), cfg.batch_size)
        for start in tqdm(steps, desc=f"qm epoch {epoch}", disable=not progress, leave=False):
            batch = pairs[start:start + cfg.batch_size]
            hard = [p for p in batch if p.shown is not None]
            texts = [p.clicked for p in batch] + [p.shown for p in hard]
            ids = [p.clicked_id for p in batch] + [p.shown_id for p in hard]
            q = embed(model, tokenizer, [p.query for p in batch], length)  # (B, d)
            docs = embed(model, tokenizer, texts, length)  # (B + H, d)
            loss = contrastive_loss(q, docs, ids, [p.query for p in batch], cfg.temperature)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        valid_now = score()
        metrics = {"epoch": epoch, "loss": float(np.mean(losses)), **valid_now}
        result.epochs.append(metrics)
        if on_epoch:
            on_epoch(metrics)
        if valid_now["recall_at_k"] > best:
            best, best_epoch = valid_now["recall_at_k"], epoch
            best_state = copy.deepcopy(model.state_dict())
            result.after = valid_now
    model.load_state_dict(best_state)
    model.eval()
    model.requires_grad_(False)
    result.best_epoch = best_epoch
    return result


def save(encoder: TextEncoder, out: Path) -> Path:
    """Write ``encoder``'s model and tokenizer to ``out`` (a model folder there is
    replaced; anything else there is refused: ValueError), a directory
    ``encoders.text_model`` can name: its content hash becomes the new encoder identity."""
    import shutil

    if out.exists() and not (out / "config.json").is_file():
        raise ValueError(f"{out} exists and is not a model folder: not replacing it")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    encoder.model.save_pretrained(tmp)
    encoder.tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
