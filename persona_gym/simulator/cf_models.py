"""Collaborative-filtering models (numpy, seeded, CPU-seconds): the user model's collaborative
signal is built from them (:mod:`persona_gym.simulator.collaborative`), and the evaluation reports them as
baselines (:mod:`persona_gym.evaluation.baselines`).

Every model is fitted on the information the simulator may use — the selected users' TRAINING
interactions plus the other users' ratings (``Split.train`` + ``Split.background``,
:func:`fit_frame`) — and predicts ratings for ``(user_id, item_id)`` pairs. Test ratings are
never read by ``fit``.

* :class:`GlobalMean`  the mean training rating.
* :class:`ItemMean`    the item's mean training rating, optionally shrunk toward the global
  mean by ``shrinkage`` pseudo-ratings (0 = the plain mean); unseen items get the global mean.
* :class:`BiasModel`   ``mu + b_u + b_i`` with L2 penalties ``reg_user`` / ``reg_item``, fitted
  by alternating closed-form updates (exact coordinate descent on the ridge objective).
* :class:`BiasedMF`    ``mu + b_u + b_i + p_u . q_i`` (Koren et al.), fitted by alternating
  least squares: each user's ``[p_u, b_u]`` and each item's ``[q_i, b_i]`` is a small ridge
  solve given the other side; factors start from a seeded normal draw.
* :class:`ItemKNN`     item-based neighbourhood on the residuals of a :class:`BiasModel`
  (Koren's "kNN baseline"): ``b_ui + sum_j s_ij (r_uj - b_uj) / sum_j s_ij`` over the ``k``
  items the user rated that are most similar to ``i`` (shrunk Pearson-baseline similarity).

Predictions are clipped to [1, 5]. Unknown users/items fall back to the parts that are known.

Hyper-parameters are chosen on a **validation slice of the training part**
(:func:`validation_split`: the last ``fraction`` of each selected user's time-ordered training
interactions), fitting on the rest of train + background (:func:`tune`, over the grids of
:data:`DEFAULT_GRIDS`); the chosen setting is then refitted on all of train + background.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from persona_gym.ratings import rmse

__all__ = [
    "DEFAULT_GRIDS",
    "BiasModel",
    "BiasedMF",
    "GlobalMean",
    "ItemKNN",
    "ItemMean",
    "fit_frame",
    "tune",
    "validation_split",
]


class _Model:
    """Shared id handling: dense indices of the users and items seen in ``fit``."""

    def _index(self, ratings: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        for column in ("user_id", "item_id", "rating"):
            if column not in ratings:
                raise ValueError(f"ratings need a {column!r} column; have {list(ratings.columns)}")
        if not len(ratings):
            raise ValueError("cannot fit on an empty ratings table")
        self.users_ = np.unique(ratings["user_id"].to_numpy(np.int64))
        self.items_ = np.unique(ratings["item_id"].to_numpy(np.int64))
        u = np.searchsorted(self.users_, ratings["user_id"].to_numpy(np.int64))
        i = np.searchsorted(self.items_, ratings["item_id"].to_numpy(np.int64))
        r = ratings["rating"].to_numpy(np.float64)
        self.mu_ = float(r.mean())
        return u, i, r

    @staticmethod
    def lookup(known: np.ndarray, ids) -> np.ndarray:
        """Dense index of each id in the sorted ``known`` ids (a fitted ``users_`` or ``items_``),
        -1 where unknown."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(known):
            return np.full(len(ids), -1)
        pos = np.clip(np.searchsorted(known, ids), 0, len(known) - 1)
        return np.where(known[pos] == ids, pos, -1)

    def params(self) -> dict:
        return {}

    def predict(self, user_ids, item_ids) -> np.ndarray:
        user_ids = np.asarray(user_ids, dtype=np.int64)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if user_ids.shape != item_ids.shape:
            raise ValueError("user_ids and item_ids differ in length")
        return np.clip(
            self._predict(self.lookup(self.users_, user_ids), self.lookup(self.items_, item_ids)),
            1.0,
            5.0,
        )

    def _predict(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class GlobalMean(_Model):
    """Predicts the mean training rating for everyone."""

    name = "global mean"

    def fit(self, ratings: pd.DataFrame) -> GlobalMean:
        self._index(ratings)
        return self

    def _predict(self, u, i):
        return np.full(len(u), self.mu_)


class ItemMean(_Model):
    """The item's mean rating, shrunk by ``shrinkage`` pseudo-ratings at the global mean."""

    name = "item mean"

    def __init__(self, shrinkage: float = 0.0):
        self.shrinkage = float(shrinkage)

    def params(self) -> dict:
        return {"shrinkage": self.shrinkage}

    def fit(self, ratings: pd.DataFrame) -> ItemMean:
        _, i, r = self._index(ratings)
        sums = np.bincount(i, weights=r, minlength=len(self.items_))
        counts = np.bincount(i, minlength=len(self.items_))
        self.item_mean_ = (sums + self.shrinkage * self.mu_) / (counts + self.shrinkage)
        return self

    def _predict(self, u, i):
        return np.where(i >= 0, self.item_mean_[np.maximum(i, 0)], self.mu_)


class BiasModel(_Model):
    """``mu + b_u + b_i`` with ridge penalties, by alternating exact updates."""

    name = "user+item bias"

    def __init__(self, reg_user: float = 5.0, reg_item: float = 5.0, n_iter: int = 20):
        self.reg_user, self.reg_item, self.n_iter = float(reg_user), float(reg_item), int(n_iter)

    def params(self) -> dict:
        return {"reg_user": self.reg_user, "reg_item": self.reg_item}

    def fit(self, ratings: pd.DataFrame) -> BiasModel:
        u, i, r = self._index(ratings)
        n_u, n_i = len(self.users_), len(self.items_)
        cu, ci = np.bincount(u, minlength=n_u), np.bincount(i, minlength=n_i)
        bu, bi = np.zeros(n_u), np.zeros(n_i)
        resid = r - self.mu_
        for _ in range(self.n_iter):
            bi = np.bincount(i, weights=resid - bu[u], minlength=n_i) / (ci + self.reg_item)
            bu = np.bincount(u, weights=resid - bi[i], minlength=n_u) / (cu + self.reg_user)
        self.bu_, self.bi_ = bu, bi
        return self

    def _predict(self, u, i):
        bu = np.where(u >= 0, self.bu_[np.maximum(u, 0)], 0.0)
        bi = np.where(i >= 0, self.bi_[np.maximum(i, 0)], 0.0)
        return self.mu_ + bu + bi


class BiasedMF(_Model):
    """Biased matrix factorisation ``mu + b_u + b_i + p_u . q_i`` fitted by ALS."""

    name = "matrix factorisation"

    def __init__(
        self,
        factors: int = 10,
        reg: float = 10.0,
        reg_bias: float = 5.0,
        n_iter: int = 15,
        seed: int = 0,
        init_scale: float = 0.1,
    ):
        self.factors, self.reg, self.reg_bias = int(factors), float(reg), float(reg_bias)
        self.n_iter, self.seed, self.init_scale = int(n_iter), int(seed), float(init_scale)

    def params(self) -> dict:
        return {
            "factors": self.factors,
            "reg": self.reg,
            "reg_bias": self.reg_bias,
            "n_iter": self.n_iter,
            "seed": self.seed,
        }

    @staticmethod
    def _solve(
        rows_of: list[np.ndarray],
        other: np.ndarray,
        other_bias: np.ndarray,
        target_idx: np.ndarray,
        resid: np.ndarray,
        reg: float,
        reg_bias: float,
        n: int,
        f: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """For each entity e: ridge solve of ``[x_e, b_e]`` on ``resid - other_bias`` ≈
        ``[other, 1] @ [x_e, b_e]`` over its ratings."""
        x, b = np.zeros((n, f)), np.zeros(n)
        penalty = np.diag(np.r_[np.full(f, reg), reg_bias])
        for e, rows in enumerate(rows_of):
            if not len(rows):
                continue
            j = target_idx[rows]
            design = np.c_[other[j], np.ones(len(rows))]
            y = resid[rows] - other_bias[j]
            sol = np.linalg.solve(design.T @ design + penalty, design.T @ y)
            x[e], b[e] = sol[:f], sol[f]
        return x, b

    def fit(self, ratings: pd.DataFrame) -> BiasedMF:
        u, i, r = self._index(ratings)
        n_u, n_i, f = len(self.users_), len(self.items_), self.factors
        rng = np.random.default_rng(self.seed)
        q = rng.normal(0.0, self.init_scale, size=(n_i, f))
        bi = np.zeros(n_i)
        resid = r - self.mu_
        by_user = _group_rows(u, n_u)
        by_item = _group_rows(i, n_i)
        p, bu = np.zeros((n_u, f)), np.zeros(n_u)
        for _ in range(self.n_iter):
            p, bu = self._solve(by_user, q, bi, i, resid, self.reg, self.reg_bias, n_u, f)
            q, bi = self._solve(by_item, p, bu, u, resid, self.reg, self.reg_bias, n_i, f)
        self.p_, self.bu_, self.q_, self.bi_ = p, bu, q, bi
        return self

    def _predict(self, u, i):
        ku, ki = u >= 0, i >= 0
        uu, ii = np.maximum(u, 0), np.maximum(i, 0)
        bu = np.where(ku, self.bu_[uu], 0.0)
        bi = np.where(ki, self.bi_[ii], 0.0)
        dot = np.where(ku & ki, np.einsum("nf,nf->n", self.p_[uu], self.q_[ii]), 0.0)
        return self.mu_ + bu + bi + dot


class ItemKNN(_Model):
    """Item-based kNN on bias-model residuals, with shrunk Pearson-baseline similarities."""

    name = "item kNN"

    def __init__(
        self, k: int = 40, shrinkage: float = 100.0, reg_user: float = 15.0, reg_item: float = 0.3
    ):
        self.k, self.shrinkage = int(k), float(shrinkage)
        self.reg_user, self.reg_item = float(reg_user), float(reg_item)

    def params(self) -> dict:
        return {
            "k": self.k,
            "shrinkage": self.shrinkage,
            "reg_user": self.reg_user,
            "reg_item": self.reg_item,
        }

    def fit(self, ratings: pd.DataFrame) -> ItemKNN:
        u, i, r = self._index(ratings)
        self.baseline_ = BiasModel(self.reg_user, self.reg_item).fit(ratings)
        base = self.baseline_._predict(
            self.baseline_.lookup(self.baseline_.users_, self.users_[u]),
            self.baseline_.lookup(self.baseline_.items_, self.items_[i]),
        )
        n_u, n_i = len(self.users_), len(self.items_)
        resid = np.zeros((n_u, n_i), dtype=np.float32)
        rated = np.zeros((n_u, n_i), dtype=np.float32)
        resid[u, i] = r - base
        rated[u, i] = 1.0
        co_rated = rated.T @ rated
        square = (resid**2).T @ rated  # [i, j]: sum of r_ui^2 over users who rated both
        sim = (resid.T @ resid) / np.sqrt(square * square.T + 1e-12)
        sim *= co_rated / (co_rated + self.shrinkage)
        np.fill_diagonal(sim, 0.0)
        self.resid_, self.sim_ = resid, sim
        self.rated_ = [np.flatnonzero(row) for row in rated]
        return self

    def neighbourhood(self, u: int, i: np.ndarray) -> np.ndarray:
        """The neighbourhood term of known user row ``u`` for known item rows ``i``."""
        rated = self.rated_[u]
        sims = self.sim_[np.ix_(i, rated)]
        if len(rated) > self.k:
            top = np.argpartition(-sims, self.k - 1, axis=1)[:, : self.k]
            sims = np.take_along_axis(sims, top, axis=1)
            resid = self.resid_[u, rated][top]
        else:
            resid = np.broadcast_to(self.resid_[u, rated], sims.shape)
        sims = np.maximum(sims, 0.0)
        total = sims.sum(axis=1)
        return np.where(total > 0, (sims * resid).sum(axis=1) / np.maximum(total, 1e-12), 0.0)

    def _predict(self, u, i):
        users, items = (
            np.where(u >= 0, self.users_[np.maximum(u, 0)], -1),
            np.where(i >= 0, self.items_[np.maximum(i, 0)], -1),
        )
        out = self.baseline_._predict(
            self.baseline_.lookup(self.baseline_.users_, users),
            self.baseline_.lookup(self.baseline_.items_, items),
        )
        known = (u >= 0) & (i >= 0)
        for row in np.unique(u[known]):
            at = np.flatnonzero(known & (u == row))
            out[at] += self.neighbourhood(int(row), i[at])
        return out


def _group_rows(index: np.ndarray, n: int) -> list[np.ndarray]:
    order = np.argsort(index, kind="stable")
    bounds = np.searchsorted(index[order], np.arange(n + 1))
    return [order[bounds[e] : bounds[e + 1]] for e in range(n)]


# Hyper-parameter grids searched on the validation slice (small: the whole search is seconds).
DEFAULT_GRIDS: dict[str, tuple[type, dict[str, list]]] = {
    "global mean": (GlobalMean, {}),
    "item mean": (ItemMean, {"shrinkage": [0.0]}),
    "item mean (shrunk)": (ItemMean, {"shrinkage": [1.0, 3.0, 10.0, 25.0]}),
    "user+item bias": (BiasModel, {"reg_user": [5.0, 15.0, 30.0], "reg_item": [0.3, 1.0, 3.0]}),
    "matrix factorisation": (
        BiasedMF,
        {"factors": [2, 5, 10], "reg": [2.0, 5.0, 10.0, 20.0], "reg_bias": [5.0]},
    ),
    "item kNN": (ItemKNN, {"k": [20, 40], "shrinkage": [100.0]}),
}


def fit_frame(train: pd.DataFrame, background: pd.DataFrame | None = None) -> pd.DataFrame:
    """The ratings a baseline may fit on: train + background (``user_id, item_id, rating``)."""
    frames = [train[["user_id", "item_id", "rating"]]]
    if background is not None and len(background):
        frames.append(background[["user_id", "item_id", "rating"]])
    return pd.concat(frames, ignore_index=True)


def validation_split(
    train: pd.DataFrame, fraction: float = 0.2, min_keep: int = 1
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(fit_part, validation)``: the last ``ceil(fraction * n)`` time-ordered training
    interactions of each user go to validation (at least ``min_keep`` stay in fit_part)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    ordered = train.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    rank = ordered.groupby("user_id").cumcount().to_numpy()
    n = ordered.groupby("user_id")["user_id"].transform("size").to_numpy()
    n_val = np.minimum(np.ceil(n * fraction - 1e-9).astype(int), np.maximum(n - min_keep, 0))
    is_val = rank >= n - n_val
    return ordered[~is_val].reset_index(drop=True), ordered[is_val].reset_index(drop=True)


def _settings(grid: dict[str, list]) -> Iterable[dict]:
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        yield dict(zip(keys, values, strict=True))


def tune(
    cls: type,
    grid: dict[str, list],
    fit_on: pd.DataFrame,
    validation: pd.DataFrame,
    extra: dict | None = None,
) -> tuple[dict, float, list[dict]]:
    """Best setting of ``grid`` by validation RMSE: ``(params, val_rmse, all_trials)``."""
    trials: list[dict[str, Any]] = []
    for setting in _settings(grid):
        model = cls(**setting, **(extra or {})).fit(fit_on)
        pred = model.predict(validation["user_id"], validation["item_id"])
        trials.append({"params": setting, "val_rmse": rmse(pred, validation["rating"])})
    best = min(trials, key=lambda t: t["val_rmse"])
    return best["params"], best["val_rmse"], trials
