"""Offline metrics for the ranker (``ppm eval``): AUC, GAUC, log loss, P@n, cold-start buckets,
and bootstrap intervals over users.

Pure numpy, so importing this module is cheap (no torch). Every function takes 1-D arrays of
one length ``N`` (anything ``np.asarray`` accepts) and returns Python ``float``/``int``/``None``,
never numpy scalars, so a report goes straight into ``json.dumps(..., allow_nan=False)``.

Conventions shared by all functions:

* ``labels``: 0/1 (bool, int or float). Any other value, NaN included, raises ``ValueError``.
* ``scores``: float, higher means more likely positive; logits or probabilities give the same
  ranking metrics. NaN raises ``ValueError`` (a model bug should not become a number);
  ``±inf`` is allowed and ranks as expected.
* ``groups``/``requests``/``users``: ids of any hashable type (int, str, an object array of
  str as pyarrow's ``to_numpy`` gives); rows with equal ids form one group.
* A metric that is undefined on its input (one class only, no request with ``n`` items, no
  rows) is ``None``, never NaN.

All metrics are vectorised: sort by (group, score) once, then count per group with
``np.add.reduceat``; :func:`auc` is :func:`gauc`'s routine with a single group. A million rows
take a fraction of a second. :func:`evaluate` sorts each task once and selects each bucket's
rows from the sorted order (a subset of a sorted array is still sorted).

:func:`bootstrap_auc` is the exception to the scalar rule: it returns the AUCs of several
models on many resamples of the users, as an array, for :func:`percentile_interval`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

HOUR_S = 3_600.0
DAY_S = 86_400.0

BUCKETS = ("all", "age<1h", "age<1d", "age1-7d", "age>7d", "no_click_before")
"""Cold-start buckets of :func:`cold_buckets`, in report order."""

METRICS = ("auc", "gauc", "logloss", "p_at_2")
"""The default metric columns of :func:`to_markdown` (``p_at_2`` is P@n for ``n=2``)."""


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _as_1d(values, name: str, length: int | None = None) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} has {arr.shape[0]} rows, expected {length}")
    return arr


def _as_binary(labels, name: str = "labels") -> np.ndarray:
    """0/1 labels -> bool array (N,); anything else raises."""
    y = _as_1d(labels, name)
    if y.dtype == np.bool_:
        return y
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{name} must be 0/1 (or bool); got other values, e.g. NaN or -1")
    return y == 1


def _as_scores(scores, length: int, name: str = "scores") -> np.ndarray:
    """Scores -> float64 array (N,); NaN raises."""
    s = _as_1d(scores, name, length).astype(np.float64, copy=False)
    if np.isnan(s).any():
        raise ValueError(f"{name} contain NaN")
    return s


def _group_codes(groups, length: int, name: str) -> np.ndarray:
    """Ids of any hashable type -> int64 codes (N,), equal ids sharing a code."""
    g = _as_1d(groups, name, length)
    if np.issubdtype(g.dtype, np.integer):
        return g.astype(np.int64, copy=False)  # already usable as codes
    # A dict beats np.unique on object arrays of str (no string sort; docs/results.md) and
    # takes any hashable id, None included.
    code_of: dict = {}
    return np.fromiter((code_of.setdefault(x, len(code_of)) for x in g.tolist()),
                       dtype=np.int64, count=length)


def _by_group(codes: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Refine ``order`` (rows sorted by score) into rows sorted by group, then that order."""
    return order[np.argsort(codes[order], kind="stable")]


def _group_starts(codes: np.ndarray | None, rows: int) -> np.ndarray:
    """bool (N,): True where a group begins in group-sorted ``codes`` (None: one group)."""
    new_group = np.zeros(rows, dtype=bool)
    if rows:
        new_group[0] = True
        if codes is not None:
            np.not_equal(codes[1:], codes[:-1], out=new_group[1:])
    return new_group


def _none_if_not_finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


# ---------------------------------------------------------------------------------------------
# Ranking metrics
# ---------------------------------------------------------------------------------------------


