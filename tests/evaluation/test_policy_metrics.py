"""The policy evaluation's metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from persona_gym.evaluation.metrics import ndcg, ndcg_at_k, ndcg_hit_at_k
from persona_gym.evaluation.policy import (
    bootstrap_ci,
    intra_list_diversity,
    novelty,
    rank_agreement,
)


def test_ndcg_and_hits_by_hand():
    # relevant 1 at rank 2 of 3; ideal: 2 relevant items in the top 2
    value, hits = ndcg_hit_at_k([3, 1, 2], [1, 5], k=3)
    assert hits == 1
    assert value == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert ndcg_hit_at_k([1, 5, 2], [1, 5], k=3) == (pytest.approx(1.0), 2)
    assert ndcg_hit_at_k([7, 8], [1], k=2) == (0.0, 0)
    assert ndcg_hit_at_k([1], [], k=2) == (0.0, 0)
    # the cut-off: a relevant item at rank 3 does not count for k=2
    assert ndcg_hit_at_k([7, 8, 1], [1], k=2) == (0.0, 0)


def test_diversity_and_novelty_by_hand():
    # pairs: {A,B}-{B}: 1 - 1/2; {A,B}-{C}: 1; {B}-{C}: 1
    assert intra_list_diversity([["A", "B"], ["B"], ["C"]]) == pytest.approx(2.5 / 3)
    assert intra_list_diversity([["A"]]) == 0.0
    # shares 0.5 and 0.01 of 100 users: (1 + log2(100)) / 2
    assert novelty([0, 1], np.array([50, 1]), 100) == pytest.approx((1 + math.log2(100)) / 2)
    assert novelty([0], np.array([0]), 100) == pytest.approx(math.log2(100))  # unrated: 1 / n_users


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(0).normal(3.0, 1.0, 200)
    first = bootstrap_ci(len(values), lambda idx: values[idx].mean(), seed=1)
    assert first == bootstrap_ci(len(values), lambda idx: values[idx].mean(), seed=1)
    mean, low, high = first
    assert low < mean < high
    assert high - low == pytest.approx(2 * 1.96 / math.sqrt(200), rel=0.25)
    assert bootstrap_ci(5, lambda idx: 2.0) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci(0, lambda idx: 0.0)


def test_rank_agreement():
    assert rank_agreement([1, 2, 3], [10, 20, 30])["kendall_tau"] == pytest.approx(1.0)
    assert rank_agreement([1, 2, 3], [3, 2, 1])["spearman_rho"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="equally long"):
        rank_agreement([1], [1])


# -- values (mutation testing) --------------------------------------------------------------------
def reference_bootstrap(values, seed, n_boot=1000, level=0.95):
    """The docstring's procedure, written out: resample units, percentile interval shifted by
    the bootstrap's bias."""
    rng = np.random.default_rng(seed)
    value = values.mean()
    draws = np.array(
        [values[rng.integers(0, len(values), len(values))].mean() for _ in range(n_boot)]
    )
    alpha = (1 - level) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha]) + (value - draws.mean())
    return value, min(low, value), max(high, value)


def test_bootstrap_interval_equals_the_documented_procedure():
    values = np.random.default_rng(3).exponential(2.0, 40)
    for kwargs in ({}, {"n_boot": 200}, {"level": 0.5}, {"n_boot": 50, "level": 0.8}):
        got = bootstrap_ci(len(values), lambda idx: float(values[idx].mean()), seed=7, **kwargs)
        assert got == pytest.approx(reference_bootstrap(values, 7, **kwargs), rel=1e-12), kwargs
    narrow = bootstrap_ci(len(values), lambda idx: float(values[idx].mean()), seed=7, level=0.5)
    wide = bootstrap_ci(len(values), lambda idx: float(values[idx].mean()), seed=7)
    assert wide[1] < narrow[1] < narrow[0] < narrow[2] < wide[2]
    assert (
        bootstrap_ci(len(values), lambda idx: float(values[idx].mean()))[1:] != wide[1:]
    )  # seed 0 default
    with pytest.raises(ValueError) as err:
        bootstrap_ci(0, lambda idx: 0.0)
    assert str(err.value) == "bootstrap_ci needs at least one unit"
    assert bootstrap_ci(1, lambda idx: float(len(idx))) == (1.0, 1.0, 1.0)


