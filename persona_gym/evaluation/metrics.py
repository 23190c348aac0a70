"""Fidelity metrics of simulated ratings against real ones (pure numpy, hand-checkable).

Conventions (shared by the simulator evaluation, the CF baselines and offline policy evaluation):

* Ratings are on the 1..5 scale. A prediction may be NaN: an *unrelated* response of the
  paper's generation mode (no digit 1-5 in the text).
* :func:`rmse` and :func:`mae` are computed over the finite predictions only (they are defined
  with the rating scale, :mod:`persona_gym.ratings`, since the user model's collaborative tuning
  scores with them too); :func:`urr` (unrelated response rate) is the share of NaN predictions.
  So a model that answers rarely but well scores a low RMSE and a high URR: always read the
  three together (the paper's way).
* Rating distributions are ``(n, 5)`` arrays of P(rating = 1..5), rows summing to 1.
* :func:`expected_calibration_error` is the **top-label** ECE: each prediction is binned by its
  confidence ``max_r p(r)`` into ``n_bins`` equal-width bins on [0, 1]; per bin, the gap
  between the mean confidence and the accuracy (share of rows whose argmax equals the real
  rating); ECE = sum over bins of (bin share of rows) × |gap|. :func:`reliability` returns the
  per-bin figures (the reliability diagram).
* :func:`nll` is the mean of ``-log p(real rating)`` (probabilities floored at ``1e-12``).
* One NDCG, :func:`ndcg`: of one ranked list, DCG@k = sum gain_i / log2(i + 1) over ranks
  i = 1..k, divided by the ideal DCG@k (every gain
  that could be ranked, sorted descending, cut at k); 0 when the ideal DCG is 0. Its two uses
  differ only in the gains:

  - :func:`ndcg_at_k` (simulator fidelity, *graded*): per user, the user's test items are
    ordered by predicted rating (descending; ties keep the input order, which is time order in
    the evaluator — no tie-breaking by the real rating), gains are ``2**r - 1`` of the real
    rating ``r``, the ideal orders them by real rating. The mean over users is returned. Every
    test item is "relevant" (gain >= 1), so even a random order scores well above 0: compare
    against :func:`ndcg_random` (the mean over seeded random orders), not against 0.
  - :func:`ndcg_hit_at_k` (policy evaluation on logged data, *binary*): a policy's top-k list
    over the catalogue, gain 1 for a relevant (held-out test) item and 0 otherwise; the ideal
    ranks ``min(k, |relevant|)`` relevant items first.
* :func:`user_mean_correlation`: Pearson correlation, over users, of the mean predicted rating
  and the mean real rating of each user's test items (does the simulator know who rates high?).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from persona_gym.ratings import RATING_VALUES, mae, paired, rmse

__all__ = [
    "RATING_VALUES",
    "expected_calibration_error",
    "fidelity_report",
    "histogram_distance",
    "mae",
    "mean_distribution",
    "ndcg",
    "ndcg_at_k",
    "ndcg_hit_at_k",
    "ndcg_random",
    "nll",
    "per_group",
    "rating_histogram",
    "reliability",
    "reward_landscape",
    "rmse",
    "slope",
    "urr",
    "user_mean_correlation",
    "within_user",
]


def urr(pred) -> float:
    """Unrelated response rate: share of NaN predictions (0 for an empty input)."""
    pred = np.asarray(pred, dtype=np.float64).ravel()
    return float(np.isnan(pred).mean()) if len(pred) else 0.0


def rating_histogram(ratings) -> np.ndarray:
    """Shares of the ratings 1..5 (values rounded half up and clipped to 1..5; NaN ignored)."""
    values = np.asarray(ratings, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if not len(values):
        return np.zeros(5)
    rounded = np.clip(np.floor(values + 0.5), 1, 5).astype(int)
    return np.bincount(rounded - 1, minlength=5)[:5] / len(values)


def mean_distribution(probs) -> np.ndarray:
    """The marginal predicted rating distribution: the mean of the rows of ``probs``."""
    probs = _probs(probs)
    return probs.mean(0) if len(probs) else np.zeros(5)


def _probs(probs) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != 5:
        raise ValueError(f"rating distributions must have shape (n, 5), got {probs.shape}")
    return probs


def _labels(real, n: int) -> np.ndarray:
    real = np.asarray(real, dtype=np.float64).ravel()
    if len(real) != n:
        raise ValueError(f"{n} distributions but {len(real)} real ratings")
    labels = np.floor(real + 0.5).astype(int) - 1
    if ((labels < 0) | (labels > 4)).any():
        raise ValueError("real ratings must lie in 1..5")
    return labels


def nll(probs, real, floor: float = 1e-12) -> float:
    """Mean negative log-likelihood of the real ratings under the predicted distributions."""
    probs = _probs(probs)
    labels = _labels(real, len(probs))
    if not len(probs):
        return float("nan")
    return float(-np.mean(np.log(np.maximum(probs[np.arange(len(probs)), labels], floor))))


def reliability(probs, real, n_bins: int = 10) -> dict:
    """Top-label reliability diagram: per equal-width confidence bin, its edges, row count,
    mean confidence and accuracy (NaN for empty bins)."""
    probs = _probs(probs)
    labels = _labels(real, len(probs))
    confidence = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin i holds (edges[i], edges[i+1]]; confidence 0 (impossible for a distribution) -> bin 0
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(which, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(counts > 0, conf_sum / np.maximum(counts, 1), np.nan)
        accuracy = np.where(counts > 0, acc_sum / np.maximum(counts, 1), np.nan)
    return {"edges": edges, "count": counts, "confidence": mean_conf, "accuracy": accuracy}


def expected_calibration_error(probs, real, n_bins: int = 10) -> float:
    """Top-label ECE (see the module docstring); NaN for an empty input."""
    table = reliability(probs, real, n_bins)
    total = table["count"].sum()
    if not total:
        return float("nan")
    used = table["count"] > 0
    gaps = np.abs(table["confidence"][used] - table["accuracy"][used])
    return float(np.sum(table["count"][used] / total * gaps))


def _groups(keys) -> dict:
    keys = np.asarray(keys)
    order = np.argsort(keys, kind="stable")
    uniq, starts = np.unique(keys[order], return_index=True)
    return {
        k: order[s:e] for k, s, e in zip(uniq, starts, list(starts[1:]) + [len(keys)], strict=True)
    }


def ndcg(ranked_gains, gains, k: int = 10) -> float:
    """NDCG@k of one ranked list (module docstring): DCG@k of ``ranked_gains`` (the gains in
    ranked order) over the ideal DCG@k (``gains``, every gain that could be ranked, sorted
    descending); 0.0 when the ideal DCG is 0."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ranked = np.asarray(ranked_gains, dtype=np.float64)[:k]
    ideal = np.sort(np.asarray(gains, dtype=np.float64))[::-1][:k]
    idcg = float(ideal @ discounts[: len(ideal)])
    return float(ranked @ discounts[: len(ranked)]) / idcg if idcg > 0 else 0.0