def _sorted_grouped_auc(y: np.ndarray, s: np.ndarray, codes: np.ndarray | None):
    """Per-group ROC AUC by the rank-sum (Mann-Whitney U) formula with average ranks for ties.

    Args:
        y: bool (N,) labels; s: float64 (N,) scores; codes: int64 (N,) group of each row, or
            None for one group. Rows sorted by group, then score ascending.

    Returns:
        ``(sizes, aucs)``: float64 arrays (G,), one entry per group; ``aucs`` is NaN for a
        group with one class only. Both are empty when N == 0.
    """
    rows = y.shape[0]
    if rows == 0:
        return np.zeros(0), np.zeros(0)
    new_group = _group_starts(codes, rows)
    new_tie = new_group.copy()  # a tie block never spans two groups
    new_tie[1:] |= s[1:] != s[:-1]

    # Each tie block [ts, te) gets the mean of ranks ts+1..te (1-based over the sorted array);
    # subtracting the group's start makes the ranks 1-based within the group.
    tie_starts = np.flatnonzero(new_tie)
    tie_ends = np.append(tie_starts[1:], rows)
    ranks = np.repeat((tie_starts + tie_ends + 1) / 2.0, tie_ends - tie_starts)
    index = np.arange(rows)
    ranks -= np.maximum.accumulate(np.where(new_group, index, 0))

    starts = np.flatnonzero(new_group)
    sizes = np.diff(np.append(starts, rows)).astype(np.float64)
    pos = np.add.reduceat(y.astype(np.float64), starts)
    pos_rank_sum = np.add.reduceat(np.where(y, ranks, 0.0), starts)
    neg = sizes - pos
    with np.errstate(divide="ignore", invalid="ignore"):
        aucs = (pos_rank_sum - pos * (pos + 1) / 2.0) / (pos * neg)
    aucs[(pos == 0) | (neg == 0)] = np.nan
    return sizes, aucs


def auc(labels, scores) -> float | None:
    """ROC AUC: the probability that a random positive outscores a random negative.

    Ties count one half (average ranks), so constant scores give 0.5.

    Args:
        labels: 0/1 or bool, shape (N,).
        scores: float, shape (N,); logits or probabilities (only the order matters).

    Returns:
        AUC in [0, 1], or ``None`` when the labels hold one class only (or N == 0).

    >>> auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> auc([0, 1, 1], [0.5, 0.5, 0.9])
    0.75
    >>> auc([1, 1], [0.2, 0.3]) is None
    True
    """
    y = _as_binary(labels)
    s = _as_scores(scores, y.shape[0])
    order = np.argsort(s)
    _, aucs = _sorted_grouped_auc(y[order], s[order], None)
    return _none_if_not_finite(aucs[0]) if aucs.size else None


def gauc(labels, scores, groups) -> float | None:
    """Group AUC: each group's (user's) AUC weighted by its number of rows (impressions).

    ``gauc = sum_u n_u * auc_u / sum_u n_u`` over the groups that have both classes; groups with
    one class only are skipped (neither their AUC nor their weight counts).

    Args:
        labels: 0/1 or bool, shape (N,).
        scores: float, shape (N,).
        groups: ids (int or str), shape (N,), e.g. ``user_id``.

    Returns:
        GAUC in [0, 1], or ``None`` when no group has both classes.

    >>> gauc([0, 1, 0, 1, 1], [0.1, 0.9, 0.8, 0.2, 0.5], ["a", "a", "b", "b", "c"])
    0.5
    """
    y = _as_binary(labels)
    s = _as_scores(scores, y.shape[0])
    codes = _group_codes(groups, y.shape[0], "groups")
    order = _by_group(codes, np.argsort(s))
    return _weighted_gauc(*_sorted_grouped_auc(y[order], s[order], codes[order]))


def _weighted_gauc(sizes: np.ndarray, aucs: np.ndarray) -> float | None:
    ok = ~np.isnan(aucs)
    if not ok.any():
        return None
    return float(np.sum(sizes[ok] * aucs[ok]) / np.sum(sizes[ok]))


