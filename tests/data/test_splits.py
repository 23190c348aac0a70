"""Splits: the paper's protocol on bundled ML-100k, determinism, time order, item_stats."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from persona_gym.data import (
    RatingsDataset,
    Split,
    load_ml100k_bundled,
    protocol_split,
    random_split,
)


@pytest.fixture(scope="module")
def ml100k() -> RatingsDataset:
    return load_ml100k_bundled()


def _keys(df: pd.DataFrame) -> set[tuple[int, int]]:
    return set(zip(df["user_id"], df["item_id"], strict=True))


def test_protocol_split_on_ml100k(ml100k: RatingsDataset) -> None:
    s = protocol_split(ml100k, seed=0)
    assert s.name == "protocol" and s.seed == 0 and s.params["n_users"] == 200
    assert len(s.user_ids) == 200 and np.all(np.diff(s.user_ids) > 0)
    assert set(s.train["user_id"]) == set(s.test["user_id"]) == set(s.user_ids.tolist())
    assert not set(s.background["user_id"]) & set(s.user_ids.tolist())
    assert len(s.train) + len(s.test) + len(s.background) == len(ml100k.ratings)
    assert not _keys(s.train) & _keys(s.test)
    for df in (s.train, s.test, s.background):
        assert list(df.columns) == list(ml100k.ratings.columns)
        assert isinstance(df.index, pd.RangeIndex)
    # per user: 100..200 interactions, floor(0.6 n) in train, no train rating after a test rating
    n = pd.concat([s.train, s.test]).groupby("user_id").size()
    assert n.between(100, 200).all()
    n_train = s.train.groupby("user_id").size()
    assert (n_train == np.floor(n * 0.6).astype(int)).all()
    last_train = s.train.groupby("user_id")["timestamp"].max()
    first_test = s.test.groupby("user_id")["timestamp"].min()
    assert (last_train <= first_test).all()
    summ = s.summary()
    assert summ["n_users"] == 200 and summ["train_per_user"]["min"] == 60
    assert summ["test_per_user"]["min"] == 40


def test_protocol_split_deterministic(ml100k: RatingsDataset) -> None:
    a, b = protocol_split(ml100k, seed=3), protocol_split(ml100k, seed=3)
    np.testing.assert_array_equal(a.user_ids, b.user_ids)
    pd.testing.assert_frame_equal(a.train, b.train)
    pd.testing.assert_frame_equal(a.test, b.test)
    c = protocol_split(ml100k, seed=4)
    assert not np.array_equal(a.user_ids, c.user_ids)


def test_protocol_split_too_few_users(ml100k: RatingsDataset) -> None:
    with pytest.raises(ValueError, match="only 216 users have 100-200 interactions"):
        protocol_split(ml100k, n_users=217)
    assert len(protocol_split(ml100k, n_users=216).user_ids) == 216


def _tiny() -> RatingsDataset:
    """User 1 (selected) rates item 10 with 1 early and 5 late; user 2 is background."""
    ratings = pd.DataFrame(
        [
            (1, 10, 1, 1),
            (1, 11, 5, 2),
            (1, 12, 5, 3),
            (1, 13, 2, 3),  # test: train is the first floor(0.6 * 5) = 3
            (1, 14, 5, 4),  # test: item 14 is rated only here
            (2, 10, 3, 1),
            (2, 12, 1, 1),
            (2, 13, 4, 9),
        ],
        columns=["user_id", "item_id", "rating", "timestamp"],
    ).astype(np.int64)
    users = pd.DataFrame(
        {
            "user_id": [1, 2],
            "gender": ["M", "F"],
            "age": [20, 30],
            "occupation": ["other", "other"],
            "zip": ["1", "2"],
        }
    )
    items = pd.DataFrame(
        {
            "item_id": [10, 11, 12, 13, 14],
            "title": list("abcde"),
            "year": pd.array([None] * 5, dtype="Int64"),
            "genres": [()] * 5,
        }
    )
    return RatingsDataset("tiny", ratings, users, items)


def test_item_stats_never_use_test_rows() -> None:
    s = protocol_split(_tiny(), n_users=1, min_interactions=5, max_interactions=5)
    assert s.user_ids.tolist() == [1]
    # ties in timestamp break by item_id: (1,12,t=3) before (1,13,t=3)
    assert s.train["item_id"].tolist() == [10, 11, 12]
    assert s.test["item_id"].tolist() == [13, 14]
    stats = s.item_stats().set_index("item_id")
    assert stats.loc[10, "mean_rating"] == 2.0 and stats.loc[10, "n_ratings"] == 2
    assert stats.loc[12, "mean_rating"] == 3.0
    # item 13: test rating 2 excluded, only the background 4 counts
    assert stats.loc[13, "mean_rating"] == 4.0 and stats.loc[13, "n_ratings"] == 1
    # item 14 only in test: listed with no ratings
    assert stats.loc[14, "n_ratings"] == 0 and np.isnan(stats.loc[14, "mean_rating"])


def test_random_split(ml100k: RatingsDataset) -> None:
    a = random_split(ml100k, test_fraction=0.1, seed=1)
    b = random_split(ml100k, test_fraction=0.1, seed=1)
    assert isinstance(a, Split) and a.name == "random"
    assert len(a.test) == 10_000 and len(a.train) == 90_000 and a.background.empty
    assert list(a.background.columns) == list(ml100k.ratings.columns)
    assert len(a.user_ids) == 943
    assert not _keys(a.train) & _keys(a.test)
    pd.testing.assert_frame_equal(a.test, b.test)
    assert not a.test.equals(random_split(ml100k, seed=2).test)
    assert a.item_stats()["n_ratings"].sum() == 90_000
