"""Sequential fidelity: do a simulator's ratings depend on the last ones as real users' do?

Residual ``e = r - b(u, i)``, where ``b`` is a user+item bias prediction made **out of fold**
(:func:`reference_predictions`: the ratings are split into folds at random; each fold is
predicted by a bias model fitted on the other folds, so no rating predicts itself). Per rating
in each user's time order, ``e`` is regressed jointly on

* *mood*: the mean residual of the user's previous ``k`` real ratings;
* *similarity*: the mean similarity of the item with the previous ``k`` items (genre Jaccard,
  or the cosine of the items' text embeddings),

with user fixed effects (everything centred within user), and 95% intervals from a bootstrap
over users (:func:`sequential_slopes`). A simulator's row uses its expected rating in place of
``r``, predicted with the real previous ``k`` interactions in its window (the rolling window).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = [
    "paired_rmse_difference",
    "reference_predictions",
    "sequence_features",
    "sequential_slopes",
    "within_user_pearson",
]


def reference_predictions(
    ratings: pd.DataFrame, folds: int = 5, reg: float = 5.0, n_iter: int = 10, seed: int = 0
) -> np.ndarray:
    """Out-of-fold ``mu + b_u + b_i`` of every row of ``ratings`` (``user_id, item_id, rating``):
    rows split into ``folds`` random folds, each predicted by ridge biases fitted on the rest."""
    users = pd.factorize(ratings["user_id"])[0]
    items = pd.factorize(ratings["item_id"])[0]
    r = ratings["rating"].to_numpy(dtype=np.float64)
    fold = np.random.default_rng(seed).integers(folds, size=len(r))
    out = np.empty(len(r))
    n_u, n_i = users.max() + 1, items.max() + 1
    for f in range(folds):
        fit = fold != f
        u, i, y = users[fit], items[fit], r[fit]
        mu = float(y.mean())
        bu, bi = np.zeros(n_u), np.zeros(n_i)
        cu, ci = np.bincount(u, minlength=n_u), np.bincount(i, minlength=n_i)
        for _ in range(n_iter):
            bi = np.bincount(i, weights=y - mu - bu[u], minlength=n_i) / (ci + reg)
            bu = np.bincount(u, weights=y - mu - bi[i], minlength=n_u) / (cu + reg)
        held = ~fit
        out[held] = mu + bu[users[held]] + bi[items[held]]
    return out


def sequence_features(
    frame: pd.DataFrame,
    residuals: np.ndarray,
    genres: Sequence[Sequence[str]],
    embeddings: np.ndarray,
    k: int = 3,
) -> pd.DataFrame:
    """Mood and similarity of every row of a time-ordered ``frame`` (``user_id, item_index``,
    sorted by user then time): NaN where the user has fewer than ``k`` earlier rows."""
    genre_sets = [frozenset(g) for g in genres]
    emb = np.asarray(embeddings, dtype=np.float64)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    users = frame["user_id"].to_numpy()
    items = frame["item_index"].to_numpy()
    mood = np.full(len(frame), np.nan)
    jaccard = np.full(len(frame), np.nan)
    cosine = np.full(len(frame), np.nan)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(frame)]
    for start, end in zip(starts, ends, strict=True):
        for row in range(start + k, end):
            previous = items[row - k : row]
            mood[row] = residuals[row - k : row].mean()
            item = genre_sets[items[row]]
            jaccard[row] = np.mean(
                [len(item & genre_sets[p]) / max(len(item | genre_sets[p]), 1) for p in previous]
            )
            cosine[row] = float((emb[previous] @ emb[items[row]]).mean())
    return pd.DataFrame({"mood": mood, "genre": jaccard, "text": cosine}, index=frame.index)


def _user_statistics(
    e: np.ndarray, mood: np.ndarray, similarity: np.ndarray, users: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-user sums ``(X'X, X'y)`` of the fixed-effects regression of ``e`` on mood and
    similarity (each user's rows centred on their means; rows with a NaN left out): a bootstrap
    replicate over users is a weighted sum of them."""
    keep = np.isfinite(e) & np.isfinite(mood) & np.isfinite(similarity)
    frame = pd.DataFrame({"u": users[keep], "e": e[keep], "m": mood[keep], "s": similarity[keep]})
    centred = frame[["e", "m", "s"]] - frame.groupby("u")[["e", "m", "s"]].transform("mean")
    x = centred[["m", "s"]].to_numpy()
    y = centred["e"].to_numpy()
    codes, _ = pd.factorize(frame["u"])
    n_users = codes.max() + 1
    xtx = np.zeros((n_users, 2, 2))
    xty = np.zeros((n_users, 2))
    np.add.at(xtx, codes, x[:, :, None] * x[:, None, :])
    np.add.at(xty, codes, x * y[:, None])
    return xtx, xty