def ndcg_at_k(user_ids, pred, real, k: int = 10) -> float:
    """Mean over users of NDCG@k of their items ordered by predicted rating (module docstring).

    NaN predictions rank last. Returns NaN when there are no users.
    """
    pred, real = paired(pred, real)
    user_ids = np.asarray(user_ids).ravel()
    if len(user_ids) != len(pred):
        raise ValueError("user_ids and predictions differ in length")
    scores = []
    for rows in _groups(user_ids).values():
        p = np.where(np.isfinite(pred[rows]), pred[rows], -np.inf)
        gains = 2.0 ** real[rows] - 1.0
        scores.append(ndcg(gains[np.argsort(-p, kind="stable")], gains, k))
    return float(np.mean(scores)) if scores else float("nan")


def ndcg_hit_at_k(ranked: Sequence[int], relevant: Iterable[int], k: int = 10) -> tuple[float, int]:
    """``(NDCG@k, hits)`` of a ranked list of items against a set of relevant items: the
    binary-gain :func:`ndcg` (gain 1 for a relevant item, 0 otherwise; the ideal ranks
    ``min(k, |relevant|)`` relevant items first). No relevant items: ``(0.0, 0)``."""
    relevant = set(int(i) for i in relevant)
    hits = np.array([int(i) in relevant for i in ranked[:k]], dtype=np.float64)
    return ndcg(hits, np.ones(len(relevant)), k), int(hits.sum())


