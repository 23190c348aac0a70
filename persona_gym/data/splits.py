"""Train/test splits of a :class:`~persona_gym.data.movielens.RatingsDataset`.

:func:`protocol_split` is the paper's evaluation protocol: a seeded choice of users with
100-200 interactions, each user's history split by time 60:40. Ratings of the users not chosen
form ``background``: usable as training signal (item averages, collaborative filtering), never
as test data. With ``all_users``, every other user with enough history is split by time the
same way: their training part joins ``background`` and their held-out part is ``other_test``, so
they can be simulated and evaluated as users the adapters never saw. :func:`random_split` is a
plain random hold-out over all ratings.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from persona_gym.data.movielens import RATINGS_COLUMNS, RatingsDataset

logger = logging.getLogger(__name__)

__all__ = ["Split", "protocol_split", "random_split"]

_SORT = ["user_id", "timestamp", "item_id"]


@dataclass(frozen=True, eq=False)
class Split:
    """A train/test split of some users' ratings, plus the other users' ratings as background."""

    name: str  # "protocol" | "random"
    train: pd.DataFrame  # training interactions of the selected users (ratings columns)
    test: pd.DataFrame  # held-out interactions of the selected users
    background: pd.DataFrame  # ratings of all other users: training signal only, never test
    user_ids: np.ndarray  # sorted selected user ids
    seed: int
    params: dict = field(default_factory=dict)  # the arguments that made it
    # with all_users: the other simulated users (sorted) and their held-out interactions; their
    # training interactions are the background rows of these users
    other_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    other_test: pd.DataFrame | None = None

    def simulated_train(self) -> pd.DataFrame:
        """Training interactions of every simulated user: the selected users' and the others'."""
        others = self.background[self.background["user_id"].isin(self.other_ids)]
        return _sorted(pd.concat([self.train, others], ignore_index=True))

    def rest(self) -> pd.DataFrame:
        """Background ratings of the users that are not simulated."""
        return self.background[~self.background["user_id"].isin(self.other_ids)].reset_index(
            drop=True
        )

    def item_stats(self) -> pd.DataFrame:
        """Per item ``item_id``, ``mean_rating``, ``n_ratings`` from train + background only.

        Test rows never contribute. Items that occur only in test are listed with
        ``n_ratings == 0`` and ``mean_rating`` NaN, so callers can tell "unseen" from "absent".
        Sorted by ``item_id``.
        """
        known = pd.concat([self.train, self.background], ignore_index=True)
        held = self.test if self.other_test is None else pd.concat([self.test, self.other_test])
        stats = (
            known.groupby("item_id")["rating"]
            .agg(mean_rating="mean", n_ratings="size")
            .reset_index()
        )
        only_test = np.setdiff1d(held["item_id"].unique(), stats["item_id"].to_numpy())
        if len(only_test):
            extra = pd.DataFrame({"item_id": only_test, "mean_rating": np.nan, "n_ratings": 0})
            stats = pd.concat([stats, extra], ignore_index=True)
        stats = stats.astype(
            {"item_id": np.int64, "mean_rating": np.float64, "n_ratings": np.int64}
        )
        return stats.sort_values("item_id").reset_index(drop=True)

    def summary(self) -> dict:
        """Sizes and per-user train/test count statistics (min/median/max)."""

        def per_user(df: pd.DataFrame) -> dict:
            counts = df.groupby("user_id").size().reindex(self.user_ids, fill_value=0)
            if not len(counts):
                return {"min": 0, "median": 0.0, "max": 0}
            return {
                "min": int(counts.min()),
                "median": float(counts.median()),
                "max": int(counts.max()),
            }

        summary = {
            "name": self.name,
            "seed": self.seed,
            "n_users": len(self.user_ids),
            "n_train": len(self.train),
            "n_test": len(self.test),
            "n_background": len(self.background),
            "train_per_user": per_user(self.train),
            "test_per_user": per_user(self.test),
        }
        if self.other_test is not None:
            summary.update(n_other_users=len(self.other_ids), n_other_test=len(self.other_test))
        return summary


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df[list(RATINGS_COLUMNS)].sort_values(_SORT, kind="stable").reset_index(drop=True)


def protocol_split(
    ds: RatingsDataset,
    n_users: int = 200,
    min_interactions: int = 100,
    max_interactions: int = 200,
    train_fraction: float = 0.6,
    seed: int = 0,
    all_users: bool = False,
    min_other_interactions: int = 20,
) -> Split:
    """The paper's protocol: ``n_users`` users with ``min..max`` interactions, split by time.

    Eligible users (``min_interactions <= n <= max_interactions``, inclusive) are sorted by id
    and ``n_users`` of them chosen without replacement with ``np.random.default_rng(seed)``.
    Each chosen user's ratings, sorted by ``(timestamp, item_id)``, go to train for the first
    ``floor(train_fraction * n)`` and to test for the rest (so every train timestamp is <=
    every test timestamp of that user). Everyone else's ratings form ``background``.

    ``all_users``: every other user with at least ``min_other_interactions`` ratings is split by
    time the same way (``other_ids``); their training part stays in ``background`` and their
    held-out part becomes ``other_test``, never training signal.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if all_users and min_other_interactions < 2:
        raise ValueError(f"min_other_interactions must be >= 2, got {min_other_interactions}")
    if min_interactions > max_interactions:
        raise ValueError(
            f"min_interactions ({min_interactions}) > max_interactions ({max_interactions})"
        )
    params = {
        "n_users": n_users,
        "min_interactions": min_interactions,
        "max_interactions": max_interactions,
        "train_fraction": train_fraction,
        "seed": seed,
    }
    if all_users:  # recorded only when set, so the split.json of a default split is unchanged
        params.update(all_users=True, min_other_interactions=min_other_interactions)
    ratings = ds.ratings
    counts = ratings.groupby("user_id").size()
    eligible = np.sort(
        counts.index[(counts >= min_interactions) & (counts <= max_interactions)].to_numpy()
    )
    if len(eligible) < n_users:
        raise ValueError(
            f"{ds.name}: only {len(eligible)} users have {min_interactions}-{max_interactions} "
            f"interactions, fewer than n_users={n_users}; lower n_users or widen the range."
        )
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(eligible, size=n_users, replace=False)).astype(np.int64)

    selected = _sorted(ratings[ratings["user_id"].isin(chosen)])
    background = _sorted(ratings[~ratings["user_id"].isin(chosen)])
    train, test = _by_time(selected, train_fraction)
    others, other_test = np.zeros(0, dtype=np.int64), None
    note = ""
    if all_users:
        rest = counts.drop(chosen)
        others = np.sort(rest.index[rest >= min_other_interactions].to_numpy()).astype(np.int64)
        mine = background["user_id"].isin(others).to_numpy()
        kept, other_test = _by_time(background[mine], train_fraction)
        background = _sorted(pd.concat([background[~mine], kept], ignore_index=True))
        note = f", {len(others)} other users with {len(other_test)} held out"
    logger.info(
        "protocol split of %s: %d users, %d train, %d test, %d background%s",
        ds.name,
        n_users,
        len(train),
        len(test),
        len(background),
        note,
    )
    return Split("protocol", train, test, background, chosen, seed, params, others, other_test)


