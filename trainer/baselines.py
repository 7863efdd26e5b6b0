"""What a ranker's click AUC is read against: simple baselines below it, the oracle above.

* :class:`PositiveRate`: each item's click rate, smoothed towards the global rate.
* :class:`LogisticBaseline`: the small logistic regression a sceptic fits first, on the
  user's and the item's smoothed click rates and the item's category and brand.
* :class:`Oracle`: the simulator's true click logit of each impression, where the data come
  from the simulator: the best ranking any model could reach on those rows.

Baselines are fitted on the training period only and score the samples of any
:class:`trainer.dataset.WindowDataset`, or of a :class:`Samples`, which keeps only what a
baseline reads (``user_id``, ``item_ids``, click labels and hashed ``category`` and
``brand``), so an online run can refit on every window so far without keeping their
sequence features. Every ``scores`` is a logit per sample, (n,) float64: only the order
matters to AUC. Fitting is deterministic (no random state).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.dataset import WindowDataset
from trainer.metrics import auc

PRIOR_STRENGTH = 10.0
"""Pseudo-impressions of the Beta prior that smooths a click rate towards the global rate:
an item with ten impressions is halfway between its own rate and the global one."""
STRENGTHS = (1.0, 3.0, 10.0, 30.0, 100.0)
"""The prior strengths :meth:`PositiveRate.tuned` chooses among on validation."""
ONE_HOT_FIELDS = ("category", "brand")
"""Item profile fields :class:`LogisticBaseline` reads as one-hot columns (where known)."""
MAX_LEVELS = 50
"""One-hot columns per field at most: the most frequent values in training; rarer ones
share the all-zero base level, so a catalog of thousands of brands stays a small fit."""


@dataclass(frozen=True)
class Samples:
    """What a baseline reads of n samples: their users and items, click labels and the
    hashed profile fields of :data:`ONE_HOT_FIELDS`."""

    user_id: np.ndarray
    """(n,) object."""
    item_ids: list
    """(n,) item ids."""
    click: np.ndarray
    """(n,) float64, 0 or 1."""
    features: dict[str, np.ndarray]
    """field -> (n,) int64, for each of :data:`ONE_HOT_FIELDS`."""

    @classmethod
    def of(cls, data: WindowDataset | Samples) -> Samples:
        if isinstance(data, Samples):
            return data
        return cls(data.user_id, list(data.item_ids), clicks(data),
                   {f: data.features[f] for f in ONE_HOT_FIELDS})

    @classmethod
    def concat(cls, parts: Sequence[WindowDataset | Samples]) -> Samples:
        """The samples of ``parts``, in order."""
        parts = [cls.of(p) for p in parts]
        if not parts:
            return cls(np.zeros(0, object), [], np.zeros(0), {f: np.zeros(0, np.int64)
                                                             for f in ONE_HOT_FIELDS})
        return cls(np.concatenate([p.user_id for p in parts]),
                   [i for p in parts for i in p.item_ids],
                   np.concatenate([p.click for p in parts]),
                   {f: np.concatenate([p.features[f] for p in parts]) for f in ONE_HOT_FIELDS})

    def __len__(self) -> int:
        return len(self.click)


def clicks(data: WindowDataset | Samples) -> np.ndarray:
    """The click label of every sample, float64 (n,)."""
    if isinstance(data, Samples):
        return data.click
    tasks = data.config.tasks
    if "click" not in tasks:
        raise ValueError(f"the baselines predict clicks; the model's tasks are {tasks}")
    if not len(data):
        return np.zeros(0)
    return data.labels[:, tasks.index("click")].astype(np.float64)


def _training_clicks(train: WindowDataset | Samples) -> tuple[np.ndarray, float]:
    """The training samples' click labels and their global rate (kept off 0 and 1, so its
    logit is finite)."""
    if not len(train):
        raise ValueError("no training samples to fit a baseline on")
    y = clicks(train)
    return y, float(np.clip(y.mean(), 1e-4, 1 - 1e-4))


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class RateTable:
    """Impressions and clicks per id (user or item) over some samples, and their click rates
    smoothed towards ``prior`` by ``strength`` pseudo-impressions:
    ``(clicks + strength * prior) / (impressions + strength)``."""

    index: dict[Hashable, int]
    """id -> its position in ``shows`` and ``clicks``."""
    shows: np.ndarray
    """(K,) float64: impressions per id."""
    clicks: np.ndarray
    """(K,) float64: clicks per id."""
    prior: float
    strength: float

    @classmethod
    def count(cls, ids: Sequence[Hashable], labels: np.ndarray, prior: float,
              strength: float) -> RateTable:
        """Count ``labels`` (0/1, (n,)) by ``ids`` (n,)."""
        index: dict[Hashable, int] = {}
        codes = np.fromiter((index.setdefault(i, len(index)) for i in ids), np.int64, len(ids))
        return cls(index, np.bincount(codes, minlength=len(index)).astype(np.float64),
                   np.bincount(codes, weights=labels, minlength=len(index)), prior, strength)

    def logits(self, ids: Sequence[Hashable], leave_out: np.ndarray | None = None
               ) -> np.ndarray:
        """The smoothed click-rate logit of each of ``ids``, (n,); an id never counted gets
        the prior's.

        ``leave_out``: the labels of the very samples that were counted, in their order;
        each sample's own impression and click are then taken out of its rate (leave one
        out), so a model fitted on these rates never reads a sample's label in its input.
        """
        get = self.index.get
        codes = np.fromiter((get(i, -1) for i in ids), np.int64, len(ids))
        known = codes >= 0
        shows = np.where(known, self.shows[codes], 0.0)
        hits = np.where(known, self.clicks[codes], 0.0)
        if leave_out is not None:
            shows, hits = shows - 1.0, hits - leave_out
        rate = (hits + self.strength * self.prior) / (shows + self.strength)
        return _logit(np.clip(rate, 1e-6, 1 - 1e-6))


@dataclass(frozen=True)
class PositiveRate:
    """Each item's click rate over the training samples, smoothed towards the global rate
    by a Beta prior (:class:`RateTable`); an item never seen in training gets the global
    rate."""

    items: RateTable

    @classmethod
    def fit(cls, train: WindowDataset | Samples, strength: float = PRIOR_STRENGTH
            ) -> PositiveRate:
        y, prior = _training_clicks(train)
        return cls(RateTable.count(train.item_ids, y, prior, strength))

    @classmethod
    def tuned(cls, train: WindowDataset | Samples, valid: WindowDataset | Samples,
              strengths: Sequence[float] = STRENGTHS) -> PositiveRate:
        """Fitted on ``train`` with the prior strength whose click AUC on ``valid`` is the
        best (the first such; :data:`PRIOR_STRENGTH` where none is defined)."""
        y = clicks(valid)
        best: tuple[float, PositiveRate] | None = None
        for strength in strengths:
            fitted = cls.fit(train, strength)
            score = auc(y, fitted.scores(valid)) if len(valid) else None
            if score is not None and (best is None or score > best[0]):
                best = (score, fitted)
        return best[1] if best else cls.fit(train)

    def scores(self, data: WindowDataset | Samples) -> np.ndarray:
        """The smoothed click-rate logit of each sample's item, (n,)."""
        return self.items.logits(data.item_ids) if len(data) else np.zeros(0)