def ndcg_random(user_ids, real, k: int = 10, n_draws: int = 20, seed: int = 0) -> float:
    """Mean NDCG@k of random orders (``n_draws`` seeded draws): the floor to compare against."""
    real = np.asarray(real, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    return float(
        np.mean([ndcg_at_k(user_ids, rng.random(len(real)), real, k) for _ in range(n_draws)])
    )


def user_mean_correlation(user_ids, pred, real) -> float:
    """Pearson correlation over users of mean predicted vs mean real rating (finite preds only).

    NaN when fewer than two users, or when either side has no variance.
    """
    pred, real = paired(pred, real)
    user_ids = np.asarray(user_ids).ravel()
    means_p, means_r = [], []
    for rows in _groups(user_ids).values():
        ok = rows[np.isfinite(pred[rows])]
        if len(ok):
            means_p.append(pred[ok].mean())
            means_r.append(real[ok].mean())
    if len(means_p) < 2:
        return float("nan")
    a, b = np.asarray(means_p), np.asarray(means_r)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / denom) if denom > 0 else float("nan")


def per_group(groups, pred, real) -> dict:
    """``{group: {"n", "rmse", "mae", "urr"}}`` for each value of ``groups`` (e.g. persona)."""
    pred, real = paired(pred, real)
    out = {}
    for key, rows in _groups(np.asarray(groups).ravel()).items():
        key = key.item() if hasattr(key, "item") else key
        out[key] = {
            "n": int(len(rows)),
            "rmse": rmse(pred[rows], real[rows]),
            "mae": mae(pred[rows], real[rows]),
            "urr": urr(pred[rows]),
        }
    return out


def fidelity_report(
    user_ids: Sequence[int],
    real,
    pred=None,
    probs=None,
    groups: Sequence | np.ndarray | None = None,
    k: int = 10,
    n_bins: int = 10,
) -> dict:
    """All point and distributional figures of one set of predictions.

    Give ``probs`` (``(n, 5)``; the point prediction is then the expected rating unless
    ``pred`` is given too) and/or ``pred`` (point ratings, NaN = unrelated). ``groups`` (e.g.
    each row's persona) adds per-group errors and histograms.
    """
    real = np.asarray(real, dtype=np.float64).ravel()
    if probs is not None:
        probs = _probs(probs)
    if pred is None:
        if probs is None:
            raise ValueError("give pred or probs")
        pred = probs @ RATING_VALUES
    pred = np.asarray(pred, dtype=np.float64).ravel()
    report = {
        "n": int(len(real)),
        "rmse": rmse(pred, real),
        "mae": mae(pred, real),
        "urr": urr(pred),
        "user_mean_pearson": user_mean_correlation(user_ids, pred, real),
        f"ndcg@{k}": ndcg_at_k(user_ids, pred, real, k),
        "within_user": within_user(user_ids, pred, real),
        "histogram_real": rating_histogram(real).tolist(),
        "histogram_pred_rounded": rating_histogram(pred).tolist(),
    }
    if probs is not None:
        mode = probs.argmax(1) + 1.0
        report.update(
            {
                "rmse_argmax": rmse(mode, real),
                "mae_argmax": mae(mode, real),
                "nll": nll(probs, real),
                "ece": expected_calibration_error(probs, real, n_bins),
                "histogram_distance": histogram_distance(probs, real),
                "histogram_pred_mean_distribution": mean_distribution(probs).tolist(),
                "reliability": {
                    key: np.asarray(v).tolist()
                    for key, v in reliability(probs, real, n_bins).items()
                },
            }
        )
    if groups is not None:
        group_of = np.asarray(groups).ravel()
        report["per_group"] = per_group(group_of, pred, real)
        for key, rows in _groups(group_of).items():
            key = key.item() if hasattr(key, "item") else key
            entry = report["per_group"][key]
            entry["histogram_real"] = rating_histogram(real[rows]).tolist()
            entry["histogram_pred_rounded"] = rating_histogram(pred[rows]).tolist()
            if probs is not None:
                entry["histogram_pred_mean_distribution"] = mean_distribution(probs[rows]).tolist()
    return report