def _bootstrap(xtx: np.ndarray, xty: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, 2)`` slopes of users drawn with replacement (the draws depend on the seed and
    the number of users only, so two calls on the same users draw the same replicates)."""
    rng = np.random.default_rng(seed)
    n_users = len(xtx)
    draws = np.empty((n_boot, 2))
    for b in range(n_boot):
        weight = np.bincount(rng.integers(n_users, size=n_users), minlength=n_users)
        draws[b] = _solve(np.tensordot(weight, xtx, axes=1), np.tensordot(weight, xty, axes=1))
    return draws


EFFECTS = ("mood", "similarity")


def sequential_slopes(
    e: np.ndarray,
    mood: np.ndarray,
    similarity: np.ndarray,
    users: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Joint least-squares slopes of ``e`` on mood and similarity with user fixed effects, and
    their 95% bootstrap intervals over users: ``{"mood": {"slope", "low", "high"},
    "similarity": {...}}``. Rows with a NaN are left out."""
    xtx, xty = _user_statistics(e, mood, similarity, users)
    full = _solve(xtx.sum(0), xty.sum(0))
    low, high = np.percentile(_bootstrap(xtx, xty, n_boot, seed), [2.5, 97.5], axis=0)
    return {
        name: {"slope": float(full[j]), "low": float(low[j]), "high": float(high[j])}
        for j, name in enumerate(EFFECTS)
    }


def slope_ratios(
    e: np.ndarray,
    e_real: np.ndarray,
    mood: np.ndarray,
    similarity: np.ndarray,
    users: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """The slopes of ``e`` over those of ``e_real`` on the same rows (:func:`sequential_slopes`),
    with 95% intervals from the same bootstrap draws of users for both:
    ``{"mood": {"ratio", "low", "high"}, "similarity": {...}}``."""
    keep = np.isfinite(e) & np.isfinite(e_real)
    fits = [
        _user_statistics(values[keep], mood[keep], similarity[keep], users[keep])
        for values in (e, e_real)
    ]
    full = [_solve(xtx.sum(0), xty.sum(0)) for xtx, xty in fits]
    draws = [_bootstrap(xtx, xty, n_boot, seed) for xtx, xty in fits]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = draws[0] / draws[1]
    low, high = np.nanpercentile(ratios, [2.5, 97.5], axis=0)
    return {
        name: {
            "ratio": float(full[0][j] / full[1][j]) if full[1][j] else float("nan"),
            "low": float(low[j]),
            "high": float(high[j]),
        }
        for j, name in enumerate(EFFECTS)
    }


def _solve(xtx: np.ndarray, xty: np.ndarray) -> np.ndarray:
    """Least squares from the normal equations (minimum norm where a feature never varies)."""
    return np.linalg.lstsq(xtx, xty, rcond=None)[0]


def paired_rmse_difference(
    a: np.ndarray,
    b: np.ndarray,
    real: np.ndarray,
    users: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """RMSE of predictions ``a`` minus that of ``b`` on the same rows, with a 95% bootstrap
    interval over users: ``{"mean", "low", "high"}`` (negative: ``a`` is closer)."""
    codes, _ = pd.factorize(users)
    n_users = codes.max() + 1
    sse_a = np.bincount(codes, weights=(a - real) ** 2, minlength=n_users)
    sse_b = np.bincount(codes, weights=(b - real) ** 2, minlength=n_users)
    count = np.bincount(codes, minlength=n_users)
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for k in range(n_boot):
        w = np.bincount(rng.integers(n_users, size=n_users), minlength=n_users)
        n = w @ count
        draws[k] = np.sqrt(w @ sse_a / n) - np.sqrt(w @ sse_b / n)
    mean = float(np.sqrt(sse_a.sum() / count.sum()) - np.sqrt(sse_b.sum() / count.sum()))
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"mean": mean, "low": float(low), "high": float(high)}


def within_user_pearson(pred: np.ndarray, real: np.ndarray, users: np.ndarray) -> float:
    """Mean over users of the Pearson correlation of predictions and ratings (users whose
    predictions or ratings are constant are left out)."""
    values = []
    frame = pd.DataFrame({"u": users, "p": pred, "r": real})
    for _, rows in frame.groupby("u"):
        if rows["p"].std() > 0 and rows["r"].std() > 0:
            values.append(float(np.corrcoef(rows["p"], rows["r"])[0, 1]))
    return float(np.mean(values)) if values else float("nan")