@dataclass(frozen=True)
class LogisticBaseline:
    """Logistic regression of a click on the user's and the item's smoothed click-rate
    logits (:class:`RateTable`) and one-hot category and brand, L2-regularised, fitted by
    Newton's method (IRLS) in float64.

    The rates of a training sample leave that sample out (``RateTable.logits(leave_out=)``):
    with its own click counted in, a user or item seen a few times would "predict" its
    labels, and the weights would learn that leak. Scoring uses the full training counts.
    (Leaving one out biases a rate slightly against its own label, most for ids seen a
    few times; the regression's weights absorb a little of it.)
    """

    users: RateTable
    items: RateTable
    levels: dict[str, np.ndarray]
    """field -> the hashed values with a one-hot column, in column order."""
    weights: np.ndarray
    """(2 + one-hot columns + 1,): user rate, item rate, the one-hots, then the intercept
    (:func:`newton_logistic`)."""

    @classmethod
    def fit(cls, train: WindowDataset | Samples, strength: float = PRIOR_STRENGTH,
            l2: float = 1.0) -> LogisticBaseline:
        """``l2``: the penalty ``l2 / 2 * |w|^2`` added to the summed log loss (every
        weight; against thousands of samples the intercept's share is negligible)."""
        y, prior = _training_clicks(train)
        users = RateTable.count(train.user_id, y, prior, strength)
        items = RateTable.count(train.item_ids, y, prior, strength)
        levels = {}
        for field in ONE_HOT_FIELDS:
            values = train.features[field]
            seen, counts = np.unique(values[values > 0], return_counts=True)
            if seen.size:  # 0 is "unknown": no column
                levels[field] = seen[np.argsort(-counts, kind="stable")[:MAX_LEVELS]]
        baseline = cls(users, items, levels, np.zeros(0))
        x = baseline._design(train, leave_out=y)
        return cls(users, items, levels, newton_logistic(x, y, l2))

    def scores(self, data: WindowDataset | Samples) -> np.ndarray:
        """The click logit of each sample, (n,)."""
        if not len(data):
            return np.zeros(0)
        return self._design(data) @ self.weights[:-1] + self.weights[-1]

    def _design(self, data: WindowDataset | Samples, leave_out: np.ndarray | None = None
                ) -> np.ndarray:
        """(n, len(weights) - 1) float64: the regression's inputs of every sample."""
        columns = [self.users.logits(data.user_id, leave_out),
                   self.items.logits(data.item_ids, leave_out)]
        for field, values in self.levels.items():
            columns += list((data.features[field][None, :] == values[:, None]).astype(float))
        return np.stack(columns, axis=1)


