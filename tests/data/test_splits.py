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


# -- values (mutation testing) --------------------------------------------------------------------
def _synthetic(counts: dict[int, int], seed: int = 0) -> RatingsDataset:
    """Users with the given numbers of ratings (distinct items, shuffled timestamps)."""
    rng = np.random.default_rng(seed)
    rows = []
    for user, n in counts.items():
        for item, stamp in zip(range(n), rng.permutation(n), strict=True):
            rows.append((user, item + 1, int(rng.integers(1, 6)), int(stamp)))
    ratings = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).astype(
        np.int64
    )
    n_items = max(counts.values())
    users = pd.DataFrame(
        {"user_id": list(counts), "gender": "M", "age": 30, "occupation": "other", "zip": "1"}
    )
    items = pd.DataFrame(
        {
            "item_id": range(1, n_items + 1),
            "title": [f"m{i}" for i in range(n_items)],
            "year": pd.array([None] * n_items, dtype="Int64"),
            "genres": [()] * n_items,
        }
    )
    return RatingsDataset("synthetic", ratings, users, items)


def test_protocol_split_chooses_with_the_seeded_rng_among_the_inclusive_range() -> None:
    ds = _synthetic({1: 4, 2: 5, 3: 6, 4: 7, 5: 8, 6: 9, 7: 10})
    for seed in (0, 1, 2):
        s = protocol_split(
            ds, n_users=3, min_interactions=5, max_interactions=9, train_fraction=0.5, seed=seed
        )
        eligible = np.array([2, 3, 4, 5, 6])  # 5..9 ratings, both ends included
        chosen = np.sort(np.random.default_rng(seed).choice(eligible, size=3, replace=False))
        np.testing.assert_array_equal(s.user_ids, chosen)
        assert s.user_ids.dtype == np.int64 and s.seed == seed
        assert set(s.background["user_id"]) == {1, 2, 3, 4, 5, 6, 7} - set(chosen.tolist())
        assert s.params == {
            "n_users": 3,
            "min_interactions": 5,
            "max_interactions": 9,
            "train_fraction": 0.5,
            "seed": seed,
        }
    everyone = protocol_split(ds, n_users=5, min_interactions=5, max_interactions=9, seed=0)
    assert everyone.user_ids.tolist() == [2, 3, 4, 5, 6]
    with pytest.raises(ValueError) as err:
        protocol_split(ds, n_users=6, min_interactions=5, max_interactions=9)
    assert str(err.value) == (
        "synthetic: only 5 users have 5-9 interactions, fewer than n_users=6; "
        "lower n_users or widen the range."
    )


def test_protocol_split_cuts_each_user_at_floor_of_the_fraction_in_time_order() -> None:
    ds = _synthetic({1: 105, 2: 7, 3: 10})
    s = protocol_split(ds, n_users=3, min_interactions=7, max_interactions=105, train_fraction=0.6)
    n_train = s.train.groupby("user_id").size().to_dict()
    assert n_train == {1: 63, 2: 4, 3: 6}  # 0.6 * 105 = 62.99999...: still 63
    assert s.test.groupby("user_id").size().to_dict() == {1: 42, 2: 3, 3: 4}
    for user in (1, 2, 3):
        mine = ds.ratings[ds.ratings["user_id"] == user].sort_values(["timestamp", "item_id"])
        train = s.train[s.train["user_id"] == user]
        test = s.test[s.test["user_id"] == user]
        assert train["item_id"].tolist() == mine["item_id"].tolist()[: n_train[user]]
        assert test["item_id"].tolist() == mine["item_id"].tolist()[n_train[user] :]
    assert s.background.empty and list(s.background.columns) == list(ds.ratings.columns)
    half = protocol_split(
        ds, n_users=3, min_interactions=7, max_interactions=105, train_fraction=0.5
    )
    assert half.train.groupby("user_id").size().to_dict() == {1: 52, 2: 3, 3: 5}


def test_split_arguments_are_checked() -> None:
    ds = _synthetic({1: 5})
    for fraction in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError) as err:
            protocol_split(
                ds, n_users=1, min_interactions=1, max_interactions=5, train_fraction=fraction
            )
        assert str(err.value) == f"train_fraction must be in (0, 1), got {fraction}"
        with pytest.raises(ValueError) as err:
            random_split(ds, test_fraction=fraction)
        assert str(err.value) == f"test_fraction must be in (0, 1), got {fraction}"
    with pytest.raises(ValueError) as err:
        protocol_split(ds, n_users=1, min_interactions=6, max_interactions=5)
    assert str(err.value) == "min_interactions (6) > max_interactions (5)"
    assert len(protocol_split(ds, n_users=1, min_interactions=5, max_interactions=5).user_ids) == 1


def test_random_split_rounds_half_up_and_sorts() -> None:
    ds = _synthetic({3: 3, 1: 2, 2: 1})  # 6 ratings
    s = random_split(ds, test_fraction=0.25, seed=5)  # 1.5 -> 2
    assert len(s.test) == 2 and len(s.train) == 4
    is_test = np.zeros(6, dtype=bool)
    is_test[np.random.default_rng(5).permutation(6)[:2]] = True
    expected = (
        ds.ratings[is_test].sort_values(["user_id", "timestamp", "item_id"]).reset_index(drop=True)
    )
    pd.testing.assert_frame_equal(s.test, expected)
    assert s.train["user_id"].is_monotonic_increasing and isinstance(s.train.index, pd.RangeIndex)
    assert s.user_ids.tolist() == [1, 2, 3] and s.user_ids.dtype == np.int64
    assert s.params == {"test_fraction": 0.25, "seed": 5} and s.seed == 5 and s.name == "random"
    assert len(random_split(ds, test_fraction=0.4, seed=0).test) == 2  # 2.4 -> 2
    assert len(random_split(ds, test_fraction=0.1, seed=0).test) == 1  # 0.6 -> 1
    assert len(random_split(ds).test) == 1  # default 0.1


