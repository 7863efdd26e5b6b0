"""trainer.baselines: the item rate, the logistic regression and the oracle, on synthetic
samples with a known truth."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.baselines import LogisticBaseline, Oracle, PositiveRate, RateTable, newton_logistic
from trainer.metrics import auc


@dataclass
class Samples:
    """What the baselines read of a ``WindowDataset``."""

    user_id: np.ndarray
    item_ids: list[str]
    labels: np.ndarray
    """(n, 1): the click column."""
    features: dict[str, np.ndarray] = field(default_factory=dict)
    request_id: np.ndarray | None = None
    config: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(tasks=("click",)))

    def __len__(self) -> int:
        return len(self.item_ids)

    def take(self, rows: np.ndarray) -> Samples:
        return Samples(self.user_id[rows], [self.item_ids[i] for i in rows], self.labels[rows],
                       {k: v[rows] for k, v in self.features.items()})


def samples(users: np.ndarray, items: np.ndarray, clicked: np.ndarray,
            category: np.ndarray | None = None) -> Samples:
    category = np.ones(len(users), np.int64) if category is None else category
    return Samples(np.array([f"u{u}" for u in users], object), [f"i{i}" for i in items],
                   clicked.astype(np.float32)[:, None],
                   {"category": category, "brand": np.zeros(len(users), np.int64)})


def test_item_rate_orders_items_by_their_click_rate_and_smooths_the_rare_ones():
    rng = np.random.default_rng(0)
    rates = np.array([0.05, 0.6, 0.15, 0.45, 0.3])  # items i0..i4
    items = np.repeat(np.arange(5), 500)
    train = samples(rng.integers(0, 300, items.size), items, rng.random(items.size) < rates[items])
    rare = samples(np.array([1, 2]), np.array([9, 9]), np.array([1, 1]))  # i9: 2 of 2 clicked
    train = Samples(np.r_[train.user_id, rare.user_id], train.item_ids + rare.item_ids,
                    np.r_[train.labels, rare.labels])
    baseline = PositiveRate.fit(train)
    one_each = samples(np.zeros(7, int), np.array([0, 1, 2, 3, 4, 9, 77]), np.zeros(7))
    scores = baseline.scores(one_each)
    assert list(np.argsort(scores[:5])) == list(np.argsort(rates))
    # Two clicks in two impressions are weak evidence: below the item clicked 45% of 500
    # times, though its raw rate (1.0) is the highest.
    assert scores[5] < scores[3]
    # An item never seen gets the global rate.
    prior = train.labels.mean()
    assert scores[6] == pytest.approx(np.log(prior / (1 - prior)))
    assert PositiveRate.tuned(train, one_each).items.strength in (1.0, 3.0, 10.0, 30.0, 100.0)


def test_logistic_baseline_reads_users_items_and_categories():
    rng = np.random.default_rng(1)
    n = 20_000
    users, items = rng.integers(0, 500, n), rng.integers(0, 300, n)
    category = 1 + items % 4  # hashed ids, as the dataset gives them
    user_effect, item_effect = rng.normal(0, 1, 500), rng.normal(0, 1, 300)
    logit = -1.0 + user_effect[users] + item_effect[items] + 0.5 * (category == 2)
    data = samples(users, items, rng.random(n) < 1 / (1 + np.exp(-logit)), category)
    train, test = data.take(np.arange(n // 2)), data.take(np.arange(n // 2, n))
    y = test.labels[:, 0]

    logistic = LogisticBaseline.fit(train)
    got = auc(y, logistic.scores(test))
    truth = auc(y, logit[n // 2:])
    # It learns both rates (more than the item rate alone), well short of the truth's AUC.
    assert auc(y, PositiveRate.fit(train).scores(test)) + 0.05 < got < truth
    assert logistic.weights[0] > 0.3 and logistic.weights[1] > 0.3  # user rate, item rate
    assert set(logistic.levels["category"]) == {1, 2, 3, 4}
    assert "brand" not in logistic.levels  # all unknown (0): no column
    np.testing.assert_array_equal(LogisticBaseline.fit(train).weights, logistic.weights)


def test_leave_one_out_keeps_the_logistic_baseline_from_learning_noise():
    """Pure-noise clicks, users and items seen a handful of times: a rate counting the
    sample's own click "predicts" it, so a regression on such rates would learn large
    weights; leaving the sample out, the weights stay near zero and held-out AUC at 0.5."""
    rng = np.random.default_rng(2)
    n = 20_000
    users, items = rng.integers(0, 4_000, n), rng.integers(0, 2_000, n)
    data = samples(users, items, rng.random(n) < 0.3)
    train, test = data.take(np.arange(n // 2)), data.take(np.arange(n // 2, n))
    y_train = train.labels[:, 0].astype(float)

    # The leak is there to be learned: a user's own-click-included rate ranks its clicks.
    prior = y_train.mean()
    leaky = RateTable.count(train.user_id, y_train, prior, 10.0).logits(train.user_id)
    assert auc(y_train, leaky) > 0.6
    left_out = RateTable.count(train.user_id, y_train, prior, 10.0).logits(
        train.user_id, leave_out=y_train)
    assert abs(auc(y_train, left_out) - 0.5) < 0.03

    logistic = LogisticBaseline.fit(train)
    assert np.abs(logistic.weights[:2]).max() < 0.3
    assert abs(auc(test.labels[:, 0], logistic.scores(test)) - 0.5) < 0.03


def test_the_oracle_joins_on_request_and_item_and_refuses_other_data(tmp_path):
    path = tmp_path / "oracle.parquet"
    pq.write_table(pa.table({"request_id": ["r1", "r1", "r2"], "item_id": ["a", "b", "a"],
                             "user_id": ["u", "u", "v"], "logit": [0.5, -1.0, 2.0]}), path)
    oracle = Oracle.read(path)
    data = Samples(np.array(["v", "u"], object), ["a", "b"], np.zeros((2, 1)),
                   request_id=np.array(["r2", "r1"], object))
    np.testing.assert_array_equal(oracle.scores(data), [2.0, -1.0])
    data.request_id = np.array(["r2", "r3"], object)  # r3 is not the oracle's
    with pytest.raises(ValueError, match="no row for 1 of 2 samples"):
        oracle.scores(data)


def test_baselines_refit_on_the_windows_so_far_read_only_what_they_need():
    """The demo refits its baselines before each window on every window before it, kept as
    :class:`trainer.baselines.Samples`: fitted on the parts joined, they are the baselines
    fitted on all those samples at once, and a window's samples, once joined, are all there
    by identity (users, items, labels in order)."""
    from trainer.baselines import Samples as Kept

    rng = np.random.default_rng(3)
    n = 6_000
    users, items = rng.integers(0, 300, n), rng.integers(0, 200, n)
    data = samples(users, items, rng.random(n) < 0.2, 1 + items % 5)
    parts = [data.take(np.arange(a, b)) for a, b in ((0, 2_500), (2_500, 4_000), (4_000, n))]

    joined = Kept.concat([Kept.concat(parts[:2]), Kept.of(parts[2])])
    assert len(joined) == n and joined.item_ids == data.item_ids
    np.testing.assert_array_equal(joined.user_id, data.user_id)
    np.testing.assert_array_equal(joined.click, data.labels[:, 0])
    np.testing.assert_allclose(LogisticBaseline.fit(joined).weights,
                               LogisticBaseline.fit(data).weights, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(PositiveRate.fit(joined).scores(parts[0]),
                                  PositiveRate.fit(data).scores(parts[0]))
    assert len(Kept.concat([])) == 0


def test_newton_logistic_finds_the_penalised_optimum_and_says_when_it_stops_short():
    """Known weights are recovered from enough samples (at the penalised log loss's
    stationary point); separable labels still converge (the L2 term bounds the weights);
    too few iterations give a RuntimeWarning, not silently a half-fitted model."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 2))
    truth = np.array([1.5, -0.5, -2.0])  # the last: the intercept
    y = (rng.random(20_000) < 1 / (1 + np.exp(-(x @ truth[:2] + truth[2])))).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both converge
        w = newton_logistic(x, y, l2=1.0)
        separable = (x[:, 0] > 0).astype(np.float64)
        w_separable = newton_logistic(x, separable, l2=1.0)
    np.testing.assert_allclose(w, truth, atol=0.1)
    p = 1 / (1 + np.exp(-(x @ w[:2] + w[2])))
    x1 = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    assert np.abs(x1.T @ (p - y) + w).max() < 1e-6  # the intercept penalised as the rest
    assert np.isfinite(w_separable).all() and auc(separable, x @ w_separable[:2]) == 1.0
    one_class = newton_logistic(x, np.zeros(len(x)), l2=1.0)
    assert np.isfinite(one_class).all() and one_class[2] < -5
    with pytest.warns(RuntimeWarning, match="no convergence in 1 steps"):
        newton_logistic(x, y, l2=1.0, iterations=1)
