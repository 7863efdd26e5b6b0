"""bench/content_signal.py's ridge: the item prior a cached vector can give a new item."""

from __future__ import annotations

import numpy as np

from bench.content_signal import RIDGE_STRENGTHS, chosen_strength, predict, ridge


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