# -- within-user fidelity -------------------------------------------------------------------------
def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / denom) if denom > 0 else float("nan")


def within_user(user_ids, pred, real, min_items: int = 3) -> dict:
    """Does the prediction tell a user's movies apart? Per user with ``min_items`` or more
    finite predictions: Pearson and Spearman correlation of predicted vs real ratings (users
    where either side is constant are left out of the correlations) and the standard deviation
    of the predictions and of the real ratings; each averaged over users."""
    from scipy.stats import rankdata

    pred, real = paired(pred, real)
    pearson, spearman, std_pred, std_real = [], [], [], []
    for rows in _groups(np.asarray(user_ids).ravel()).values():
        rows = rows[np.isfinite(pred[rows])]
        if len(rows) < min_items:
            continue
        p, r = pred[rows], real[rows]
        std_pred.append(p.std())
        std_real.append(r.std())
        if p.std() > 0 and r.std() > 0:
            pearson.append(_correlation(p, r))
            spearman.append(_correlation(rankdata(p), rankdata(r)))
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return {
        "users": len(std_pred),
        "pearson": mean(pearson),
        "spearman": mean(spearman),
        "std_pred": mean(std_pred),
        "std_real": mean(std_real),
    }


def histogram_distance(probs, real) -> float:
    """Total-variation distance between the histogram of ratings sampled from ``probs`` (in
    expectation: the mean distribution) and the real ratings' histogram (0 = identical, 1 =
    disjoint)."""
    return float(0.5 * np.abs(mean_distribution(probs) - rating_histogram(real)).sum())


def slope(x, y) -> float:
    """Least-squares slope of ``y`` on ``x`` (with an intercept); NaN when ``x`` is constant."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok] - x[ok].mean(), y[ok] - y[ok].mean()
    return float(x @ y / (x @ x)) if len(x) > 1 and x @ x > 0 else float("nan")


def reward_landscape(user_ids, pred, top: int = 10) -> dict:
    """What a policy can gain by choosing: per user, the spread of predicted ratings over a
    random sample of movies they never rated. ``within_user_std`` and ``top_minus_mean`` (mean
    of the ``top`` best minus the mean) are averaged over users; ``between_user_share`` is the
    share of the total variance that lies between the users' means."""
    pred = np.asarray(pred, dtype=np.float64).ravel()
    groups = list(_groups(np.asarray(user_ids).ravel()).values())
    means = np.array([pred[rows].mean() for rows in groups])
    within = np.array([pred[rows].var() for rows in groups])
    total = float(pred.var())
    return {
        "users": len(groups),
        "items_per_user": float(np.mean([len(r) for r in groups])),
        "within_user_std": float(np.mean(np.sqrt(within))),
        "top_minus_mean": float(
            np.mean([np.sort(pred[rows])[-top:].mean() - pred[rows].mean() for rows in groups])
        ),
        "between_user_share": float(means.var() / total) if total > 0 else float("nan"),
    }
