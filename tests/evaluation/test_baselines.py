"""CF baselines on small synthetic ratings whose answer is known; validation split; no leakage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from persona_gym.evaluation.baselines import run_baselines
from persona_gym.simulator.cf_models import (
    BiasedMF,
    BiasModel,
    GlobalMean,
    ItemKNN,
    ItemMean,
    validation_split,
)


def _frame(users, items, ratings, timestamps=None):
    n = len(users)
    return pd.DataFrame(
        {
            "user_id": np.asarray(users, np.int64),
            "item_id": np.asarray(items, np.int64),
            "rating": np.asarray(ratings, np.float64),
            "timestamp": np.arange(n) if timestamps is None else timestamps,
        }
    )


def _synthetic(kind: str, n_users=60, n_items=40, density=0.6, noise=0.1, seed=0):
    """Ratings = 3 + b_u + b_i (+ p_u.q_i for kind="mf") + noise, on a random observed mask."""
    rng = np.random.default_rng(seed)
    bu, bi = rng.normal(0, 0.5, n_users), rng.normal(0, 0.5, n_items)
    full = 3.0 + bu[:, None] + bi[None, :]
    if kind == "mf":
        p, q = rng.normal(0, 0.6, (n_users, 2)), rng.normal(0, 0.6, (n_items, 2))
        full = full + p @ q.T
    observed = rng.random((n_users, n_items)) < density
    u, i = np.nonzero(observed)
    r = full[u, i] + rng.normal(0, noise, len(u))
    return _frame(u, i, r, rng.permutation(len(u))), full


def test_global_and_item_mean_by_hand():
    train = _frame([1, 1, 2, 3], [10, 20, 10, 10], [5, 1, 3, 4])
    assert GlobalMean().fit(train).predict([9], [99])[0] == pytest.approx(3.25)
    item = ItemMean().fit(train)
    np.testing.assert_allclose(
        item.predict([1, 1, 7], [10, 20, 99]), [4.0, 1.0, 3.25]
    )  # unseen → global
    shrunk = ItemMean(shrinkage=1).fit(train)
    assert shrunk.predict([1], [20])[0] == pytest.approx((1 + 3.25) / 2)


def test_bias_model_recovers_additive_data():
    data, full = _synthetic("bias", noise=0.1)
    rng = np.random.default_rng(1)
    test_mask = rng.random(len(data)) < 0.2
    model = BiasModel(reg_user=0.1, reg_item=0.1, n_iter=50).fit(data[~test_mask])
    test = data[test_mask]
    err = model.predict(test["user_id"], test["item_id"]) - np.clip(
        full[test["user_id"], test["item_id"]], 1, 5
    )
    assert np.sqrt(np.mean(err**2)) < 0.1  # the noise-free truth up to ~noise/sqrt(n)
    pred = model.predict(test["user_id"], test["item_id"])
    assert np.sqrt(np.mean((pred - test["rating"]) ** 2)) < 0.15  # ≈ the noise (0.1)
    # unknown user / item: fall back to the known parts (mu + the item's bias; mu), within [1, 5]
    item_0 = int(np.searchsorted(model.items_, 0))
    assert model.items_[item_0] == 0
    assert model.predict([999], [0])[0] == pytest.approx(
        np.clip(model.mu_ + model.bi_[item_0], 1, 5)
    )
    assert model.predict([999], [999])[0] == pytest.approx(model.mu_)


def test_mf_beats_bias_on_low_rank_data_and_is_seeded():
    data, full = _synthetic("mf", noise=0.1, density=0.7)
    rng = np.random.default_rng(2)
    test_mask = rng.random(len(data)) < 0.2
    train, test = data[~test_mask], data[test_mask]
    real = test["rating"].to_numpy()

    def err(model):
        return np.sqrt(np.mean((model.predict(test["user_id"], test["item_id"]) - real) ** 2))

    bias = err(BiasModel(1, 1).fit(train))
    mf = BiasedMF(factors=2, reg=1.0, reg_bias=1.0, n_iter=30, seed=0).fit(train)
    assert err(mf) < 0.6 * bias and err(mf) < 0.25
    again = BiasedMF(factors=2, reg=1.0, reg_bias=1.0, n_iter=30, seed=0).fit(train)
    np.testing.assert_array_equal(
        mf.predict(test["user_id"], test["item_id"]),
        again.predict(test["user_id"], test["item_id"]),
    )


def _knn_by_definition(
    train: pd.DataFrame, user: int, item: int, k: int, shrinkage: float
) -> float:
    """Koren's kNN baseline for one pair, written out with loops over the ratings."""
    base = BiasModel(15.0, 0.3).fit(train)
    resid = {
        (u, i): r - base.predict([u], [i])[0]
        for u, i, r in zip(train.user_id, train.item_id, train.rating, strict=True)
    }
    raters = train.groupby("item_id")["user_id"].apply(set).to_dict()

    def sim(i: int, j: int) -> float:
        both = raters.get(i, set()) & raters[j]
        num = sum(resid[u, i] * resid[u, j] for u in both)
        den = np.sqrt(sum(resid[u, i] ** 2 for u in both) * sum(resid[u, j] ** 2 for u in both))
        return num / (den + 1e-12) * len(both) / (len(both) + shrinkage)

    rated = [j for j in train.item_id[train.user_id == user] if j != item]
    sims = sorted(((sim(item, j), j) for j in rated), reverse=True)[:k]
    pos = [(s, j) for s, j in sims if s > 0]
    term = sum(s * resid[user, j] for s, j in pos) / sum(s for s, _ in pos) if pos else 0.0
    return float(np.clip(base.predict([user], [item])[0] + term, 1, 5))


