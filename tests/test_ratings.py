"""The rating scale: expected and sampled ratings of 5-way distributions."""

from __future__ import annotations

import numpy as np

from persona_gym import ratings


def test_same_seed_same_sample():
    probs = np.random.default_rng(1).dirichlet(np.ones(5), size=200)
    a = ratings.sample(probs, np.random.default_rng(7))
    b = ratings.sample(probs, np.random.default_rng(7))
    c = ratings.sample(probs, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and set(np.unique(a)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    onehot = np.eye(5)[[0, 4, 2]]
    np.testing.assert_array_equal(ratings.sample(onehot, np.random.default_rng(0)), [1, 5, 3])
    np.testing.assert_array_equal(ratings.expected(onehot), [1, 5, 3])


def test_scale_ends_map_to_the_unit_interval():
    assert ratings.to_unit(1) == 0.0 and ratings.to_unit(5) == 1.0 and ratings.to_unit(3) == 0.5
    np.testing.assert_array_equal(ratings.clip(np.array([0.2, 3.3, 7.0])), [1.0, 3.3, 5.0])
    assert ratings.RATING_TOKENS == ("1", "2", "3", "4", "5")


def test_a_sample_inverts_the_cdf_of_unnormalised_rows():
    probs = np.array(
        [[0.0, 2.0, 0.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]]
    )
    for seed in range(5):
        u = np.random.default_rng(seed).random(3)
        cdf = probs.cumsum(-1)
        expected = [1.0 + np.sum(u[r] * cdf[r, -1] >= cdf[r]) for r in range(3)]
        np.testing.assert_array_equal(ratings.sample(probs, np.random.default_rng(seed)), expected)
    draws = ratings.sample(np.tile([[0.0, 2.0, 0.0, 0.0, 2.0]], (400, 1)), np.random.default_rng(0))
    assert set(np.unique(draws)) == {2.0, 5.0} and abs((draws == 2.0).mean() - 0.5) < 0.1
    rng, reference = np.random.default_rng(9), np.random.default_rng(9)
    ratings.sample(probs, rng)
    reference.random(3)
    assert rng.random() == reference.random()  # one uniform per row
    assert (
        ratings.sample(np.array([[0.0, 0.0, 0.0, 0.0, 1.0]]), np.random.default_rng(0)).dtype
        == np.float64
    )


def test_expected_clip_and_unit_by_value():
    np.testing.assert_allclose(
        ratings.expected(np.array([[0.1, 0.2, 0.3, 0.2, 0.2], [0, 0, 0, 0, 1]])), [3.2, 5.0]
    )
    assert ratings.to_unit(2) == 0.25 and ratings.to_unit(4.5) == 0.875
    assert ratings.clip(0.99) == 1.0 and ratings.clip(5.01) == 5.0 and ratings.clip(2.5) == 2.5
    assert (ratings.MIN_RATING, ratings.MAX_RATING, ratings.N_LEVELS) == (1, 5, 5)
    np.testing.assert_array_equal(ratings.RATING_VALUES, [1.0, 2.0, 3.0, 4.0, 5.0])