def test_ndcg_cut_off_and_ideal_by_hand():
    # more relevant items than k: the ideal ranks k of them, so two hits at the top are perfect
    assert ndcg_hit_at_k([1, 2, 3], {1, 2, 3, 4}, k=2) == (pytest.approx(1.0), 2)
    # the default cut-off is 10
    assert ndcg_hit_at_k(list(range(12)), [10]) == (0.0, 0)
    value, hits = ndcg_hit_at_k(list(range(12)), [9])
    assert hits == 1 and value == pytest.approx(1 / math.log2(11))
    value, hits = ndcg_hit_at_k([5, 4, 3], [3, 4], k=3)  # ranks 2 and 3
    assert hits == 2 and value == pytest.approx(
        (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    )
    assert ndcg_hit_at_k(np.array([2, 1]), np.array([1]), k=1) == (0.0, 0)


def test_diversity_of_empty_and_equal_genres():
    assert intra_list_diversity([[], []]) == 0.0  # no genres on either side: not different
    assert intra_list_diversity([["A"], ["A"]]) == 0.0
    assert intra_list_diversity([["A"], ["B"]]) == 1.0
    assert intra_list_diversity([]) == 0.0
    # pairs: {A}-{A,B}: 1/2, {A}-{}: 1, {A,B}-{}: 1
    assert intra_list_diversity([["A"], ["A", "B"], []]) == pytest.approx(2.5 / 3)


def test_novelty_caps_the_share_at_one():
    assert novelty([], np.array([1, 2]), 10) == 0.0
    assert novelty([0], np.array([200]), 100) == 0.0  # more ratings than users: share 1
    assert novelty([0, 1, 1], np.array([25, 50]), 100) == pytest.approx((2 + 1 + 1) / 3)


def test_rank_agreement_values_and_keys():
    from scipy.stats import kendalltau, spearmanr

    a, b = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]
    got = rank_agreement(a, b)
    assert got == {
        "kendall_tau": pytest.approx(4 / 6),
        "kendall_p": pytest.approx(kendalltau(a, b).pvalue),
        "spearman_rho": pytest.approx(0.8),
        "n_policies": 4,
    }
    assert rank_agreement(a, [4.0, 3.0, 2.0, 1.0])["spearman_rho"] == pytest.approx(
        spearmanr(a, [4, 3, 2, 1]).statistic
    )
    for bad in (([1, 2], [1, 2, 3]), ([1], [1])):
        with pytest.raises(ValueError) as err:
            rank_agreement(*bad)
        assert str(err.value) == "rank_agreement needs two equally long lists of at least 2 scores"
    assert rank_agreement([1, 2], [2, 1])["kendall_tau"] == pytest.approx(-1.0)


def test_bootstrap_leaves_out_resamples_where_the_statistic_is_undefined():
    values = np.array([np.nan, np.nan, 4.0, 2.0, np.nan])

    def mean(idx):
        chosen = values[idx]
        return (
            float(chosen[~np.isnan(chosen)].mean()) if (~np.isnan(chosen)).any() else float("nan")
        )

    value, low, high = bootstrap_ci(len(values), mean, seed=2)
    rng = np.random.default_rng(2)
    draws = np.array([mean(rng.integers(0, 5, 5)) for _ in range(1000)])
    assert np.isnan(draws).any()  # some resamples hold no defined value ...
    draws = draws[~np.isnan(draws)]  # ... and are left out
    ref_low, ref_high = np.quantile(draws, [0.025, 0.975]) + (3.0 - draws.mean())
    assert (
        value == 3.0
        and low == pytest.approx(min(ref_low, 3.0))
        and high == pytest.approx(max(ref_high, 3.0))
    )
    assert low < value < high
    calls = []

    def first_only(idx):  # defined on the full sample only
        calls.append(1)
        return 2.0 if len(calls) == 1 else float("nan")

    assert bootstrap_ci(4, first_only, n_boot=10) == (2.0, 2.0, 2.0) and len(calls) == 11


def test_one_ndcg_for_graded_and_binary_gains():
    # the binary NDCG of a top-k list is the general one with 0/1 gains ...
    value, _ = ndcg_hit_at_k([5, 4, 3], [3, 4], k=3)
    assert value == pytest.approx(ndcg([0.0, 1.0, 1.0], [1.0, 1.0], k=3))
    # ... and the fidelity NDCG of one user is the general one with gains 2**r - 1
    real, pred = np.array([5.0, 3.0, 1.0]), np.array([1.0, 3.0, 2.0])
    gains = 2.0**real - 1.0
    assert ndcg_at_k([7, 7, 7], pred, real, k=2) == pytest.approx(
        ndcg(gains[[1, 2, 0]], gains, k=2)
    )
    assert ndcg([0.0, 0.0], [], k=2) == 0.0