def test_item_knn_matches_its_definition():
    data, full = _synthetic("mf", n_users=25, n_items=15, density=0.6, noise=0.3)
    held = data.groupby("user_id").cumcount() == 0
    train, test = data[~held], data[held]
    model = ItemKNN(k=4, shrinkage=5.0).fit(train)
    pred = model.predict(test.user_id, test.item_id)
    by_hand = [
        _knn_by_definition(train, u, i, k=4, shrinkage=5.0)
        for u, i in zip(test.user_id, test.item_id, strict=True)
    ]
    np.testing.assert_allclose(pred, by_hand, rtol=1e-5)
    # the neighbourhood carries the low-rank taste the biases miss
    data, full = _synthetic("mf", n_users=80, n_items=40, density=0.7, noise=0.1)
    held = np.random.default_rng(3).random(len(data)) < 0.1
    train, test = data[~held], data[held]
    real = np.clip(full[test.user_id, test.item_id], 1, 5)
    knn = (
        ItemKNN(k=10, shrinkage=5.0, reg_user=1.0, reg_item=1.0)
        .fit(train)
        .predict(test.user_id, test.item_id)
    )
    bias = BiasModel(1.0, 1.0).fit(train).predict(test.user_id, test.item_id)
    assert np.sqrt(np.mean((knn - real) ** 2)) < 0.8 * np.sqrt(np.mean((bias - real) ** 2))
    # unknown user or item: the bias model's known parts
    assert model.predict([999], [999])[0] == pytest.approx(model.baseline_.mu_)


def test_validation_split_takes_each_users_last_interactions():
    train = _frame([1] * 5 + [2] * 2, [1, 2, 3, 4, 5, 1, 2], [3] * 7, [50, 10, 40, 20, 30, 2, 1])
    fit, val = validation_split(train, fraction=0.4)
    assert sorted(zip(val["user_id"], val["timestamp"], strict=True)) == [(1, 40), (1, 50), (2, 2)]
    assert len(fit) + len(val) == len(train)
    assert all(
        fit[fit.user_id == u].timestamp.max() < val[val.user_id == u].timestamp.min()
        for u in (1, 2)
    )


def test_run_baselines_never_read_test_ratings():
    data, _ = _synthetic("mf", n_users=30, n_items=25)
    users = np.unique(data["user_id"])
    selected = data["user_id"].isin(users[:15])
    background = data[~selected]
    mine = data[selected].sort_values(["user_id", "timestamp"])
    last = mine.groupby("user_id").cumcount(ascending=False) < 3
    train, test = mine[~last], mine[last].reset_index(drop=True)
    small = {
        "global mean": (GlobalMean, {}),
        "item mean": (ItemMean, {"shrinkage": [0.0]}),
        "user+item bias": (BiasModel, {"reg_user": [1.0, 5.0], "reg_item": [1.0]}),
        "matrix factorisation": (BiasedMF, {"factors": [2], "reg": [1.0, 5.0], "reg_bias": [1.0]}),
    }
    first = run_baselines(
        train, background, test, grids=small, subsets={"half": np.arange(len(test)) % 2 == 0}
    )
    flipped = run_baselines(train, background, test.assign(rating=6 - test["rating"]), grids=small)
    for name in small:
        np.testing.assert_array_equal(first[name]["predictions"], flipped[name]["predictions"])
        assert first[name]["params"] == flipped[name]["params"]
        assert first[name]["subsets"]["half"]["n"] == (len(test) + 1) // 2
    assert first["matrix factorisation"]["rmse"] < first["global mean"]["rmse"]
    assert first["user+item bias"]["rmse"] < first["item mean"]["rmse"]
