"""The collaborative model behind the prompts' cues and the item tokens' factors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from persona_gym.catalog import ItemCatalog
from persona_gym.simulator.collaborative import fit_collaborative, load_collaborative
from persona_gym.simulator.memory import Interaction


def _ratings(
    n_users: int = 30, n_items: int = 20, seed: int = 0
) -> tuple[pd.DataFrame, ItemCatalog]:
    """Ratings from a rank-1 taste model: user u likes item i when their signs agree."""
    rng = np.random.default_rng(seed)
    taste, kind = rng.choice([-1.0, 1.0], n_users), rng.choice([-1.0, 1.0], n_items)
    rows = [
        (
            u,
            i + 1,
            float(np.clip(np.rint(3 + 1.5 * taste[u] * kind[i] + rng.normal(0, 0.3)), 1, 5)),
            t,
        )
        for u in range(n_users)
        for t, i in enumerate(rng.permutation(n_items)[:15])
    ]
    ratings = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    items = pd.DataFrame(
        {
            "item_id": np.arange(1, n_items + 1),
            "title": [f"M{i}" for i in range(n_items)],
            "year": pd.array([2000] * n_items, dtype="Int64"),
            "genres": [("Drama",)] * n_items,
        }
    )
    stats = (
        ratings.groupby("item_id")["rating"].agg(mean_rating="mean", n_ratings="size").reset_index()
    )
    return ratings, ItemCatalog.from_frames(items, stats)


@pytest.fixture(scope="module")
def fitted():
    ratings, catalog = _ratings()
    train, background = ratings[ratings.user_id < 10], ratings[ratings.user_id >= 10]
    return fit_collaborative(train, background, catalog, seed=0), train, catalog


def test_learns_the_taste_structure(fitted):
    model, train, catalog = fitted
    users = np.repeat(np.arange(10), len(catalog))
    items = np.tile(np.arange(len(catalog)), 10)
    pred = model.predict(users, items)
    assert pred.min() >= 1 and pred.max() <= 5
    # the within-user spread follows the rank-1 structure: far above the noise (0.3 stars)
    spread = pd.Series(pred).groupby(users).std().mean()
    assert spread > 0.8


def test_logged_pairs_get_out_of_fold_predictions(fitted):
    model, train, catalog = fitted
    items = catalog.indices_of(train["item_id"])
    logged = model.predict(train["user_id"], items)
    # refitting the full model on everything predicts the training rows far better (in-sample)
    in_sample = (
        model.mu
        + model.item_bias[items]
        + model.user_bias[model.user_rows(train["user_id"])]
        + np.einsum(
            "nf,nf->n",
            model.user_factors[model.user_rows(train["user_id"])],
            model.item_factors[items],
        )
    )
    real = train["rating"].to_numpy()
    assert np.sqrt(np.mean((logged - real) ** 2)) > np.sqrt(
        np.mean((np.clip(in_sample, 1, 5) - real) ** 2)
    )
    assert not np.allclose(logged, np.clip(in_sample, 1, 5))


def test_cues_surprise_is_the_window_residual(fitted):
    model, _, catalog = fitted
    window = (Interaction(0, 5.0, 1), Interaction(1, 1.0, 2))
    predicted, surprise = model.cues(3, 2, window)
    expected = model.predict([3, 3], [0, 1])
    assert surprise == pytest.approx(np.mean([5.0, 1.0] - expected))
    assert predicted == pytest.approx(float(model.predict([3], [2])[0]))
    assert model.cues(3, 2, ())[1] == 0.0


def test_unknown_user_gets_the_item_side(fitted):
    model, _, _ = fitted
    pred = model.predict([999_999], [4])[0]
    assert pred == pytest.approx(np.clip(model.mu + model.item_bias[4], 1, 5))


def test_save_load_round_trip_and_bad_file(fitted, tmp_path):
    model, _, catalog = fitted
    model.save(tmp_path / "cf.npz")
    loaded = load_collaborative(tmp_path / "cf.npz")
    users, items = np.arange(10).repeat(3), np.tile([0, 5, 7], 10)
    np.testing.assert_array_equal(loaded.predict(users, items), model.predict(users, items))
    assert loaded.params == model.params
    with pytest.raises(FileNotFoundError, match="persona-gym distill"):
        load_collaborative(tmp_path / "missing.npz")
    data = dict(np.load(tmp_path / "cf.npz"))
    data["item_bias"] = data["item_bias"].copy()
    data["item_bias"][0] = np.nan
    np.savez(tmp_path / "nan.npz", **data)
    with pytest.raises(ValueError, match="non-finite"):
        load_collaborative(tmp_path / "nan.npz")


def test_fit_is_deterministic():
    ratings, catalog = _ratings(seed=1)
    a = fit_collaborative(
        ratings[ratings.user_id < 10], ratings[ratings.user_id >= 10], catalog, seed=3
    )
    b = fit_collaborative(
        ratings[ratings.user_id < 10], ratings[ratings.user_id >= 10], catalog, seed=3
    )
    np.testing.assert_array_equal(a.logged_predictions, b.logged_predictions)
    np.testing.assert_array_equal(a.item_factors, b.item_factors)


def test_prediction_blends_mf_and_knn_by_the_validated_weight(fitted):
    from persona_gym.simulator.collaborative import BLENDS

    model, train, catalog = fitted
    w, gain = model.params["blend"], model.params["gain"]
    assert w in BLENDS and set(model.params) == {"mf", "knn", "blend", "gain"}
    seen = set(zip(train["user_id"], catalog.indices_of(train["item_id"]), strict=True))
    pairs = [(u, i) for u in range(10) for i in range(len(catalog)) if (u, i) not in seen]
    users, items = np.array(pairs).T
    rows = model.user_rows(users)
    mf = (
        model.mu
        + model.item_bias[items]
        + model.user_bias[rows]
        + np.einsum("nf,nf->n", model.user_factors[rows], model.item_factors[items])
    )
    level = model.mu + model.user_bias[rows]
    expected = np.clip(level + gain * ((1 - w) * mf + w * model.knn[rows, items] - level), 1, 5)
    np.testing.assert_allclose(model.predict(users, items), expected, rtol=1e-6)
    # the kNN table is the item-kNN baseline's own prediction
    from persona_gym.simulator.cf_models import ItemKNN, fit_frame

    ratings, _ = _ratings()
    knn = ItemKNN(**model.params["knn"]).fit(fit_frame(train, ratings[ratings.user_id >= 10]))
    np.testing.assert_allclose(
        model.knn[model.user_rows([4])[0]],
        knn.predict(np.full(len(catalog), 4), catalog.item_ids),
        rtol=1e-6,
    )


def test_a_file_from_before_the_knn_part_names_the_fix(fitted, tmp_path):
    model, _, _ = fitted
    model.save(tmp_path / "cf.npz")
    data = dict(np.load(tmp_path / "cf.npz"))
    del data["knn"]
    np.savez(tmp_path / "old.npz", **data)
    with pytest.raises(ValueError, match=r"older version .*persona-gym distill"):
        load_collaborative(tmp_path / "old.npz")
    data = dict(np.load(tmp_path / "cf.npz"))
    data["knn"] = data["knn"][:, :3]
    np.savez(tmp_path / "short.npz", **data)
    with pytest.raises(ValueError, match="kNN table"):
        load_collaborative(tmp_path / "short.npz")


def test_taste_replaces_the_user_factors_in_every_prediction(fitted):
    from dataclasses import replace

    from persona_gym.simulator.collaborative import persona_tastes

    model, train, catalog = fitted
    model = replace(model, params={**model.params, "gain": 1.0})  # the gain has its own test
    w = model.params["blend"]
    users, items = np.repeat([1, 2], 4), np.tile([0, 3, 6, 9], 2)
    own = model.user_factors[model.user_rows(users)]
    # the user's own factors as the taste: nothing moves
    np.testing.assert_allclose(model.predict(users, items, own), model.predict(users, items))
    taste = np.array([0.7, -0.4] + [0.0] * (own.shape[1] - 2))[: own.shape[1]]
    moved = model.predict(users, items, taste)
    shift = (1 - w) * np.einsum("nf,nf->n", taste[None] - own, model.item_factors[items])
    np.testing.assert_allclose(moved, np.clip(model.predict(users, items) + shift, 1, 5), rtol=1e-6)
    assert not np.allclose(moved, model.predict(users, items))
    # a logged pair's out-of-fold prediction moves by the same difference
    u, i = int(train["user_id"].iloc[0]), int(catalog.indices_of(train["item_id"].iloc[:1])[0])
    row = model.user_rows([u])[0]
    delta = (1 - w) * float((taste - model.user_factors[row]) @ model.item_factors[i])
    assert model.predict([u], [i], taste)[0] == pytest.approx(
        np.clip(model.predict([u], [i])[0] + delta, 1, 5)
    )
    # a user the fit never saw has no user side to move
    assert model.predict([999_999], [4], taste)[0] == model.predict([999_999], [4])[0]
    # taste_of moves the user's factors toward the persona's along the given axes only
    f = own.shape[1]
    axis = np.zeros((1, f))
    axis[0, 0] = 1.0
    expected = own[0].copy()
    expected[0] = 0.75 * own[0, 0] + 0.25 * taste[0]
    np.testing.assert_allclose(model.taste_of(1, taste, 0.25, axis), expected)
    np.testing.assert_allclose(
        model.taste_of(1, taste, 1.0, np.eye(f)), taste
    )  # every axis, all the way
    np.testing.assert_allclose(
        model.taste_of(1, taste, 0.5, np.zeros((0, f))), own[0]
    )  # no axes: their own
    np.testing.assert_allclose(model.taste_of(999_999, taste, 0.5, axis), 0.5 * taste * axis[0])
    tastes = persona_tastes(model, {1: 0, 2: 0, 3: 1}, [1, 2, 3, 999_999])
    np.testing.assert_allclose(tastes[0], model.user_factors[model.user_rows([1, 2])].mean(0))
    np.testing.assert_allclose(tastes[1], model.user_factors[model.user_rows([3])[0]])
    # the cues and the surprise use the same taste
    window = (Interaction(0, 5.0, 1),)
    prediction, surprise = model.cues(1, 3, window, taste)
    assert prediction == pytest.approx(model.predict([1], [3], taste)[0])
    assert surprise == pytest.approx(5.0 - model.predict([1], [0], taste)[0])


def test_taste_axes_are_an_orthonormal_basis_of_the_centred_persona_tastes():
    from persona_gym.simulator.collaborative import taste_axes

    rng = np.random.default_rng(0)
    tastes = {p: rng.normal(size=6) for p in range(3)}
    axes = taste_axes(tastes)
    assert axes.shape == (2, 6)  # K personas span K - 1 axes
    np.testing.assert_allclose(axes @ axes.T, np.eye(2), atol=1e-12)
    centred = np.stack(list(tastes.values())) - np.mean(list(tastes.values()), 0)
    np.testing.assert_allclose(
        centred @ axes.T @ axes, centred, atol=1e-12
    )  # the span holds every difference
    # two personas: the one axis through both centres; one persona or equal ones: none
    two = taste_axes({0: np.array([1.0, 0, 0]), 1: np.array([3.0, 0, 0])})
    np.testing.assert_allclose(np.abs(two), [[1.0, 0, 0]])
    assert taste_axes({0: np.ones(3)}).shape == (0, 3)
    assert taste_axes({0: np.ones(3), 1: np.ones(3)}).shape == (0, 3)


def test_recorded_params_skip_the_tuning_and_give_the_same_model(fitted, monkeypatch):
    import persona_gym.simulator.collaborative as collaborative

    model, train, catalog = fitted
    ratings, _ = _ratings()

    def no_tuning(*args, **kwargs):
        raise AssertionError("tuned although the parameters were given")

    monkeypatch.setattr(collaborative, "tune", no_tuning)
    again = fit_collaborative(
        train, ratings[ratings.user_id >= 10], catalog, seed=0, params=model.params
    )
    assert again.params == model.params
    for name in ("user_factors", "item_factors", "user_bias", "knn", "logged_predictions"):
        np.testing.assert_array_equal(getattr(again, name), getattr(model, name))


def _drifting(amplitudes: np.ndarray, n_users: int = 40, n_items: int = 40, seed: int = 0):
    """Ratings with a user level and a rank-1 taste whose strength follows ``amplitudes`` over
    each user's history."""
    rng = np.random.default_rng(seed)
    taste, kind = rng.choice([-1.0, 1.0], n_users), rng.choice([-1.0, 1.0], n_items)
    level = rng.normal(3.0, 0.7, n_users)
    rows = [
        (
            u,
            i + 1,
            float(np.clip(np.rint(level[u] + a * taste[u] * kind[i] + rng.normal(0, 0.5)), 1, 5)),
            t,
        )
        for u in range(n_users)
        for t, (i, a) in enumerate(zip(rng.permutation(n_items), amplitudes, strict=False))
    ]
    ratings = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    items = pd.DataFrame(
        {
            "item_id": np.arange(1, n_items + 1),
            "title": [f"M{i}" for i in range(n_items)],
            "year": pd.array([2000] * n_items, dtype="Int64"),
            "genres": [("Drama",)] * n_items,
        }
    )
    stats = (
        ratings.groupby("item_id")["rating"].agg(mean_rating="mean", n_ratings="size").reset_index()
    )
    return (
        ratings[ratings.user_id < 20],
        ratings[ratings.user_id >= 20],
        ItemCatalog.from_frames(items, stats),
    )


