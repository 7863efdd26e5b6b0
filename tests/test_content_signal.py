"""bench/content_signal.py: the item prior a cached vector can give a new item, and the
user's content affinity and contrast."""

from __future__ import annotations

import numpy as np

from bench.content_signal import (
    RIDGE_STRENGTHS,
    chosen_strength,
    contrast,
    logistic_scores,
    predict,
    ridge,
    sequence_affinity,
)


def test_the_ridge_recovers_a_planted_linear_lift_and_its_intercept():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2_000, 8))
    truth = rng.normal(size=8)
    y = x @ truth - 0.7
    b = ridge(x, y, np.ones(len(x)), 1.0)
    np.testing.assert_allclose(b[:-1], truth, atol=2e-3)
    assert abs(b[-1] + 0.7) < 2e-3  # the intercept is not shrunk
    np.testing.assert_allclose(predict(x, b), y, atol=2e-2)


def test_impressions_weigh_the_fit():
    x = np.array([[1.0], [1.0]])
    b = ridge(x, np.array([0.0, 1.0]), np.array([1.0, 3.0]), 1e-9)
    # One feature that is 1 for both: intercept and slope share the weighted mean, 0.75.
    assert abs(predict(x, b)[0] - 0.75) < 1e-6


def test_cross_validation_shrinks_noise_and_keeps_signal():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 50))
    w = np.ones(len(x))
    assert chosen_strength(x, x @ rng.normal(size=50), w) == RIDGE_STRENGTHS[0]
    assert chosen_strength(x, rng.normal(size=len(x)), w) == RIDGE_STRENGTHS[-1]


def test_sequence_affinity_is_the_cosine_with_the_sequence_mean_after_centring():
    # Rows 1..4 centre on [5, 5] to the unit axes +x, +y, -x, -y; row 0 is "missing".
    vectors = np.array([[0.0, 0.0], [7.0, 5.0], [5.0, 7.0], [3.0, 5.0], [5.0, 3.0]])
    centre = np.array([5.0, 5.0])
    seq = np.array([[1, 0, 0], [1, 2, 0], [3, 0, 0], [0, 0, 0]])
    affinity = sequence_affinity(vectors, np.array([1, 1, 1, 1]), seq, centre)
    np.testing.assert_allclose(affinity, [1.0, 0.5 ** 0.5, -1.0, 0.0], atol=1e-12)
    assert sequence_affinity(vectors, np.array([0]), np.array([[1, 3, 0]]), centre)[0] == 0.0
    # Uncentred, the common direction [5, 5] dominates: rows 1 and 3 look alike.
    assert sequence_affinity(vectors, np.array([1]), np.array([[3, 0, 0]]),
                             np.zeros(2))[0] > 0.8


def test_the_fitted_scores_rank_by_a_planted_feature_and_ignore_noise():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4_000, 2))
    y = (rng.random(len(x)) < 1 / (1 + np.exp(-(2.0 * x[:, 0] - 1.0)))).astype(float)
    held = rng.normal(size=(500, 2))
    scores = logistic_scores(x, y, held)
    # The logits follow the planted 2 x0 - 1; the noise column's weight is near 0.
    np.testing.assert_allclose(scores, 2.0 * held[:, 0] - 1.0, atol=0.4)
    unit = np.zeros((2, 2))
    unit[1, 1] = 1.0  # only the noise column moves: the logit moves by its weight
    noise_weight = np.diff(logistic_scores(x, y, unit))[0]
    assert abs(noise_weight) < 0.1


def test_the_contrast_reads_only_earlier_impressions_of_the_same_user():
    # User a: shown +x and clicked it, shown +y and passed it over, then (at t 3, twice at
    # once) shown +x again and -x; user b sees only its own impression.
    unit = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    users = np.array(["a", "a", "a", "a", "b"])
    times = np.array([1, 2, 3, 3, 1])
    clicked = np.array([True, False, True, False, False])
    got = contrast(users, times, clicked, unit)
    # Nothing before the first impression of each user.
    np.testing.assert_allclose(got[[0, 4], :2], 0.0)
    np.testing.assert_allclose(got[[0, 4], 2:4], 0.0)
    # The two at t 3 see the first two only: took +x; shown (+x + y) / sqrt 2.
    np.testing.assert_allclose(got[2, :4], [1.0, 0.5 ** 0.5, np.log1p(2), np.log1p(1)])
    np.testing.assert_allclose(got[3, :2], [-1.0, -(0.5 ** 0.5)])
    assert got[1, 4] > got[0, 4] == 0.0  # one click in one impression lifts the rate
