"""TableRater: the collaborative-filtering user model without a language model."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from persona_gym.simulator.memory import Interaction
from persona_gym.simulator.rater import Rater
from persona_gym.simulator.table import TableRater


@pytest.fixture
def rater(table_artifacts) -> TableRater:
    return TableRater.from_artifacts(table_artifacts, window_size=2)


def test_it_is_a_rater_over_the_artifacts_tables(rater, table_artifacts, catalog):
    assert isinstance(rater, Rater)
    assert rater.user_ids == [0, 1, 2, 3] and rater.source == str(table_artifacts)
    assert rater.item_embeddings.shape == (len(catalog), 8) and rater.window_size == 2
    assert [rater.persona(u) for u in range(4)] == [0, 1, 0, 1]
    assert rater.profile(1).startswith("User 1")
    history = rater.history(2)
    assert len(history) == 6 and [x.timestamp for x in history] == sorted(
        x.timestamp for x in history
    )


def test_expected_rating_is_item_mean_plus_user_bias_plus_window(rater, table_artifacts, catalog):
    memories = pd.read_parquet(table_artifacts / "memories.parquet")
    mine = memories[memories["user_id"] == 1]
    residual = mine["rating"].to_numpy() - catalog.mean_rating[mine["item_index"].to_numpy()]
    bias = residual.sum() / (len(mine) + 5.0)
    assert rater.expected_rating(1, 0) == pytest.approx(
        np.clip(catalog.mean_rating[0] + bias, 1, 5)
    )
    window = (Interaction(9, 1.0, 1), Interaction(2, 5.0, 2), Interaction(3, 5.0, 3))  # first cut
    shift = 0.5 * np.mean([5.0 - catalog.mean_rating[i] - bias for i in (2, 3)])
    assert rater.expected_rating(1, 0, window) == pytest.approx(
        np.clip(catalog.mean_rating[0] + bias + shift, 1, 5)
    )


def test_rate_gives_normalised_deterministic_distributions(rater):
    users, items = [0, 1, 2, 3], [0, 1, 2, 3]
    low, high = (Interaction(4, 1.0, 1),), (Interaction(4, 5.0, 1),)
    probs = rater.rate(users, items, [low, high, (), ()])
    assert probs.shape == (4, 5) and np.allclose(probs.sum(axis=1), 1.0) and (probs > 0).all()
    np.testing.assert_array_equal(probs, rater.rate(users, items, [low, high, (), ()]))
    window_effect = rater.rate([1, 1], [0, 0], [low, high]) @ np.arange(1, 6)
    assert window_effect[0] < window_effect[1]  # the window moves the rating
    np.testing.assert_array_equal(rater.rate([2], [2]), rater.rate([2], [2], [()]))
    assert rater.rate([], []).shape == (0, 5)
    np.testing.assert_array_equal(
        pickle.loads(pickle.dumps(rater)).rate(users, items), rater.rate(users, items)
    )


def test_bad_inputs_are_named(rater):
    with pytest.raises(KeyError, match="user 99 is not a simulated user"):
        rater.rate([99], [0])
    with pytest.raises(IndexError, match="item 6 is outside the catalogue"):
        rater.rate([0], [6])
    with pytest.raises(ValueError, match="spread must be > 0"):
        TableRater(rater.catalog, rater.item_embeddings, pd.DataFrame(), {}, spread=0)


# -- values (mutation testing: each constant and rule of the module docstring's formula) --------
def normal_rows(mu, spread):
    """The module docstring's distribution: a normal around ``mu``, discretised on 1..5."""
    values = np.arange(1.0, 6.0)
    weights = np.exp(-((values[None, :] - np.asarray(mu)[:, None]) ** 2) / (2 * spread**2))
    return weights / weights.sum(axis=1, keepdims=True)


def test_rate_is_the_discretised_normal_around_the_expected_rating(table_artifacts):
    window = (Interaction(3, 5.0, 1), Interaction(4, 1.0, 2))
    for spread in (None, 0.3, 1.7):  # None: the default spread 0.8
        kwargs = {} if spread is None else {"spread": spread}
        rater = TableRater.from_artifacts(table_artifacts, window_size=2, **kwargs)
        mu = [rater.expected_rating(0, 1, window), rater.expected_rating(2, 5)]
        np.testing.assert_allclose(
            rater.rate([0, 2], [1, 5], [window, ()]),
            normal_rows(mu, 0.8 if spread is None else spread),
            rtol=1e-12,
        )


