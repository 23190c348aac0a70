"""Studies of a simulator beyond held-out error: persona specificity, memory, reward landscape.

Each study asks the simulator through ``rate(variant, users, items, windows, gaps=None) ->
(n, 5)`` (``variant`` = ``"persona"`` for every user's own adapter, or one adapter's name for
everyone; ``gaps``: the user's interactions between each window and its candidate, default none)
and compares with the collaborative-filtering side where that makes sense:

* :func:`persona_specificity`: each user's RMSE under their own persona adapter and under
  every other persona adapter; the share of users whose own adapter is the best.
* :func:`memory_slope`: in time order, the residual ``e = r - (user mean + item bias)`` of a
  rating regressed on the mean residual of the user's previous 3 real ratings; the simulator's
  slope uses its expected rating, with those real previous 3 in its window.
* :func:`landscape`: the expected ratings of random movies each user never rated, read as the
  reward a policy could earn by choosing (:func:`~persona_gym.evaluation.metrics.reward_landscape`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import pandas as pd

from persona_gym.evaluation.metrics import RATING_VALUES, reward_landscape, slope
from persona_gym.simulator.memory import Interaction


class Rate(Protocol):
    """How a study asks the simulator (module docstring)."""

    def __call__(
        self,
        variant: str,
        users: Sequence[int],
        items: Sequence[int],
        windows: Sequence[Sequence[Interaction]],
        gaps: Sequence[int] | None = None,
    ) -> np.ndarray: ...


__all__ = ["landscape", "memory_slope", "persona_specificity"]


def persona_specificity(
    rate: Rate,
    users: np.ndarray,
    items: np.ndarray,
    real: np.ndarray,
    windows: Sequence,
    user_persona: dict[int, int],
    gaps: Sequence[int] | None = None,
) -> dict:
    """Own-adapter vs other-adapter fit per user (rows: the users' test interactions): RMSE of
    the expected rating, and which adapter is best per user by RMSE and by NLL (the whole
    distribution: an adapter may know its users' spread without moving their mean)."""
    personas = sorted(set(user_persona.values()))
    users = np.asarray(users, dtype=np.int64)
    real = np.asarray(real, dtype=np.float64)
    grade = np.rint(real).astype(np.int64) - 1
    errors, nlls = {}, {}
    for p in personas:
        probs = rate(f"persona-{p}", users.tolist(), np.asarray(items).tolist(), windows, gaps)
        errors[p] = (probs @ RATING_VALUES - real) ** 2
        nlls[p] = -np.log(np.clip(probs[np.arange(len(real)), grade], 1e-12, None))
    own: list[float] = []
    other: list[float] = []
    best: list[bool] = []
    best_nll: list[bool] = []
    for user in np.unique(users):
        rows = users == user
        per = {p: float(np.sqrt(errors[p][rows].mean())) for p in personas}
        per_nll = {p: float(nlls[p][rows].mean()) for p in personas}
        mine = user_persona[int(user)]
        own.append(per[mine])
        other.append(
            float(np.mean([v for p, v in per.items() if p != mine])) if len(per) > 1 else np.nan
        )
        best.append(min(per, key=lambda p: per[p]) == mine)
        best_nll.append(min(per_nll, key=lambda p: per_nll[p]) == mine)
    return {
        "personas": len(personas),
        "users": len(own),
        "rows": int(len(users)),
        "own_rmse": float(np.mean(own)),
        "other_rmse": float(np.nanmean(other)),
        "own_best_share": float(np.mean(best)),
        "own_best_share_nll": float(np.mean(best_nll)),
        "chance": 1.0 / max(len(personas), 1),
    }


def _residual_inputs(
    history: pd.DataFrame, user_mean: dict[int, float], item_bias: np.ndarray
) -> pd.DataFrame:
    """Per rating of ``history`` (user_id, item_index, rating, timestamp, is_test): its baseline
    and the mean real residual of the user's previous 3 ratings (NaN for a user's first)."""
    h = history.sort_values(["user_id", "timestamp", "item_index"], kind="stable").reset_index(
        drop=True
    )
    h["baseline"] = h["user_id"].map(user_mean).to_numpy() + item_bias[h["item_index"].to_numpy()]
    h["residual"] = h["rating"] - h["baseline"]
    h["previous"] = h.groupby("user_id")["residual"].transform(
        lambda s: s.shift(1).rolling(3, min_periods=3).mean()
    )
    return h


def memory_slope(
    rate: Rate,
    history: pd.DataFrame,
    user_mean: dict[int, float],
    item_bias: np.ndarray,
    max_per_user: int | None = 15,
) -> dict:
    """Real and simulated slope of a rating's residual on the previous 3 residuals.

    ``history``: every rating of the simulated users (train and test) with an ``is_test``
    column; the real slope is over all test ratings, the simulated one over the first
    ``max_per_user`` test ratings of each user (one prompt per rating: windows differ).
    """
    h = _residual_inputs(history, user_mean, item_bias)
    test = h[h["is_test"] & h["previous"].notna()]
    real_slope = slope(test["previous"], test["residual"])
    rows = test.groupby("user_id").head(max_per_user) if max_per_user else test
    windows = []
    for row in rows.itertuples():
        past = h.iloc[max(0, row.Index - 3) : row.Index]
        windows.append(
            tuple(
                Interaction(int(i), float(r), int(t))
                for i, r, t in zip(
                    past["item_index"], past["rating"], past["timestamp"], strict=True
                )
            )
        )
    expected = (
        rate("persona", rows["user_id"].tolist(), rows["item_index"].tolist(), windows)
        @ RATING_VALUES
    )
    sim_slope = slope(rows["previous"], expected - rows["baseline"].to_numpy())
    return {
        "real_slope": real_slope,
        "real_rows": int(len(test)),
        "real_slope_same_rows": slope(rows["previous"], rows["residual"]),
        "simulated_slope": sim_slope,
        "simulated_rows": int(len(rows)),
        "ratio": sim_slope / real_slope if real_slope else float("nan"),
    }


def landscape(
    rate: Rate,
    seen: dict[int, set[int]],
    n_items: int,
    windows: dict[int, tuple],
    predict_cf: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    n_users: int = 30,
    per_user: int = 300,
    seed: int = 0,
) -> dict:
    """Reward landscape over ``per_user`` random unseen movies of ``n_users`` seeded users.

    ``seen``: each simulated user's rated catalogue indices (train and test); ``windows``: the
    window each user is rated with (the evaluator's: the last training interactions);
    ``predict_cf(users, items)`` adds the same figures for a collaborative model.
    """
    rng = np.random.default_rng([seed, 300])
    pool = sorted(seen)
    chosen = sorted(rng.choice(pool, size=min(n_users, len(pool)), replace=False).tolist())
    users, items = [], []
    for user in chosen:
        unseen = np.setdiff1d(np.arange(n_items), np.fromiter(seen[user], dtype=np.int64))
        pick = rng.choice(unseen, size=min(per_user, len(unseen)), replace=False)
        users += [user] * len(pick)
        items += pick.tolist()
    if not users:  # every movie rated by every chosen user
        return {}
    users_a, items_a = np.asarray(users), np.asarray(items)
    pred = rate("persona", users, items, [windows[u] for u in users]) @ RATING_VALUES
    out = {"simulator": reward_landscape(users_a, pred)}
    if predict_cf is not None:
        out["matrix factorisation"] = reward_landscape(users_a, predict_cf(users_a, items_a))
    return out
