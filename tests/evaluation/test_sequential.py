"""The sequential-fidelity statistics (persona_gym.evaluation.sequential) on data with known
effects: the slopes are recovered, the paired RMSE difference has the right sign, and the
reference prediction of a rating never uses that rating."""

from __future__ import annotations

import numpy as np
import pandas as pd

from persona_gym.evaluation.sequential import (
    paired_rmse_difference,
    reference_predictions,
    sequence_features,
    sequential_slopes,
    slope_ratios,
    within_user_pearson,
)


def _synthetic(mood: float, similarity: float, n_users: int = 150, n: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), n)
    level = rng.normal(0, 0.5, n_users)[users]  # user fixed effects
    m = rng.normal(0, 1, len(users))
    s = rng.uniform(0, 1, len(users))
    e = level + mood * m + similarity * s + rng.normal(0, 0.8, len(users))
    return e, m, s, users


def test_slopes_recover_known_effects_within_their_intervals():
    e, m, s, users = _synthetic(0.22, 0.15)
    slopes = sequential_slopes(e, m, s, users, n_boot=300)
    for name, truth in (("mood", 0.22), ("similarity", 0.15)):
        assert slopes[name]["low"] <= truth <= slopes[name]["high"]
        assert slopes[name]["low"] < slopes[name]["slope"] < slopes[name]["high"]
    none = sequential_slopes(*_synthetic(0.0, 0.0, seed=1), n_boot=300)
    assert none["mood"]["low"] < 0 < none["mood"]["high"]


def test_slope_ratios_share_the_bootstrap_draws():
    """A row with half the real effects plus noise: the ratio is about 0.5 and its interval,
    from the same user draws for both rows, holds it; the ratio of a row to itself is exactly 1."""
    e_real, m, s, users = _synthetic(0.3, 0.2)
    rng = np.random.default_rng(5)
    half = 0.5 * e_real + rng.normal(0, 0.1, len(e_real))
    ratios = slope_ratios(half, e_real, m, s, users, n_boot=300)
    for name in ("mood", "similarity"):
        assert ratios[name]["low"] < 0.5 < ratios[name]["high"]
        assert ratios[name]["low"] < ratios[name]["ratio"] < ratios[name]["high"]
    same = slope_ratios(e_real, e_real, m, s, users, n_boot=50)
    assert same["mood"] == {"ratio": 1.0, "low": 1.0, "high": 1.0}


def test_rows_with_a_missing_feature_are_left_out():
    e, m, s, users = _synthetic(0.3, 0.0)
    m[:10] = np.nan
    assert np.isfinite(sequential_slopes(e, m, s, users, n_boot=50)["mood"]["slope"])


def test_paired_rmse_difference_sign_and_interval():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(100), 20)
    real = rng.integers(1, 6, len(users)).astype(float)
    good = real + rng.normal(0, 0.5, len(users))
    bad = real + rng.normal(0, 1.0, len(users))
    d = paired_rmse_difference(good, bad, real, users, n_boot=300)
    assert d["high"] < 0 and d["low"] <= d["mean"] <= d["high"]
    same = paired_rmse_difference(good, good, real, users, n_boot=50)
    assert same == {"mean": 0.0, "low": 0.0, "high": 0.0}


def test_reference_prediction_is_out_of_fold():
    rng = np.random.default_rng(0)
    ratings = pd.DataFrame(
        {
            "user_id": rng.integers(0, 30, 600),
            "item_id": rng.integers(0, 40, 600),
            "rating": rng.integers(1, 6, 600).astype(float),
        }
    )
    before = reference_predictions(ratings)
    changed = ratings.copy()
    changed.loc[0, "rating"] = 5.0 if ratings.loc[0, "rating"] < 3 else 1.0
    after = reference_predictions(changed)
    assert after[0] == before[0]  # its own rating is never in its fit
    assert not np.allclose(after, before)  # it is in the other folds' fits


def test_features_use_only_the_previous_k_of_the_same_user():
    frame = pd.DataFrame(
        {"user_id": [1, 1, 1, 1, 2, 2, 2, 2], "item_index": [0, 1, 0, 1, 0, 1, 0, 0]}
    )
    residual = np.array([1.0, -1.0, 0.5, 0.0, 2.0, 2.0, 2.0, 9.0])
    genres = [("Drama",), ("Drama", "Crime")]
    emb = np.array([[1.0, 0.0], [0.0, 1.0]])
    out = sequence_features(frame, residual, genres, emb, k=2)
    assert np.isnan(out["mood"].iloc[:2]).all() and np.isnan(out["mood"].iloc[4:6]).all()
    assert out["mood"].iloc[2] == 0.0 and out["mood"].iloc[3] == -0.25
    assert out["genre"].iloc[2] == (1.0 + 0.5) / 2  # item 0 vs items 0 and 1
    assert out["text"].iloc[7] == 0.5  # item 0 vs items 1 and 0
    assert out["mood"].iloc[7] == 2.0  # user 2's own previous two, not user 1's


def test_within_user_pearson_ignores_constant_users():
    users = np.array([0, 0, 0, 1, 1, 1])
    real = np.array([1.0, 2.0, 3.0, 4.0, 4.0, 4.0])
    assert within_user_pearson(real * 2, real, users) == 1.0