def test_summary_and_item_stats_by_hand() -> None:
    s = protocol_split(_tiny(), n_users=1, min_interactions=5, max_interactions=5)
    assert s.summary() == {
        "name": "protocol",
        "seed": 0,
        "n_users": 1,
        "n_train": 3,
        "n_test": 2,
        "n_background": 3,
        "train_per_user": {"min": 3, "median": 3.0, "max": 3},
        "test_per_user": {"min": 2, "median": 2.0, "max": 2},
    }
    stats = s.item_stats()
    assert stats["item_id"].tolist() == [10, 11, 12, 13, 14]
    assert stats["n_ratings"].tolist() == [2, 1, 2, 1, 0]
    np.testing.assert_array_equal(stats["mean_rating"].to_numpy(), [2.0, 5.0, 3.0, 4.0, np.nan])
    assert stats.dtypes.to_dict() == {
        "item_id": np.int64,
        "mean_rating": np.float64,
        "n_ratings": np.int64,
    }
    assert isinstance(stats.index, pd.RangeIndex)
    empty = Split(
        "random", s.train.iloc[:0], s.test.iloc[:0], s.background, np.array([], dtype=np.int64), 0
    )
    assert empty.summary()["train_per_user"] == {"min": 0, "median": 0.0, "max": 0}
    wide = protocol_split(
        _synthetic({1: 4, 2: 6, 3: 9}),
        n_users=3,
        min_interactions=4,
        max_interactions=9,
        train_fraction=0.5,
    )
    assert wide.summary()["train_per_user"] == {"min": 2, "median": 3.0, "max": 4}
    assert wide.summary()["test_per_user"] == {"min": 2, "median": 3.0, "max": 5}


def test_split_logging_default_seed_and_users_without_rows(caplog) -> None:
    import logging

    ds = _synthetic({1: 7, 2: 8, 3: 9})
    with caplog.at_level(logging.INFO, logger="persona_gym.data.splits"):
        s = protocol_split(
            ds, n_users=2, min_interactions=7, max_interactions=8, train_fraction=0.5
        )
    assert [r.getMessage() for r in caplog.records] == [
        "protocol split of synthetic: 2 users, 7 train, 8 test, 9 background"
    ]
    pd.testing.assert_frame_equal(random_split(ds).test, random_split(ds, seed=0).test)
    assert not random_split(ds).test.equals(random_split(ds, seed=1).test)
    # a selected user without test rows counts as 0 in the summary, not as absent
    lopsided = Split(
        "protocol", s.train, s.test[s.test["user_id"] == 1], s.background, s.user_ids, 0
    )
    assert lopsided.summary()["test_per_user"] == {"min": 0, "median": 2.0, "max": 4}


def test_all_users_splits_every_other_user_by_time_and_holds_their_future_out(
    ml100k: RatingsDataset,
) -> None:
    """``all_users``: the protocol users are unchanged; every other user with >= 20 ratings is cut
    at floor(0.6 n) in time order, the first part joining the background (training signal), the
    rest in ``other_test``, which no item statistic reads."""
    default = protocol_split(ml100k, seed=0)
    s = protocol_split(ml100k, seed=0, all_users=True, min_other_interactions=20)
    assert "all_users" not in default.params and s.params["all_users"] is True
    assert default.other_test is None and len(default.other_ids) == 0
    assert np.array_equal(s.user_ids, default.user_ids)
    assert s.train.equals(default.train) and s.test.equals(default.test)
    counts = ml100k.ratings.groupby("user_id").size().drop(s.user_ids)
    assert s.other_ids.tolist() == sorted(counts.index[counts >= 20].tolist())  # ML-100k: all 743
    assert len(s.other_ids) == 743 and not set(s.other_ids.tolist()) & set(s.user_ids.tolist())
    assert not _keys(s.other_test) & _keys(s.background)
    assert len(s.background) + len(s.other_test) == len(default.background)
    for user in s.other_ids[:50]:
        past = s.background[s.background["user_id"] == user]
        future = s.other_test[s.other_test["user_id"] == user]
        n = len(past) + len(future)
        assert len(past) == int(np.floor(0.6 * n + 1e-9))
        assert past["timestamp"].max() <= future["timestamp"].min()
    assert s.simulated_train()["user_id"].nunique() == 943 and len(s.rest()) == 0
    assert s.summary()["n_other_users"] == 743 and s.summary()["n_other_test"] == len(s.other_test)
    # item averages from train + background only: the others' held-out ratings do not count
    stats = s.item_stats().set_index("item_id")
    known = pd.concat([s.train, s.background]).groupby("item_id")["rating"].mean()
    assert np.allclose(stats.loc[known.index, "mean_rating"], known)
    assert not np.allclose(
        default.item_stats().set_index("item_id").loc[known.index, "mean_rating"], known
    )
    with pytest.raises(ValueError, match="min_other_interactions must be >= 2"):
        protocol_split(ml100k, all_users=True, min_other_interactions=1)
