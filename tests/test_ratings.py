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
