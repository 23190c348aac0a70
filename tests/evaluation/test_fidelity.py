"""Within-user fidelity metrics and the simulator studies, checked by hand on tiny inputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from persona_gym.evaluation import fidelity
from persona_gym.evaluation import metrics as M


def test_within_user_by_hand():
    users = [1, 1, 1, 2, 2, 2, 3, 3]
    real = [1, 3, 5, 2, 4, 4, 5, 1]
    pred = [2, 3, 4, 3, 3, 3, 4, 4]  # user 1: perfect order; user 2: constant; user 3 has 2 rows
    w = M.within_user(users, pred, real)
    assert w["users"] == 2  # user 3 is below min_items
    assert w["pearson"] == pytest.approx(1.0) and w["spearman"] == pytest.approx(
        1.0
    )  # user 2 left out
    assert w["std_pred"] == pytest.approx((np.std([2, 3, 4]) + 0.0) / 2)
    assert w["std_real"] == pytest.approx((np.std([1, 3, 5]) + np.std([2, 4, 4])) / 2)
    reversed_ = M.within_user([1, 1, 1], [3, 2, 1], [1, 2, 3])
    assert reversed_["pearson"] == pytest.approx(-1.0)


def test_histogram_distance_and_slope():
    real = [1, 2, 3, 4, 5]
    assert M.histogram_distance(np.full((5, 5), 0.2), real) == pytest.approx(0.0)
    assert M.histogram_distance(np.eye(5)[[4] * 5], real) == pytest.approx(0.8)
    assert M.slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert math.isnan(M.slope([1, 1, 1], [1, 2, 3]))


def test_reward_landscape_by_hand():
    users = [0] * 4 + [1] * 4
    pred = [1, 2, 3, 4, 3, 3, 3, 3]
    r = M.reward_landscape(users, pred, top=1)
    assert r["users"] == 2 and r["items_per_user"] == 4
    assert r["within_user_std"] == pytest.approx(np.std([1, 2, 3, 4]) / 2)
    assert r["top_minus_mean"] == pytest.approx((4 - 2.5 + 0) / 2)
    total = np.var(pred)
    assert r["between_user_share"] == pytest.approx(np.var([2.5, 3.0]) / total)


def _table_rate(table: dict[int, float]):
    """A rater whose expected rating is table[variant persona] (+ the window's mean rating)."""

    def rate(variant, users, items, windows, gaps=None):
        out = np.zeros((len(users), 5))
        for n, (u, w) in enumerate(zip(users, windows, strict=True)):
            level = table[variant] if variant != "persona" else table[f"persona-{u % 2}"]
            level += 0.5 * (np.mean([x.rating for x in w]) - 3.0) if len(w) else 0.0
            low = int(np.clip(np.floor(level), 1, 4))
            frac = np.clip(level - low, 0, 1)
            out[n, low - 1], out[n, low] = 1 - frac, frac
        return out

    return rate


def test_persona_specificity_counts_own_best():
    # users 0, 2 rate 2 stars, users 1, 3 rate 4; persona of u is u % 2; adapters predict 2 / 4
    rate = _table_rate({"persona-0": 2.0, "persona-1": 4.0})
    users = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    real = np.where(users % 2, 4.0, 2.0)
    s = fidelity.persona_specificity(
        rate, users, np.zeros(8, int), real, [()] * 8, {u: u % 2 for u in range(4)}
    )
    assert (
        s["own_best_share"] == 1.0
        and s["own_rmse"] == 0.0
        and s["other_rmse"] == pytest.approx(2.0)
    )
    assert s["own_best_share_nll"] == 1.0
    swapped = fidelity.persona_specificity(
        rate, users, np.zeros(8, int), real, [()] * 8, {u: 1 - u % 2 for u in range(4)}
    )
    assert swapped["own_best_share"] == 0.0 and swapped["own_best_share_nll"] == 0.0


def test_persona_specificity_by_nll_sees_the_spread():
    # both adapters predict a mean of 3; persona-0 spreads its mass over 1 and 5, persona-1 puts
    # it on 3: a user who rates 1 and 5 is fitted equally by RMSE, better by persona-0's NLL
    def rate(variant, users, items, windows, gaps=None):
        wide, narrow = [0.5, 0, 0, 0, 0.5], [0.05, 0.05, 0.8, 0.05, 0.05]
        return np.array([wide if variant == "persona-0" else narrow] * len(users))

    users, real = np.array([0, 0, 1, 1]), np.array([1.0, 5.0, 1.0, 5.0])
    s = fidelity.persona_specificity(rate, users, np.zeros(4, int), real, [()] * 4, {0: 0, 1: 1})
    assert s["own_rmse"] == pytest.approx(np.sqrt(4.0)) == s["other_rmse"]
    assert s["own_best_share_nll"] == 0.5  # user 0 (persona-0) yes, user 1 (persona-1) no


def test_memory_slope_real_and_simulated():
    # one user; residuals alternate so the previous-3 mean predicts the next residual
    rng = np.random.default_rng(0)
    ratings = np.clip(np.rint(3 + np.cumsum(rng.normal(0, 0.7, 60)) * 0.3), 1, 5)
    history = pd.DataFrame(
        {
            "user_id": 0,
            "item_index": np.arange(60),
            "rating": ratings,
            "timestamp": np.arange(60),
            "is_test": np.arange(60) >= 20,
        }
    )
    user_mean = {0: float(ratings[:20].mean())}
    out = fidelity.memory_slope(
        _table_rate({"persona-0": 3.0, "persona-1": 3.0}),
        history,
        user_mean,
        np.zeros(60),
        max_per_user=None,
    )
    assert out["real_rows"] == 40 and out["simulated_rows"] == 40
    # the table rater moves 0.5 per star of the window's mean rating = of its mean residual
    assert out["simulated_slope"] == pytest.approx(0.5, abs=0.05)
    assert out["real_slope"] > 0.2


def test_landscape_samples_unseen_movies_only():
    seen = {u: set(range(u, u + 5)) for u in range(4)}
    calls = {}

    def rate(variant, users, items, windows, gaps=None):
        calls["items"] = list(zip(users, items, strict=True))
        return np.eye(5)[np.asarray(items) % 5]

    out = fidelity.landscape(
        rate,
        seen,
        40,
        {u: () for u in range(4)},
        lambda u, i: np.asarray(i) % 5 + 1.0,
        n_users=3,
        per_user=10,
        seed=0,
    )
    assert all(i not in seen[u] for u, i in calls["items"])
    assert out["simulator"]["users"] == 3 and out["simulator"]["items_per_user"] == 10
    assert out["simulator"] == out["matrix factorisation"]
