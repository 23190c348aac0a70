"""The evaluation's metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agents.metrics import (
    bootstrap_ci,
    intra_list_diversity,
    ndcg_hit_at_k,
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
