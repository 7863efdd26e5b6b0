"""trainer.metrics: AUC, GAUC, log loss, P@n, cold-start buckets, the eval report and its table."""

from __future__ import annotations

import doctest
import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer import metrics
from trainer.metrics import (
    BUCKETS,
    DAY_S,
    _weighted_aucs,
    auc,
    bootstrap_auc,
    cold_buckets,
    compare,
    evaluate,
    gauc,
    logloss,
    percentile_interval,
    precision_at_n,
    to_markdown,
)

# Scores from a handful of values, so ties are common; groups from a small alphabet.
rows = st.integers(min_value=0, max_value=40).flatmap(
    lambda n: st.tuples(
        st.lists(st.booleans(), min_size=n, max_size=n),
        st.lists(st.sampled_from([-1.5, 0.0, 0.25, 0.25 + 1e-9, 2.0, 7.0]), min_size=n,
                 max_size=n),
        st.lists(st.sampled_from("abcd"), min_size=n, max_size=n),
    )
)


def brute_auc(labels, scores) -> float | None:
    """Count over all (positive, negative) pairs; a tie counts one half."""
    pos = [s for y, s in zip(labels, scores, strict=True) if y]
    neg = [s for y, s in zip(labels, scores, strict=True) if not y]
    if not pos or not neg:
        return None
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_gauc(labels, scores, groups) -> float | None:
    total = weight = 0.0
    for g in set(groups):
        idx = [i for i, h in enumerate(groups) if h == g]
        a = brute_auc([labels[i] for i in idx], [scores[i] for i in idx])
        if a is not None:
            total += len(idx) * a
            weight += len(idx)
    return total / weight if weight else None


def brute_precision(labels, scores, requests, n) -> float | None:
    precisions = []
    for r in dict.fromkeys(requests):
        idx = [i for i, q in enumerate(requests) if q == r]
        if len(idx) >= n:
            top = sorted(idx, key=lambda i: (-scores[i], i))[:n]
            precisions.append(sum(labels[i] for i in top) / n)
    return sum(precisions) / len(precisions) if precisions else None


def assert_close(got, want):
    assert (got is None) == (want is None), (got, want)
    if want is not None:
        assert got == pytest.approx(want, abs=1e-12)


# --- auc -------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(rows)
def test_auc_equals_pairwise_count_with_ties(data):
    labels, scores, _ = data
    assert_close(auc(labels, scores), brute_auc(labels, scores))


def test_auc_edge_cases():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auc([0, 1, 0, 1], [0.5] * 4) == 0.5
    assert auc([True, False], np.array([3.0, -np.inf])) == 1.0
    assert auc([1, 1, 1], [0.1, 0.2, 0.3]) is None
    assert auc([0, 0], [0.1, 0.2]) is None
    assert auc([], []) is None
    assert isinstance(auc(np.array([0, 1], dtype=np.int8), np.float32([0.1, 0.2])), float)