def test_the_gain_is_chosen_by_the_validation_slice():
    from persona_gym.simulator.collaborative import GAINS

    # tastes that grow stronger over time: the later (validation) ratings ask for more spread
    growing = fit_collaborative(*_drifting(np.r_[np.full(24, 0.6), np.full(6, 1.8)]), seed=0)
    assert growing.params["gain"] in GAINS and growing.params["gain"] > 1.0
    # tastes that fade: no gain above one
    fading = fit_collaborative(*_drifting(np.r_[np.full(24, 1.8), np.full(6, 0.6)]), seed=0)
    assert fading.params["gain"] == 1.0


def test_the_gain_scales_the_movie_to_movie_part_around_the_user_level(fitted):
    from dataclasses import replace

    model, train, catalog = fitted
    plain = replace(model, params={**model.params, "gain": 1.0})
    # a simulator distilled before the gain existed has none: it predicts as with a gain of 1
    old = replace(model, params={k: v for k, v in model.params.items() if k != "gain"})
    users, items = np.repeat(np.arange(10), len(catalog)), np.tile(np.arange(len(catalog)), 10)
    base = plain.predict(users, items)
    np.testing.assert_array_equal(old.predict(users, items), base)
    gained = replace(model, params={**model.params, "gain": 1.3})
    scaled = gained.predict(users, items)
    level = model.mu + model.user_bias[model.user_rows(users)]
    inside = (base > 1) & (base < 5)  # pairs the plain prediction did not clip
    assert inside.mean() > 0.5
    np.testing.assert_allclose(
        scaled[inside], np.clip(level + 1.3 * (base - level), 1, 5)[inside], rtol=1e-6
    )
    # a persona's taste moves the prediction before the gain: its difference is scaled too
    taste = np.full(model.user_factors.shape[1], 0.3)
    moved = plain.predict(users, items, taste)
    inside = (moved > 1) & (moved < 5)
    np.testing.assert_allclose(
        gained.predict(users, items, taste)[inside],
        np.clip(level + 1.3 * (moved - level), 1, 5)[inside],
        rtol=1e-6,
    )
    # a user the fit never saw has no level of their own: the gain leaves them alone
    assert gained.predict([999_999], [4])[0] == plain.predict([999_999], [4])[0]
