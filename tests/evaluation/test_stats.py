"""Evaluation statistics: interval coverage, paired intervals, exact McNemar, JSON fields."""

import time

import numpy as np
import pytest

from mopeq.evaluation import stats
from mopeq.evaluation.evaluate import compare, score_mme

# a category's true score when each question is right with probability p, independently
TRUE_ACC = {"color": 0.6, "count": 0.75, "existence": 0.85, "position": 0.7}
IMAGES_PER_CATEGORY = 30


def _simulate(rng, acc=TRUE_ACC, n=IMAGES_PER_CATEGORY):
    strata = np.repeat(list(acc), n)
    p = np.repeat(list(acc.values()), n)[:, None]
    return rng.random((len(strata), 2)) < p, strata


def _true_score(p):
    return 100 * p + 100 * p * p  # acc + acc+ (both right: p^2)


def test_interval_covers_the_true_score_at_its_nominal_rate():
    """Seeded simulated runs: a nominal 95 % interval covers the true score 90-98 % of the time."""
    rng = np.random.default_rng(12345)
    truth = sum(_true_score(p) for p in TRUE_ACC.values())
    trials, hits, cat_hits = 300, 0, 0
    for t in range(trials):
        correct, strata = _simulate(rng)
        ci = stats.score_intervals(correct, strata, n_boot=1000, seed=t)
        hits += ci["total"][0] <= truth <= ci["total"][1]
        cat_hits += sum(lo <= _true_score(TRUE_ACC[c]) <= hi
                        for c, (lo, hi) in ci["per_stratum"].items())
    assert 0.90 <= hits / trials <= 0.98
    assert 0.90 <= cat_hits / (trials * len(TRUE_ACC)) <= 0.98


def test_a_narrower_level_covers_less():
    """The coverage test can fail: a 50 % interval misses the truth about half the time."""
    rng = np.random.default_rng(7)
    truth = sum(_true_score(p) for p in TRUE_ACC.values())
    hits = 0
    for t in range(200):
        correct, strata = _simulate(rng)
        lo, hi = stats.score_intervals(correct, strata, n_boot=500, seed=t, level=0.5)["total"]
        hits += lo <= truth <= hi
    assert hits / 200 < 0.7


def test_point_estimate_lies_in_its_interval_and_resampling_is_seeded():
    correct, strata = _simulate(np.random.default_rng(0))
    point = sum(stats.image_scores(correct[strata == c]).mean() for c in TRUE_ACC)
    a = stats.score_intervals(correct, strata, seed=3)
    assert a["total"][0] <= point <= a["total"][1]
    assert a == stats.score_intervals(correct, strata, seed=3)
    assert a != stats.score_intervals(correct, strata, seed=4)


def test_image_scores_are_the_mme_score():
    correct = np.array([[1, 1], [1, 0], [0, 0], [0, 1]], bool)
    # acc = 4/8, acc+ = 1/4: 100 * .5 + 100 * .25 = 75
    assert stats.image_scores(correct).mean() == 75.0
    with pytest.raises(ValueError, match="two questions"):
        stats.image_scores(np.ones((3, 3), bool))


def test_identical_runs_have_a_zero_delta_interval_and_p_one():
    correct, strata = _simulate(np.random.default_rng(1))
    delta = stats.paired_score_delta(correct, correct, strata)
    assert delta["total"] == [0.0, 0.0]
    assert all(ci == [0.0, 0.0] for ci in delta["per_stratum"].values())
    assert stats.mcnemar_exact(correct, correct) == {"b": 0, "c": 0, "n_discordant": 0,
                                                     "p_value": 1.0}


def test_mcnemar_is_the_exact_binomial_on_discordant_questions():
    scipy_stats = pytest.importorskip("scipy.stats")
    base = np.array([1] * 7 + [0] * 1 + [1] * 20 + [0] * 12, bool)
    other = np.array([0] * 7 + [1] * 1 + [1] * 20 + [0] * 12, bool)
    test = stats.mcnemar_exact(base, other)
    assert (test["b"], test["c"], test["n_discordant"]) == (7, 1, 8)
    assert test["p_value"] == pytest.approx(2 * (1 + 8) / 2**8)  # 0.0703125
    assert test["p_value"] == pytest.approx(scipy_stats.binomtest(1, 8, 0.5).pvalue)
    for k, n in [(0, 1), (3, 6), (10, 40), (200, 500)]:
        assert stats.binomial_two_sided(k, n) == pytest.approx(
            scipy_stats.binomtest(k, n, 0.5).pvalue)


