"""TableRater: the collaborative-filtering user model without a language model."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from persona_gym.memory import Interaction
from persona_gym.rater import Rater
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
    assert len(history) == 6 and [x.timestamp for x in history] == sorted(x.timestamp for x in history)


def test_expected_rating_is_item_mean_plus_user_bias_plus_window(rater, table_artifacts, catalog):
    memories = pd.read_parquet(table_artifacts / "memories.parquet")
    mine = memories[memories["user_id"] == 1]
    residual = mine["rating"].to_numpy() - catalog.mean_rating[mine["item_index"].to_numpy()]
    bias = residual.sum() / (len(mine) + 5.0)
    assert rater.expected_rating(1, 0) == pytest.approx(np.clip(catalog.mean_rating[0] + bias, 1, 5))
    window = (Interaction(9, 1.0, 1), Interaction(2, 5.0, 2), Interaction(3, 5.0, 3))  # first cut
    shift = 0.5 * np.mean([5.0 - catalog.mean_rating[i] - bias for i in (2, 3)])
    assert rater.expected_rating(1, 0, window) == pytest.approx(
        np.clip(catalog.mean_rating[0] + bias + shift, 1, 5))


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
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(rater)).rate(users, items), rater.rate(users, items))


def test_bad_inputs_are_named(rater):
    with pytest.raises(KeyError, match="user 99 is not a simulated user"):
        rater.rate([99], [0])
    with pytest.raises(IndexError, match="item 6 is outside the catalogue"):
        rater.rate([0], [6])
    with pytest.raises(ValueError, match="spread must be > 0"):
        TableRater(rater.catalog, rater.item_embeddings, pd.DataFrame(), {}, spread=0)