def precision_at_n(labels, scores, requests, n: int = 2) -> float | None:
    """P@n as in the PPM paper: mean over requests of (positives among the top-n scored) / n.

    Only requests with at least ``n`` rows count. Tied scores are broken by input order (the
    earlier row ranks higher), so the result is deterministic.

    Args:
        labels: 0/1 or bool, shape (N,).
        scores: float, shape (N,).
        requests: ids (int or str), shape (N,); one request is one result page.
        n: items taken per request, >= 1.

    Returns:
        P@n in [0, 1], or ``None`` when no request has ``n`` rows.

    >>> precision_at_n([1, 0, 0, 0, 1, 1], [0.9, 0.8, 0.1, 0.3, 0.3, 0.7], [1, 1, 1, 2, 2, 3])
    0.5
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    y = _as_binary(labels)
    rows = y.shape[0]
    s = _as_scores(scores, rows)
    codes = _group_codes(requests, rows, "requests")
    # Stable sorts: by score descending, then by request, so ties keep input order.
    order = _by_group(codes, np.argsort(-s, kind="stable"))
    return _sorted_precision_at_n(y[order], codes[order], n)


def _sorted_precision_at_n(y: np.ndarray, codes: np.ndarray, n: int) -> float | None:
    """P@n of bool labels (N,) sorted by request codes (N,), then by rank within the request."""
    rows = y.shape[0]
    starts = np.flatnonzero(_group_starts(codes, rows))
    sizes = np.diff(np.append(starts, rows))
    position = np.arange(rows) - np.repeat(starts, sizes)  # 0-based rank within the request
    taken = (position < n) & (np.repeat(sizes, sizes) >= n)
    counted = int(np.count_nonzero(sizes >= n))
    if counted == 0:
        return None
    return float(np.count_nonzero(y & taken) / (n * counted))


def logloss(labels, probabilities, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy in nats, probabilities clipped to ``[eps, 1 - eps]``.

    Args:
        labels: 0/1 or bool, shape (N,), N >= 1.
        probabilities: float in [0, 1], shape (N,) (not logits: see :func:`evaluate`).
        eps: clipping bound, so a confident mistake costs at most ``-log(eps)`` (16.1 nats).

    Raises:
        ValueError: N == 0, or probabilities outside [0, 1] or NaN.

    >>> round(logloss([1, 0], [0.8, 0.4]), 6)
    0.366985
    """
    y = _as_binary(labels)
    if y.shape[0] == 0:
        raise ValueError("logloss of no rows is undefined")
    p = _as_scores(probabilities, y.shape[0], "probabilities")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("probabilities must lie in [0, 1]; pass logits through a sigmoid")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


# ---------------------------------------------------------------------------------------------
# Cold-start buckets and the report
# ---------------------------------------------------------------------------------------------


