"""What an item's cached vector says about how new items are clicked, on the validation period.

PPM can only rescue a new item where its content predicts its clicks beyond what the ids,
the category and the click rates already say. This measures that ceiling on any data dir,
before any model is trained, reading the train and validation periods only (the split of
``ppm train --batch``; the test period is never read):

- each item's click-rate lift over the train period (smoothed, as the baselines count it)
  is regressed on the item's cached vector (ridge; its strength chosen by 5-fold
  cross-validation over the training items, weighted by impressions);
- on the validation period's impressions of items first seen in it (``new_in_valid``, the
  items no id or rate knows), the click AUC of the user's plus the category's lift (what
  ``idrec`` and the regression baseline know of a new item), of the same plus the vector's
  predicted lift, and of the same plus the item's own rate in the validation period,
  leaving out the impression itself (what an item prior that knew the item's clicks
  would add: a reference for the vector's share, not a ceiling; with a few impressions an
  item its own rate is noise and can lose);
- the same for the *user's* content affinity, which a non-personal prior cannot see: the
  cosine of the new item's vector with the mean vector of the user's behaviour sequence at
  the impression (what ``ppm``'s behaviour transformer reads; vectors centred on the
  training period's mean first). Its weight beside the user's and the category's lift is a
  logistic regression on the training impressions of items not already in the sequence
  (the lifts left one out), against the same regression without it;
- the user's *contrast*, which a sequence of interactions alone cannot give: the cosines of
  the new item's vector with the mean vector of the items the user took (clicked) and with
  that of every item the user was shown, over the user's impressions before this one (the
  train and validation periods; vectors centred as above), beside the user's and the
  category's lift and the user's counts so far (log impressions, log clicks and their
  smoothed rate), against the same without the two cosines: what a model reading the
  user's impressions in its sequence (``features.sequence_impressions``) could gain by
  content; a regression on the training impressions weighs them;
- 95% intervals and the paired differences by bootstrap over users
  (``trainer.experiment.compare_models``).

Run ``python bench/content_signal.py --data-dir DIR``; the last line printed is one JSON
object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from ppm.config import Config
from trainer.baselines import PRIOR_STRENGTH, RateTable, clicks, newton_logistic
from trainer.experiment import compare_models
from trainer.features import IMPRESSION_CODE
from trainer.train import IncrementalTrainer, new_in_period, split_windows

RIDGE_STRENGTHS = (1.0, 10.0, 100.0, 1000.0)
FOLDS = 5


def ridge(x: np.ndarray, y: np.ndarray, w: np.ndarray, strength: float) -> np.ndarray:
    """Weights (d + 1,) (the last an intercept, not penalised) minimising
    ``sum w (x @ b - y)^2 + strength |b|^2``; ``x`` (n, d), ``y`` and ``w`` (n,)."""
    xb = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    penalty = strength * np.eye(xb.shape[1])
    penalty[-1, -1] = 0.0
    return np.linalg.solve(xb.T @ (xb * w[:, None]) + penalty, xb.T @ (w * y))


def predict(x: np.ndarray, b: np.ndarray) -> np.ndarray:
    return x @ b[:-1] + b[-1]


def chosen_strength(x: np.ndarray, y: np.ndarray, w: np.ndarray, seed: int = 0) -> float:
    """The ridge strength of :data:`RIDGE_STRENGTHS` with the least weighted squared error
    over :data:`FOLDS` folds of the items."""
    fold = np.random.default_rng(seed).integers(0, FOLDS, len(x))
    errors = []
    for strength in RIDGE_STRENGTHS:
        error = 0.0
        for k in range(FOLDS):
            fit, held = fold != k, fold == k
            b = ridge(x[fit], y[fit], w[fit], strength)
            error += float(np.sum(w[held] * (predict(x[held], b) - y[held]) ** 2))
        errors.append(error)
    return RIDGE_STRENGTHS[int(np.argmin(errors))]


def sequence_affinity(vectors: np.ndarray, target_rows: np.ndarray, seq_rows: np.ndarray,
                      centre: np.ndarray) -> np.ndarray:
    """(n,) cosine of each target's vector with the mean of its sequence's vectors.

    ``vectors`` (M, d), row 0 "missing"; ``target_rows`` (n,) and ``seq_rows`` (n, L) rows
    of it (0: none or padding). The rows are centred on ``centre`` (d,) and scaled to unit
    length first: raw text vectors share a large common direction, so their cosines say
    little. 0 where the target or the whole sequence has no vector."""
    x = vectors[1:].astype(np.float64) - centre
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    unit = np.concatenate([np.zeros((1, x.shape[1])), x])
    out = np.empty(len(target_rows))
    for at in range(0, len(target_rows), 4096):  # in chunks: (n, L, d) would not fit
        rows = seq_rows[at:at + 4096]
        seq = np.zeros((len(rows), unit.shape[1]))
        for column in rows.T:
            seq += unit[column]  # padding rows add 0
        seq /= np.maximum(np.linalg.norm(seq, axis=1, keepdims=True), 1e-12)
        out[at:at + 4096] = np.einsum("nd,nd->n", unit[target_rows[at:at + 4096]], seq)
    return out


def contrast(users: np.ndarray, times_us: np.ndarray, clicked: np.ndarray,
             unit: np.ndarray) -> np.ndarray:
    """(n, 5) for n impressions: the cosines of each one's item vector with the mean of the
    user's clicked items' and of all the user's shown items' vectors, then log(1 + shown),
    log(1 + clicked) and the smoothed click rate's log lift, all over the same user's
    impressions strictly before it (those at the same time see none of each other). An
    earlier impression counts with its label as finally attributed: on data whose clicks
    come later than their impression (within ``pipeline.attribution_window_s``), a click
    may count here before it happened; on ratings it comes with the rating.
    ``unit`` (n, d): unit vectors, 0 for an item without one (it counts, adds nothing)."""
    out = np.zeros((len(users), 5))
    prior = float(np.clip(clicked.mean(), 1e-4, 1 - 1e-4))
    order = np.lexsort((times_us, users))
    bounds = np.flatnonzero(np.r_[True, users[order][1:] != users[order][:-1], True])
    for a, b in itertools.pairwise(bounds):
        rows = order[a:b]
        took, shown = np.zeros(unit.shape[1]), np.zeros(unit.shape[1])
        n_took = n_shown = 0
        start = 0
        while start < len(rows):
            end = start
            while end < len(rows) and times_us[rows[end]] == times_us[rows[start]]:
                end += 1
            same = rows[start:end]
            for i, total in enumerate((took, shown)):
                norm = np.linalg.norm(total)
                out[same, i] = unit[same] @ total / norm if norm > 0 else 0.0
            out[same, 2:] = (np.log1p(n_shown), np.log1p(n_took),
                             np.log((n_took + PRIOR_STRENGTH * prior)
                                    / (n_shown + PRIOR_STRENGTH) / prior))
            for r in same:
                shown += unit[r]
                n_shown += 1
                if clicked[r]:
                    took += unit[r]
                    n_took += 1
            start = end
    return out


def logistic_scores(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The logits of ``x`` (n, k) under a logistic regression with an intercept fitted on
    ``train_x`` (N, k) against ``train_y`` (N,) (:func:`newton_logistic`, L2 1)."""
    return predict(x, newton_logistic(train_x, train_y, l2=1.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="default: the config's")
    parser.add_argument("--test-share", type=float, default=0.2)
    parser.add_argument("--valid-share", type=float, default=0.1)
    args = parser.parse_args()

    started = time.perf_counter()
    cfg = Config()
    if args.data_dir:
        cfg = cfg.model_copy(update={"data_dir": args.data_dir})
    split = split_windows(cfg, args.test_share, args.valid_share)
    if not (split.train and split.valid):
        raise SystemExit("no closed windows in the train or the validation period")
    # A variant that reads the vectors; from scratch: the encoder version the config names
    # (else the newest), never a registered champion's.
    trainer = IncrementalTrainer(cfg, variant="ppm", from_scratch=True)
    train, valid = trainer.dataset(split.train), trainer.dataset(split.valid)
    y_train, y = clicks(train), clicks(valid)
    prior = float(np.clip(y_train.mean(), 1e-4, 1 - 1e-4))
    base = float(np.log(prior / (1 - prior)))

    def lift(ids_train, ids, leave_out: np.ndarray | None = None) -> np.ndarray:
        return RateTable.count(ids_train, y_train, prior, PRIOR_STRENGTH).logits(
            ids, leave_out) - base

    # The ridge's targets: each training item's lift, at the vector of its last impression.
    items = RateTable.count(train.item_ids, y_train, prior, PRIOR_STRENGTH)
    vectors, rows = train.modal.vectors, train.features["target_modal_row"]
    last_row = {item: row for item, row in zip(train.item_ids, rows, strict=True) if row}
    known = [item for item in items.index if item in last_row]
    if not known:
        raise SystemExit("no training item has a cached vector (run ppm backfill?)")
    x = vectors[[last_row[item] for item in known]].astype(np.float64)
    target = items.logits(known) - base
    weight = items.shows[[items.index[item] for item in known]]
    strength = chosen_strength(x, target, weight)
    if strength in (RIDGE_STRENGTHS[0], RIDGE_STRENGTHS[-1]):
        print(f"note: the ridge strength chosen ({strength:g}) is at the end of the grid "
              f"{RIDGE_STRENGTHS}: the best may lie beyond it", file=sys.stderr)
    b = ridge(x, target, weight, strength)

    new = new_in_period(valid, split.valid_start_us)
    if not new.any():
        raise SystemExit("no impression of an item new in the validation period")
    v_rows = valid.features["target_modal_row"][new]
    content = np.where(v_rows > 0, predict(valid.modal.vectors[v_rows].astype(np.float64), b),
                       0.0)
    user = lift(train.user_id, valid.user_id[new])
    category = lift(train.features["category"], valid.features["category"][new])
    y_new = y[new]
    new_items = [i for i, n in zip(valid.item_ids, new, strict=True) if n]
    own = RateTable.count(new_items, y_new, prior, PRIOR_STRENGTH).logits(
        new_items, leave_out=y_new) - base
    # The user's affinity, weighed by a regression on the training impressions whose lifts
    # leave each impression's own click out (else the lifts would carry the label). Only
    # impressions of items with a vector that are not already in the sequence, as a new
    # item's: one that is would be matched against its own vector. The vectors are centred
    # on the training period's (the rows its impressions and sequences read): nothing of
    # later periods.
    def taken(data) -> np.ndarray:  # the sequence's interactions only (no impressions)
        return np.where(data.features["seq_action"] == IMPRESSION_CODE, 0,
                        data.features["seq_modal_row"])

    seq_train = taken(train)
    fresh = (rows > 0) & ~(seq_train == rows[:, None]).any(axis=1)
    used = np.unique(np.concatenate([rows, seq_train.ravel()]))
    centre = vectors[used[used > 0]].astype(np.float64).mean(axis=0)
    train_affinity = sequence_affinity(vectors, rows[fresh], seq_train[fresh], centre)
    affinity = sequence_affinity(valid.modal.vectors, v_rows, taken(valid)[new], centre)
    all_lifts = np.stack([
        lift(train.user_id, train.user_id, leave_out=y_train),
        lift(train.features["category"], train.features["category"], leave_out=y_train)],
        axis=1)
    train_lifts = all_lifts[fresh]
    lifts = np.stack([user, category], axis=1)

    # The user's contrast, over both periods' impressions in time order (each sees only
    # earlier ones, as a sequence of the user's impressions would).
    both = np.concatenate([rows, valid.features["target_modal_row"]])
    unit = np.where((both > 0)[:, None], np.concatenate(
        [vectors[rows], valid.modal.vectors[valid.features["target_modal_row"]]]
    ).astype(np.float64) - centre, 0.0)
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    seen = contrast(np.concatenate([train.user_id, valid.user_id]).astype(str),
                    np.concatenate([train.impression_us, valid.impression_us]),
                    np.concatenate([y_train, y]) > 0, unit)
    seen_train, seen_new = seen[:len(rows)], seen[len(rows):][new]
    counted = rows > 0  # impressions of items with a vector, as for the affinity
    scores = {"user_category": user + category,
              "user_category_content": user + category + content,
              "content": content,
              "user_category_item_oracle": user + category + own,
              "affinity": affinity,
              "user_category_fitted": logistic_scores(train_lifts, y_train[fresh], lifts),
              "user_category_affinity": logistic_scores(
                  np.column_stack([train_lifts, train_affinity]), y_train[fresh],
                  np.column_stack([lifts, affinity])),
              "user_category_counts": logistic_scores(
                  np.column_stack([all_lifts, seen_train[:, 2:]])[counted], y_train[counted],
                  np.column_stack([lifts, seen_new[:, 2:]])),
              "user_category_contrast": logistic_scores(
                  np.column_stack([all_lifts, seen_train])[counted], y_train[counted],
                  np.column_stack([lifts, seen_new]))}
    pairs = [("user_category_content", "user_category"),
             ("user_category_item_oracle", "user_category"),
             ("user_category_affinity", "user_category_fitted"),
             ("user_category_contrast", "user_category_counts")]
    result = compare_models(y_new, valid.user_id[new], scores, pairs)
    out = {"data_dir": str(cfg.data_dir),
           "windows": {"train": len(split.train), "valid": len(split.valid)},
           "training_items_with_vectors": len(known), "ridge_strength": strength,
           "new_in_valid": {"impressions": int(new.sum()), "items": len(set(new_items)),
                            "with_vector": round(float((v_rows > 0).mean()), 4),
                            "positives": result["positives"]}}
    for name, model in result["models"].items():
        out[f"auc_{name}"] = round(model["auc"], 4)
        out[f"auc_{name}_ci95"] = [round(v, 4) for v in model["ci95_users"]]
    for name, diff in result["diffs"].items():
        key = "diff_" + name.replace("-", "_minus_")
        out[key] = round(diff["auc"], 4)
        out[f"{key}_ci95"] = [round(v, 4) for v in diff["ci95"]]
    out["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