def newton_logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 50,
                     tol: float = 1e-8) -> np.ndarray:
    """Weights (d + 1,), ``x``'s d columns' then an intercept's, minimising the summed log
    loss of ``sigmoid(x @ w[:-1] + w[-1])`` against ``y`` (n,) plus ``l2 / 2 * |w|^2``;
    ``x`` (n, d). The intercept is penalised too: against thousands of samples a pull it
    does not feel, and it keeps labels of one class finite. The objective is strictly
    convex, so Newton's steps from zero converge, in a handful of steps in practice; a
    RuntimeWarning says when ``iterations`` ran out first (the weights are then the last
    step's)."""
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)  # (n, d + 1)
    w = np.zeros(x.shape[1])
    step = np.full(len(w), np.inf)
    for _ in range(iterations):
        p = 0.5 * (1.0 + np.tanh(0.5 * (x @ w)))
        gradient = x.T @ (p - y) + l2 * w
        hessian = (x * (p * (1.0 - p))[:, None]).T @ x + l2 * np.eye(len(w))
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < tol:
            return w
    warnings.warn(f"newton_logistic: no convergence in {iterations} steps (last step "
                  f"{np.abs(step).max():.2g}); using the last weights", RuntimeWarning,
                  stacklevel=2)
    return w


@dataclass(frozen=True)
class Oracle:
    """The simulator's truth: each impression's true click logit, without the position
    effect (the ``logit`` column of ``oracle.parquet``, which ``ppm simulate`` writes beside
    its JSONL; ``ShopSimulator.oracle()``). Scored on a model's test samples, its AUC is
    the ceiling the model is read against. Only for simulated data: never fed to a model.
    """

    logit_of: dict[tuple[str, str], float]
    """(request_id, item_id) -> the true click logit."""

    @classmethod
    def of(cls, request_ids: Sequence[str], item_ids: Sequence[str],
           logits: Sequence[float]) -> Oracle:
        return cls(dict(zip(zip(request_ids, item_ids, strict=True),
                            np.asarray(logits, np.float64).tolist(), strict=True)))

    @classmethod
    def read(cls, path: Path) -> Oracle:
        """An ``oracle.parquet`` file (columns ``request_id``, ``item_id``, ``logit``)."""
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["request_id", "item_id", "logit"])
        return cls.of(table.column("request_id").to_pylist(),
                      table.column("item_id").to_pylist(),
                      table.column("logit").to_numpy())

    def scores(self, data: WindowDataset) -> np.ndarray:
        """The true click logit of each sample, (n,), joined on (request_id, item_id).
        Raises ``ValueError`` when a sample has none: the oracle is of other data."""
        if not len(data):
            return np.zeros(0)
        get = self.logit_of.get
        out = np.fromiter((get(key, np.nan) for key in zip(data.request_id, data.item_ids,
                                                           strict=True)),
                          np.float64, len(data))
        missing = int(np.isnan(out).sum())
        if missing:
            raise ValueError(f"the oracle has no row for {missing:,} of {len(data):,} samples "
                             "(joined on request_id, item_id): it describes other data")
        return out