def cold_buckets(item_age_s, item_clicks_before) -> dict[str, np.ndarray]:
    """Which rows belong to each cold-start bucket (a row may be in several).

    ``age<1h``: age < 1 hour; ``age<1d``: age < 1 day (negative ages, from clock skew, count
    in both); ``age1-7d``: 1 day <= age < 7 days; ``age>7d``: age >= 7 days;
    ``no_click_before``: the item had no click before the impression. An unknown age (NaN,
    a null ``item_age_s`` in the training log) is in no age bucket; an unknown click count
    (NaN) is not in ``no_click_before``. Every row is in ``all``.

    Args:
        item_age_s: float, shape (N,), impression time - item first seen, in seconds.
        item_clicks_before: int or float, shape (N,), clicks on the item before the impression.

    Returns:
        ``{bucket: bool array (N,)}`` with the keys of :data:`BUCKETS`, in that order.

    >>> b = cold_buckets([3600.0, float("nan"), 9 * DAY_S], [0, 0, 4])
    >>> {k: v.tolist() for k, v in b.items()}["age<1d"], b["no_click_before"].tolist()
    ([True, False, False], [True, True, False])
    """
    age = _as_1d(item_age_s, "item_age_s").astype(np.float64, copy=False)
    clicks = _as_1d(item_clicks_before, "item_clicks_before", age.shape[0])
    clicks = clicks.astype(np.float64, copy=False)
    return {  # comparisons with NaN are False, so unknown values fall in no bucket
        "all": np.ones(age.shape[0], dtype=bool),
        "age<1h": age < HOUR_S,
        "age<1d": age < DAY_S,
        "age1-7d": (age >= DAY_S) & (age < 7 * DAY_S),
        "age>7d": age >= 7 * DAY_S,
        "no_click_before": clicks == 0,
    }


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, elementwise: logits to probabilities."""
    # tanh form: no overflow warnings for large |x|, unlike 1 / (1 + exp(-x)).
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class _SortedTask:
    """One task's rows in the three orders the metrics need, sorted once for all buckets."""

    def __init__(self, y, scores, probs, user_codes, request_codes):
        """y: bool (N,); scores, probs: float64 (N,); user_codes, request_codes: int64 (N,)."""
        self.y, self.scores, self.probs = y, scores, probs
        self.user_codes, self.request_codes = user_codes, request_codes
        self.by_score = np.argsort(scores, kind="stable")
        self.by_user = _by_group(user_codes, self.by_score)
        self.by_request = _by_group(request_codes, np.argsort(-scores, kind="stable"))

    def metrics(self, rows_in: np.ndarray, n: int) -> dict[str, float | int | None]:
        """All metrics on the rows where ``rows_in`` (bool (N,)) is True."""
        # Keeping the selected entries of a sorted order leaves them sorted.
        by_score = self.by_score[rows_in[self.by_score]]
        by_user = self.by_user[rows_in[self.by_user]]
        by_request = self.by_request[rows_in[self.by_request]]
        y, s = self.y, self.scores
        _, aucs = _sorted_grouped_auc(y[by_score], s[by_score], None)
        user_aucs = _sorted_grouped_auc(y[by_user], s[by_user], self.user_codes[by_user])
        samples = int(np.count_nonzero(rows_in))
        return {
            "auc": _none_if_not_finite(aucs[0]) if aucs.size else None,
            "gauc": _weighted_gauc(*user_aucs),
            "logloss": logloss(y[rows_in], self.probs[rows_in]) if samples else None,
            f"p_at_{n}": _sorted_precision_at_n(
                y[by_request], self.request_codes[by_request], n),
            "samples": samples,
            "positives": int(np.count_nonzero(y & rows_in)),
        }