def test_the_bias_shrinks_toward_zero_and_the_window_weighs_in(table_artifacts, catalog):
    memories = pd.read_parquet(table_artifacts / "memories.parquet")
    mine = memories[memories["user_id"] == 3]
    residual = mine["rating"].to_numpy() - catalog.mean_rating[mine["item_index"].to_numpy()]
    window = (Interaction(2, 5.0, 1),)
    for shrinkage, weight in ((0.0, 0.0), (2.0, 1.0), (5.0, 0.25)):
        rater = TableRater.from_artifacts(
            table_artifacts, window_size=2, shrinkage=shrinkage, window_weight=weight
        )
        bias = residual.sum() / (len(mine) + shrinkage)
        assert rater.user_bias[3] == pytest.approx(bias)
        assert rater.expected_rating(3, 0) == pytest.approx(
            np.clip(catalog.mean_rating[0] + bias, 1, 5)
        )
        shifted = catalog.mean_rating[0] + bias + weight * (5.0 - catalog.mean_rating[2] - bias)
        assert rater.expected_rating(3, 0, window) == pytest.approx(np.clip(shifted, 1, 5))
    default = TableRater.from_artifacts(table_artifacts, window_size=2)
    assert (default.spread, default.window_weight) == (0.8, 0.5)


def test_only_the_simulated_users_have_a_bias(table_artifacts, catalog):
    memories = pd.read_parquet(table_artifacts / "memories.parquet")
    embeddings = np.load(table_artifacts / "embeddings" / "items.npy")
    full = TableRater.from_artifacts(table_artifacts)
    rater = TableRater(catalog, embeddings, memories, {1: "one", 3: "three", 7: "no ratings"})
    assert set(rater.user_bias) == {1, 3} and rater.user_ids == [1, 3, 7]
    assert rater.user_bias[1] == pytest.approx(full.user_bias[1])
    assert rater.expected_rating(7, 4) == pytest.approx(
        catalog.mean_rating[4]
    )  # no ratings: bias 0
    with pytest.raises(KeyError):
        rater.expected_rating(0, 0)  # logged, but not a simulated user


def test_expected_ratings_stay_on_the_scale(table_artifacts):
    rater = TableRater.from_artifacts(table_artifacts, window_size=3, window_weight=10.0)
    high = tuple(Interaction(i, 5.0, i) for i in (1, 2, 3))
    low = tuple(Interaction(i, 1.0, i) for i in (1, 2, 3))
    assert rater.expected_rating(0, 0, high) == 5.0 and rater.expected_rating(0, 0, low) == 1.0


def test_the_window_is_cut_to_its_size_or_ignored(table_artifacts):
    window = (Interaction(1, 1.0, 1), Interaction(2, 5.0, 2), Interaction(3, 5.0, 3))
    one = TableRater.from_artifacts(table_artifacts, window_size=1)
    assert one.expected_rating(0, 0, window) == pytest.approx(
        one.expected_rating(0, 0, window[-1:])
    )
    three = TableRater.from_artifacts(table_artifacts, window_size=3)
    assert three.expected_rating(0, 0, window) != pytest.approx(one.expected_rating(0, 0, window))
    none = TableRater.from_artifacts(table_artifacts, window_size=0)
    assert none.window_size == 0 and none.expected_rating(0, 0, window) == none.expected_rating(
        0, 0
    )
    with pytest.raises(ValueError, match=r"^TableRater\.window_size must be >= 0, got -1$"):
        TableRater.from_artifacts(table_artifacts, window_size=-1)
    with pytest.raises(ValueError, match=r"^TableRater\.spread must be > 0, got -0\.5$"):
        TableRater.from_artifacts(table_artifacts, spread=-0.5)


def test_from_artifacts_reads_the_manifests_window_and_the_personas(table_artifacts, tmp_path):
    import json
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(table_artifacts, root)
    assert TableRater.from_artifacts(root).window_size == 3  # no manifest: the default
    (root / "manifest.json").write_text(json.dumps({"prompt": {"window_size": 4}}))
    assert TableRater.from_artifacts(root).window_size == 4
    assert TableRater.from_artifacts(root, window_size=1).window_size == 1
    (root / "personas.json").unlink()
    rater = TableRater.from_artifacts(root)
    assert [rater.persona(u) for u in rater.user_ids] == [-1] * 4 and rater.source == str(root)
    assert rater.item_embeddings.dtype == np.float32 and rater.catalog.item_ids.tolist() == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]


def test_bad_items_and_users_name_the_range(rater, table_artifacts):
    for item in (-1, 6):
        with pytest.raises(IndexError) as err:
            rater.expected_rating(0, item)
        assert str(err.value) == f"item {item} is outside the catalogue (0..5)"
    with pytest.raises(KeyError) as err:
        rater.expected_rating(42, 0)
    assert err.value.args[0] == f"user 42 is not a simulated user of {table_artifacts}"
    assert rater.expected_rating(0, 5) > 0 and rater.expected_rating(0, 0) > 0