def test_paired_interval_is_narrower_than_the_unpaired_difference():
    rng = np.random.default_rng(2)
    base, strata = _simulate(rng)
    other = base.copy()
    flip = rng.random(base.shape) < 0.08  # a few answers change
    other[flip] = ~other[flip]
    paired = stats.paired_score_delta(base, other, strata)["total"]
    a = stats.score_intervals(base, strata)["total"]
    b = stats.score_intervals(other, strata, seed=1)["total"]
    assert paired[1] - paired[0] < 0.5 * ((a[1] - a[0]) + (b[1] - b[0]))


def test_mean_interval_contains_the_mean():
    rng = np.random.default_rng(3)
    _, strata = _simulate(rng)
    kl = rng.exponential(0.1, size=(len(strata), 2))
    lo, hi = stats.mean_interval(kl, strata)
    assert lo <= kl.mean() <= hi and lo < hi
    assert stats.mean_interval(np.zeros_like(kl), strata) == [0.0, 0.0]


def test_thousands_of_resamples_take_milliseconds():
    rng = np.random.default_rng(4)
    acc = {f"c{i}": 0.8 for i in range(14)}
    correct, strata = _simulate(rng, acc, n=85)  # full MME: ~1190 images, 14 subtasks
    start = time.perf_counter()
    stats.paired_score_delta(correct, ~correct, strata, n_boot=2000)
    assert time.perf_counter() - start < 1.0  # ~0.1 s here; generous for a loaded machine


def test_by_image_groups_questions_and_checks_pairs():
    keys = [("b", "2", "q2"), ("a", "1", "q1"), ("b", "2", "q1"), ("a", "1", "q2")]
    strata, (vals,) = stats.by_image(keys, [10, 20, 30, 40])
    assert strata.tolist() == ["a", "b"] and vals.tolist() == [[20, 40], [30, 10]]
    with pytest.raises(ValueError, match="exactly two"):
        stats.by_image(keys[:3], [1, 2, 3])


# ------------------------------------------------------------------- result fields


def _records(right: list[bool], category="color", probs=None):
    out = []
    for i, ok in enumerate(right):
        gold = ["Yes", "No"][i % 2]
        pred = gold if ok else ["No", "Yes"][i % 2]
        out.append({"question_id": f"img{i // 2}", "category": category, "question": f"q{i % 2}",
                    "answer": gold, "prediction": pred,
                    "probs": probs[i] if probs else [0.5, 0.5, 0.0]})
    return out


def test_score_mme_has_intervals_around_its_scores():
    rng = np.random.default_rng(5)
    recs = (_records(list(rng.random(40) < 0.7), "color")
            + _records(list(rng.random(60) < 0.9), "count"))
    r = score_mme(recs)
    assert r.score_ci95[0] <= r.score <= r.score_ci95[1] and r.score_ci95[0] < r.score_ci95[1]
    for v in r.per_category.values():
        assert v["ci95"][0] <= v["score"] <= v["ci95"][1]
    out = r.to_json()
    assert out["score_ci95"] == r.score_ci95 and "ci95" in out["per_category"]["count"]


def test_compare_reports_paired_intervals_and_mcnemar():
    rng = np.random.default_rng(6)
    right = list(rng.random(80) < 0.8)
    worse = [ok and rng.random() > 0.3 for ok in right]  # only losses: a real drop
    base, other = score_mme(_records(right)), score_mme(_records(worse))
    c = compare(base, other)
    assert c["score_delta_ci95"][0] <= c["score_delta"] <= c["score_delta_ci95"][1]
    assert c["score_delta_ci95"][1] < 0 and c["p_value"] < 0.05
    assert c["n_discordant"] == sum(a != b for a, b in zip(right, worse, strict=True))
    assert c["per_category"]["color"]["delta_ci95"] == c["score_delta_ci95"]  # one category
    assert c["flip_rate_ci95"][0] <= c["flip_rate"] <= c["flip_rate_ci95"][1]
    assert c["kl_ci95"][0] <= c["kl"] <= c["kl_ci95"][1]
    same = compare(base, base)
    assert same["score_delta_ci95"] == [0.0, 0.0] and same["p_value"] == 1.0
    assert same["flip_rate_ci95"] == [0.0, 0.0] and same["n_pairs"] == 40