def evaluate(
    task_labels: Mapping[str, np.ndarray],
    task_label_masks: Mapping[str, np.ndarray] | None,
    task_scores: Mapping[str, np.ndarray],
    users,
    requests,
    item_age_s,
    item_clicks_before,
    n: int = 2,
    scores_are_logits: bool = True,
) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Every metric for every task and cold-start bucket: the body of a ``ppm eval`` report.

    Args:
        task_labels: ``{task: 0/1 array (N,)}``, e.g. the training log's ``click``, ``order``,
            ``collect`` columns; tasks are reported in this mapping's order.
        task_label_masks: ``{task: bool array (N,)}``; rows where the mask is False are left
            out of that task's metrics (their labels and scores may hold anything, NaN
            included). A task missing here, or ``None`` for the whole argument, keeps all rows.
        task_scores: ``{task: float array (N,)}``, the model's output for each labelled task
            (extra tasks are ignored).
        users: user ids (N,), the groups of GAUC.
        requests: request ids (N,), the result pages of P@n.
        item_age_s, item_clicks_before: (N,), see :func:`cold_buckets`.
        n: items per request for P@n.
        scores_are_logits: True when scores are logits (a sigmoid gives log loss its
            probabilities), False when they are already probabilities in [0, 1]. Ranking
            metrics use the scores as given, so saturated sigmoids cannot create ties.

    Returns:
        ``report[task][bucket]`` = ``{"auc", "gauc", "logloss", f"p_at_{n}", "samples",
        "positives"}``; buckets as in :data:`BUCKETS`. Metrics are Python floats, ``None``
        where undefined (e.g. an empty bucket or a bucket without positives); counts are ints.
        Within a bucket, P@n ranks only that bucket's rows of each request (a request needs
        ``n`` of them) and GAUC uses only that bucket's rows of each user.

    Raises:
        ValueError: mismatched lengths, a labelled task without scores, non-0/1 labels or
            NaN scores on unmasked rows, probabilities outside [0, 1], or ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    buckets = cold_buckets(item_age_s, item_clicks_before)
    rows = buckets["all"].shape[0]
    # Factorise the ids once: every bucket and task then sorts int64 codes, not strings.
    user_codes = _group_codes(users, rows, "users")
    request_codes = _group_codes(requests, rows, "requests")
    masks = task_label_masks or {}

    report: dict[str, dict[str, dict[str, float | int | None]]] = {}
    for task, labels in task_labels.items():
        if task not in task_scores:
            raise ValueError(f"task {task!r} has labels but no scores")
        labels = _as_1d(labels, f"{task} labels", rows)
        keep = np.ones(rows, dtype=bool)
        if task in masks:
            keep = _as_1d(masks[task], f"{task} mask", rows).astype(bool)
        y = np.zeros(rows, dtype=bool)
        y[keep] = _as_binary(labels[keep], f"{task} labels")
        scores = _as_1d(task_scores[task], f"{task} scores", rows).astype(np.float64)
        scores[~keep] = 0.0  # masked-out rows are never read; a NaN there must not raise
        _as_scores(scores[keep], int(np.count_nonzero(keep)), f"{task} scores")
        probs = sigmoid(scores) if scores_are_logits else scores
        sorted_task = _SortedTask(y, scores, probs, user_codes, request_codes)
        report[task] = {bucket: sorted_task.metrics(keep & member, n)
                        for bucket, member in buckets.items()}
    return report


# ---------------------------------------------------------------------------------------------
# Comparing models
# ---------------------------------------------------------------------------------------------


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int | np.integer):
        return str(int(value))
    return f"{value:.4f}"