def _by_time(rows: pd.DataFrame, train_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each user's first ``floor(train_fraction * n)`` ratings (sorted rows) and the rest."""
    rows = _sorted(rows)
    # position of each row within its user's time-ordered history, and that user's count
    rank = rows.groupby("user_id").cumcount().to_numpy()
    n = rows.groupby("user_id")["user_id"].transform("size").to_numpy()
    # small epsilon so that e.g. 0.6 * 105 = 62.99999... still gives 63
    n_train = np.floor(n * train_fraction + 1e-9).astype(np.int64)
    in_train = rank < n_train
    return rows[in_train].reset_index(drop=True), rows[~in_train].reset_index(drop=True)


def random_split(ds: RatingsDataset, test_fraction: float = 0.1, seed: int = 0) -> Split:
    """All users selected; ``round(test_fraction * n_ratings)`` random ratings go to test.

    ``background`` is empty (with the ratings columns).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    ratings = ds.ratings
    rng = np.random.default_rng(seed)
    n_test = int(math.floor(test_fraction * len(ratings) + 0.5))
    is_test = np.zeros(len(ratings), dtype=bool)
    is_test[rng.permutation(len(ratings))[:n_test]] = True
    train = _sorted(ratings[~is_test])
    test = _sorted(ratings[is_test])
    background = ratings.iloc[:0][list(RATINGS_COLUMNS)].reset_index(drop=True)
    user_ids = np.sort(ratings["user_id"].unique()).astype(np.int64)
    return Split(
        "random",
        train,
        test,
        background,
        user_ids,
        seed,
        {"test_fraction": test_fraction, "seed": seed},
    )