def test_auc_rejects_bad_input():
    with pytest.raises(ValueError, match="0/1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="rows"):
        auc([0, 1], [0.1])


# --- gauc ------------------------------------------------------------------------------------


def test_gauc_by_hand_weights_users_by_impressions_and_skips_single_class_users():
    labels = [0, 0, 1, 1, 0, 1, 1, 0]
    scores = [0.1, 0.2, 0.3, 0.1, 0.9, 0.5, 0.6, 0.4]
    users = ["a", "a", "a", "b", "b", "c", "c", "d"]
    # a: AUC 1 over 3 impressions; b: AUC 0 over 2; c (clicks only), d (one row) skipped.
    assert gauc(labels, scores, users) == pytest.approx(3 / 5)  # unweighted would be 0.5
    assert gauc(labels, scores, np.array([7, 7, 7, 8, 8, 9, 9, 10])) == pytest.approx(3 / 5)


def test_gauc_is_none_without_a_user_with_both_classes():
    assert gauc([1, 0, 1], [0.1, 0.2, 0.3], ["a", "b", "c"]) is None
    assert gauc([], [], []) is None


@settings(max_examples=200, deadline=None)
@given(rows)
def test_gauc_equals_per_user_brute_force_and_auc_for_one_user(data):
    labels, scores, groups = data
    assert_close(gauc(labels, scores, groups), brute_gauc(labels, scores, groups))
    assert_close(gauc(labels, scores, ["u"] * len(labels)), auc(labels, scores))


# --- logloss ---------------------------------------------------------------------------------


def test_logloss_by_hand_and_clipping():
    want = -(math.log(0.9) + math.log(0.8) + math.log(0.5)) / 3
    assert logloss([1, 0, 1], [0.9, 0.2, 0.5]) == pytest.approx(want)
    assert logloss([1, 0], [0.0, 1.0]) == pytest.approx(-math.log(1e-7))
    assert logloss([1], [0.0], eps=1e-3) == pytest.approx(-math.log(1e-3))


def test_logloss_rejects_empty_input_and_non_probabilities():
    with pytest.raises(ValueError, match="no rows"):
        logloss([], [])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        logloss([1, 0], [2.5, -1.0])


# --- precision_at_n --------------------------------------------------------------------------


def test_precision_at_2_by_hand_skips_short_requests():
    labels = [1, 0, 1, 0, 0, 1, 1]
    scores = [0.9, 0.8, 0.1, 0.2, 0.3, 0.7, 0.9]
    requests = ["r1", "r1", "r1", "r2", "r2", "r2", "r3"]
    # r1 top-2 = rows 0, 1 -> 1/2; r2 top-2 = rows 5, 4 -> 1/2; r3 has one item: skipped.
    assert precision_at_n(labels, scores, requests, n=2) == pytest.approx(0.5)
    # n=3: r1 -> 2/3, r2 -> 1/3.
    assert precision_at_n(labels, scores, requests, n=3) == pytest.approx(0.5)
    # n=1: r1 -> 1, r2 -> 1, r3 -> 1.
    assert precision_at_n(labels, scores, requests, n=1) == 1.0


def test_precision_ties_go_to_the_earlier_row():
    assert precision_at_n([0, 0, 1], [0.5, 0.5, 0.5], [1, 1, 1], n=2) == 0.0
    assert precision_at_n([1, 0, 0], [0.5, 0.5, 0.5], [1, 1, 1], n=1) == 1.0
    assert precision_at_n([0, 1, 0], [0.5, 0.5, 0.5], [1, 1, 1], n=1) == 0.0


def test_precision_is_none_without_a_long_enough_request_and_rejects_n_below_1():
    assert precision_at_n([1, 0], [0.1, 0.2], ["a", "b"], n=2) is None
    assert precision_at_n([], [], [], n=2) is None
    with pytest.raises(ValueError, match="n must be"):
        precision_at_n([1], [0.1], ["a"], n=0)


@settings(max_examples=200, deadline=None)
@given(rows, st.integers(min_value=1, max_value=4))
def test_precision_equals_brute_force(data, n):
    labels, scores, requests = data
    assert_close(precision_at_n(labels, scores, requests, n),
                 brute_precision(labels, scores, requests, n))


# --- cold_buckets ----------------------------------------------------------------------------


def test_cold_buckets_membership_including_unknown_age():
    age = [0.0, 3600.0, DAY_S - 1, DAY_S, 7 * DAY_S - 1, 7 * DAY_S, 30 * DAY_S, np.nan, -5.0]
    clicks = [0, 3, 0, 1, 0, 2, 0, 0, 5]
    b = cold_buckets(age, clicks)
    assert tuple(b) == BUCKETS
    assert all(v.dtype == bool and v.shape == (9,) for v in b.values())
    assert b["all"].all()
    assert np.flatnonzero(b["age<1h"]).tolist() == [0, 8]  # 3600 s is an hour old
    assert np.flatnonzero(b["age<1d"]).tolist() == [0, 1, 2, 8]  # negative age: clock skew
    assert np.flatnonzero(b["age1-7d"]).tolist() == [3, 4]
    assert np.flatnonzero(b["age>7d"]).tolist() == [5, 6]
    assert np.flatnonzero(b["no_click_before"]).tolist() == [0, 2, 4, 6, 7]
    nan_row = b["age<1d"] | b["age1-7d"] | b["age>7d"]
    assert not nan_row[7] and nan_row[[0, 1, 2, 3, 4, 5, 6, 8]].all()
    assert not cold_buckets([1.0], [np.nan])["no_click_before"][0]


# --- evaluate --------------------------------------------------------------------------------


def small_log(seed: int = 0, rows: int = 400):
    rng = np.random.default_rng(seed)
    click = (rng.random(rows) < 0.3).astype(np.int8)
    order = (click & (rng.random(rows) < 0.4)).astype(np.int8)
    age = rng.choice([600.0, 2 * DAY_S, 9 * DAY_S, np.nan], size=rows)
    return {
        "labels": {"click": click, "order": order},
        "scores": {"click": rng.normal(size=rows) + click, "order": rng.normal(size=rows)},
        "users": np.array([f"u{i}" for i in rng.integers(0, 20, rows)], dtype=object),
        "requests": rng.integers(0, 120, rows),
        "age": age,
        "clicks_before": rng.integers(0, 3, rows),
    }


def run_evaluate(log, masks=None, **kwargs):
    return evaluate(log["labels"], masks, log["scores"], log["users"], log["requests"],
                    log["age"], log["clicks_before"], **kwargs)


def test_evaluate_matches_the_standalone_metrics_on_every_bucket():
    log = small_log()
    report = run_evaluate(log, n=3)
    buckets = cold_buckets(log["age"], log["clicks_before"])
    assert list(report) == ["click", "order"]
    for task, by_bucket in report.items():
        assert tuple(by_bucket) == BUCKETS
        for bucket, got in by_bucket.items():
            sel = buckets[bucket]
            y, s = log["labels"][task][sel], log["scores"][task][sel]
            p = 1 / (1 + np.exp(-s))
            assert set(got) == {"auc", "gauc", "logloss", "p_at_3", "samples", "positives"}
            assert got["samples"] == int(sel.sum()) and got["positives"] == int(y.sum())
            assert_close(got["auc"], auc(y, s))
            assert_close(got["gauc"], gauc(y, s, log["users"][sel]))
            assert_close(got["p_at_3"], precision_at_n(y, s, log["requests"][sel], n=3))
            assert got["logloss"] == pytest.approx(logloss(y, p))


@settings(max_examples=100, deadline=None)
@given(rows, st.lists(st.booleans(), min_size=40, max_size=40),
       st.lists(st.sampled_from([60.0, 3 * DAY_S, 10 * DAY_S, np.nan]), min_size=40,
                max_size=40))
def test_evaluate_sorting_once_equals_sorting_each_bucket(data, mask, age):
    labels, scores, users = data
    size = len(labels)
    mask, age = np.array(mask[:size], dtype=bool), np.array(age[:size])
    requests = [u + str(i % 3) for i, u in enumerate(users)]
    clicks = np.arange(size) % 2
    report = evaluate({"click": labels}, {"click": mask}, {"click": scores}, users, requests,
                      age, clicks)
    for bucket, member in cold_buckets(age, clicks).items():
        sel = mask & member
        y, s = np.array(labels)[sel], np.array(scores)[sel]
        got = report["click"][bucket]
        assert_close(got["auc"], brute_auc(y.tolist(), s.tolist()))
        assert_close(got["gauc"], brute_gauc(y.tolist(), s.tolist(),
                                             np.array(users)[sel].tolist()))
        assert_close(got["p_at_2"], brute_precision(y.tolist(), s.tolist(),
                                                    np.array(requests)[sel].tolist(), 2))


def test_evaluate_excludes_masked_labels_and_scores():
    log = small_log(seed=1)
    click = log["labels"]["click"].astype(np.float64)
    mask = np.arange(click.size) % 3 != 0
    click[~mask] = np.nan  # e.g. a label not observed yet
    scores = log["scores"]["click"].copy()
    scores[~mask] = np.nan
    report = evaluate({"click": click}, {"click": mask}, {"click": scores}, log["users"],
                      log["requests"], log["age"], log["clicks_before"])
    y, s = click[mask], scores[mask]
    everything = report["click"]["all"]
    assert everything["samples"] == int(mask.sum())
    assert everything["positives"] == int(y.sum())
    assert everything["auc"] == pytest.approx(auc(y, s))
    assert everything["gauc"] == pytest.approx(gauc(y, s, log["users"][mask]))
    with pytest.raises(ValueError, match="0/1"):
        evaluate({"click": click}, None, {"click": log["scores"]["click"]}, log["users"],
                 log["requests"], log["age"], log["clicks_before"])


def test_evaluate_output_is_strict_json_with_none_for_undefined_metrics():
    log = small_log(seed=2, rows=60)
    log["age"][:] = 3 * DAY_S  # the other age buckets are empty
    log["labels"]["order"][:] = 0  # no positives: ranking metrics undefined
    log["requests"] = np.arange(60) % 10
    report = run_evaluate(log)
    text = json.dumps(report, allow_nan=False)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == report
    empty = report["click"]["age<1d"]
    assert empty == {"auc": None, "gauc": None, "logloss": None, "p_at_2": None,
                     "samples": 0, "positives": 0}
    order = report["order"]["all"]
    assert order["auc"] is None and order["gauc"] is None and order["p_at_2"] == 0.0
    assert isinstance(order["logloss"], float) and order["samples"] == 60
    for by_bucket in report.values():
        for values in by_bucket.values():
            assert all(v is None or type(v) in (int, float) for v in values.values())


def test_evaluate_logits_and_probabilities_agree():
    log = small_log(seed=3)
    from_logits = run_evaluate(log)
    log["scores"] = {t: 1 / (1 + np.exp(-s)) for t, s in log["scores"].items()}
    from_probs = run_evaluate(log, scores_are_logits=False)
    for task, by_bucket in from_logits.items():
        for bucket, values in by_bucket.items():
            for metric, value in values.items():
                assert_close(from_probs[task][bucket][metric], value)


def test_evaluate_rejects_a_labelled_task_without_scores():
    log = small_log()
    with pytest.raises(ValueError, match="no scores"):
        evaluate(log["labels"], None, {"click": log["scores"]["click"]}, log["users"],
                 log["requests"], log["age"], log["clicks_before"])


# --- to_markdown and compare -----------------------------------------------------------------


def test_to_markdown_compares_models_per_bucket():
    log = small_log(seed=4)
    ppm = run_evaluate(log)
    log["scores"] = {t: np.zeros_like(s) for t, s in log["scores"].items()}
    idrec = run_evaluate(log)
    table = to_markdown({"idrec": idrec, "ppm": ppm})
    lines = table.splitlines()
    assert lines[0] == "| bucket | model | samples | positives | auc | gauc | logloss | p_at_2 |"
    assert len(lines) == 2 + 2 * len(BUCKETS)
    assert lines[2].startswith("| all | idrec | 400 |")
    assert lines[3].startswith("| all | ppm | 400 |")
    assert f"{ppm['click']['all']['auc']:.4f}" in lines[3]
    assert "| 0.5000 |" in lines[2]  # constant scores: AUC one half
    for bucket in BUCKETS:
        samples = ppm["click"][bucket]["samples"]
        assert f"| {bucket} | ppm | {samples} |" in table
    missing = to_markdown({"ppm": ppm}, task="collect", buckets=("all",)).splitlines()[2]
    assert missing == "| all | ppm | n/a | n/a | n/a | n/a | n/a | n/a |"

    diff = compare({"idrec": idrec, "ppm": ppm}, "click", "all", "auc")
    assert diff == pytest.approx(ppm["click"]["all"]["auc"] - 0.5)
    assert compare({"idrec": idrec, "ppm": ppm}, "click", "age<1d", "p_at_9") is None


# --- bootstrap intervals ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(rows, st.data())
def test_weighted_auc_equals_the_auc_of_the_repeated_rows(data, draw):
    """The bootstrap's vectorised core: weighting a row k times is repeating it k times."""
    labels, scores, _ = data
    weights = np.array(draw.draw(st.lists(st.lists(st.integers(0, 3), min_size=len(labels),
                                                   max_size=len(labels)),
                                          min_size=1, max_size=4)), np.int64)
    if not labels:
        return  # bootstrap_auc answers NaN for no rows without calling it
    y, s = np.array(labels, bool), np.array(scores, np.float64)
    order = np.argsort(s, kind="stable")
    got = _weighted_aucs(y[order], s[order], weights[:, order])
    for row, value in zip(weights, got, strict=True):
        want = auc(np.repeat(y, row), np.repeat(s, row))
        assert (want is None and np.isnan(value)) or value == pytest.approx(want, abs=1e-12)


def test_bootstrap_resamples_users_and_pairs_models():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(300), 4)  # four impressions per user
    y = rng.random(users.size) < 0.3
    good = y + rng.normal(0, 1, users.size)
    bad = good + rng.normal(0, 2, users.size)  # the same rows, scored worse
    aucs = bootstrap_auc(y, [good, good, bad], users, resamples=300, seed=5)
    assert aucs.shape == (3, 300) and not np.isnan(aucs).any()
    # One set of resamples for every model: the same scores agree on each resample.
    np.testing.assert_array_equal(aucs[0], aucs[1])
    np.testing.assert_array_equal(aucs, bootstrap_auc(y, [good, good, bad], users, 300, 5))
    # The resamples scatter around the AUC of all rows.
    for resampled, scores in ((aucs[0], good), (aucs[2], bad)):
        lo, hi = percentile_interval(resampled)
        assert lo < auc(y, scores) < hi and hi - lo < 0.15
    # The paired difference varies less than either AUC: both move with the users drawn.
    assert np.std(aucs[0] - aucs[2]) < np.std(aucs[2])
    assert percentile_interval([np.nan, np.nan]) is None


def test_docstring_examples_run():
    assert doctest.testmod(metrics).failed == 0