def to_markdown(
    reports: Mapping[str, Mapping],
    task: str = "click",
    metrics: Sequence[str] = METRICS,
    buckets: Sequence[str] = BUCKETS,
) -> str:
    """A markdown table comparing models on one task: one row per (bucket, model).

    Args:
        reports: ``{model name: report from evaluate()}``, e.g. ``{"idrec": r1, "ppm": r2}``;
            rows follow this order within each bucket.
        task: which task's metrics to show.
        metrics: metric columns (use ``f"p_at_{n}"`` for an ``n`` other than 2).
        buckets: bucket rows, in order.

    Returns:
        The table, lines joined by ``\\n`` and ending in one. Columns: bucket, model, samples,
        positives, then ``metrics`` with 4 decimals; ``n/a`` for a value that is ``None`` or
        missing from a report (another task, bucket or ``n``).

    >>> r = {"click": {"all": {"auc": 0.75, "gauc": None, "samples": 4, "positives": 2}}}
    >>> print(to_markdown({"ppm": r}, metrics=("auc", "gauc"), buckets=("all",)), end="")
    | bucket | model | samples | positives | auc | gauc |
    |---|---|---:|---:|---:|---:|
    | all | ppm | 4 | 2 | 0.7500 | n/a |
    """
    columns = ("samples", "positives", *metrics)
    lines = [
        "| bucket | model | " + " | ".join(columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for bucket in buckets:
        for model, report in reports.items():
            values = report.get(task, {}).get(bucket, {})
            cells = [_cell(values.get(column)) for column in columns]
            lines.append(f"| {bucket} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(
    reports: Mapping[str, Mapping],
    task: str,
    bucket: str,
    metric: str,
    model: str = "ppm",
    baseline: str = "idrec",
) -> float | None:
    """``reports[model] - reports[baseline]`` for one metric; ``None`` if either is undefined.

    >>> reports = {"ppm": {"click": {"all": {"auc": 0.75}}},
    ...            "idrec": {"click": {"all": {"auc": 0.7}}}}
    >>> round(compare(reports, "click", "all", "auc"), 4)
    0.05
    """
    ours = reports[model].get(task, {}).get(bucket, {}).get(metric)
    theirs = reports[baseline].get(task, {}).get(bucket, {}).get(metric)
    if ours is None or theirs is None:
        return None
    return float(ours) - float(theirs)


# ---------------------------------------------------------------------------------------------
# Intervals
# ---------------------------------------------------------------------------------------------


def bootstrap_auc(labels, scores, groups, resamples: int = 200, seed: int = 0,
                  chunk: int = 32) -> np.ndarray:
    """AUC of several models' scores of the same rows on bootstrap resamples of the groups.

    A resample draws as many groups (users) as the rows hold, with replacement, and takes
    every row of a drawn group as often as it is drawn: rows of one user are not
    independent, so users, not rows, are resampled. Every model is scored on the same
    resamples, so ``aucs[a] - aucs[b]`` is a paired difference. AUC on a resample is the
    weighted Mann-Whitney count (ties one half), computed for a block of resamples at once
    from one sort of each model's scores.

    Args:
        labels: 0/1 or bool, shape (N,).
        scores: float, shape (M, N) (M models) or (N,) (one).
        groups: ids (any hashable), shape (N,), e.g. ``user_id``.
        resamples: B, the number of resamples.
        seed: seeds the resampling: the same seed and groups give the same resamples.
        chunk: resamples weighted at once; memory is ``chunk * N`` floats.

    Returns:
        float64 (M, B): AUC of model m on resample b, NaN where a resample holds one class
        only.

    >>> aucs = bootstrap_auc([0, 1, 0, 1], [[0.1, 0.9, 0.2, 0.8]], ["a", "a", "b", "b"], 5)
    >>> aucs.shape, bool((aucs == 1.0).all())
    ((1, 5), True)
    """
    y = _as_binary(labels)
    rows = y.shape[0]
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if s.shape[1] != rows or np.isnan(s).any():
        raise ValueError(f"scores must be (M, {rows}) without NaN, got shape {s.shape}")
    out = np.full((s.shape[0], resamples), np.nan)
    if not rows:
        return out
    _, users = np.unique(_group_codes(groups, rows, "groups"), return_inverse=True)
    n_users = int(users.max()) + 1
    rng = np.random.default_rng(seed)
    # (B, U): how often each resample draws each user.
    draws = rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=resamples)
    for m, model_scores in enumerate(s):
        order = np.argsort(model_scores, kind="stable")
        for b in range(0, resamples, chunk):
            out[m, b : b + chunk] = _weighted_aucs(
                y[order], model_scores[order], draws[b : b + chunk][:, users[order]])
    return out


def _weighted_aucs(y: np.ndarray, s: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of bool labels ``y`` (N,) and float64 scores ``s`` (N,), sorted by score, under
    each row of ``weights`` (b, N): how many times each row counts. Returns (b,) float64,
    NaN where a row of weights leaves one class only."""
    # The first row of each run of equal scores: a tie counts one half.
    runs = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    weights = weights.astype(np.float64)
    pos = np.add.reduceat(weights * y, runs, axis=1)  # (b, runs of equal scores)
    neg = np.add.reduceat(weights * ~y, runs, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negatives scored lower than the run
    wins = np.sum(pos * (below + 0.5 * neg), axis=1)
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


def percentile_interval(samples, level: float = 0.95) -> tuple[float, float] | None:
    """The central ``level`` share of bootstrap ``samples`` (NaN ignored): ``(lo, hi)``, or
    None when no sample is defined.

    >>> percentile_interval(np.arange(101.0))
    (2.5, 97.5)
    """
    x = np.asarray(samples, dtype=np.float64)
    x = x[~np.isnan(x)]
    if not x.size:
        return None
    lo, hi = np.percentile(x, [50 - 50 * level, 50 + 50 * level])
    return float(lo), float(hi)
