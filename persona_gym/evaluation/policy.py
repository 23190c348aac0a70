"""The metrics and statistics of the policy evaluation (``persona-gym evaluate-policy``,
:mod:`agents.evaluate`): bootstrap intervals, their ranges, diversity, novelty and rank agreement.
Pure numpy/scipy, checked against hand-computed cases; the binary NDCG@k of a policy's top-k
list is :func:`persona_gym.evaluation.metrics.ndcg_hit_at_k` (the one NDCG of the package)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from persona_gym.ratings import MAX_RATING, MIN_RATING

__all__ = [
    "METRIC_BOUNDS",
    "MIN_AGREEMENT_POLICIES",
    "bootstrap_ci",
    "intra_list_diversity",
    "novelty",
    "rank_agreement",
]

#: The range each metric of the policy evaluation can take; its bootstrap interval is clipped
#: to it (a share never above 1, a rating within 1..5). ``return`` has none: its scale is the
#: env's reward settings'.
METRIC_BOUNDS: dict[str, tuple[float, float]] = {
    "mean_rating": (float(MIN_RATING), float(MAX_RATING)),
    "share_ge4": (0.0, 1.0),
    "churn": (0.0, 1.0),
    "coverage": (0.0, 1.0),
    "diversity": (0.0, 1.0),
    "novelty": (0.0, float("inf")),
    "hit_rate": (0.0, 1.0),
    "ndcg": (0.0, 1.0),
    "hit_rating": (float(MIN_RATING), float(MAX_RATING)),
    "replay": (float(MIN_RATING), float(MAX_RATING)),
}

#: The fewest policies whose orderings a rank agreement (Kendall's tau, Spearman's rho) compares:
#: with 2 or 3 the statistic takes a handful of values and its p-value can never be small.
MIN_AGREEMENT_POLICIES = 4


def bootstrap_ci(
    n: int,
    statistic: Callable[[np.ndarray], float],
    seed: int = 0,
    n_boot: int = 1000,
    level: float = 0.95,
    bounds: tuple[float, float] | None = None,
) -> tuple[float, float, float]:
    """``(value, low, high)``: ``statistic`` of all ``n`` units (episodes) and its bootstrap
    interval (units resampled with replacement, seeded).

    The percentile interval is shifted by the bootstrap's bias (``value`` minus the mean of the
    resampled statistics). For a mean the shift is ~0; for a statistic a resample biases, like
    coverage (a resample repeats episodes, so it covers fewer movies), the plain percentile
    interval can miss its own estimate, the shifted one is centred on it. The shift can carry an
    end past what the statistic can take (a share of 1.002): ``bounds`` (``(low, high)``, e.g.
    :data:`METRIC_BOUNDS`) clips the interval to the statistic's range. Resamples on which the
    statistic is NaN (a mean over no rated episode, a hit rating without hits) are left out."""
    if n < 1:
        raise ValueError("bootstrap_ci needs at least one unit")
    everything = np.arange(n)
    value = float(statistic(everything))
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(rng.integers(0, n, n)) for _ in range(n_boot)])
    draws = draws[
        ~np.isnan(draws)
    ]  # resamples where the statistic is undefined (no rated episode, no hit)
    if not len(draws):
        return value, value, value
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [alpha, 1.0 - alpha]) + (value - draws.mean())
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return value, min(float(low), value), max(float(high), value)  # min/max: float rounding only


def intra_list_diversity(genres: Sequence[Sequence[str]]) -> float:
    """Mean pairwise genre distance ``1 - Jaccard`` of a list's items (0 for fewer than 2)."""
    sets = [set(g) for g in genres]
    if len(sets) < 2:
        return 0.0
    distances = []
    for a in range(len(sets)):
        for b in range(a + 1, len(sets)):
            union = sets[a] | sets[b]
            distances.append(1.0 - (len(sets[a] & sets[b]) / len(union) if union else 1.0))
    return float(np.mean(distances))


def novelty(items: Sequence[int], n_ratings: np.ndarray, n_users: int) -> float:
    """Mean self-information ``-log2(p_i)`` of the items, ``p_i`` = share of users who rated
    item ``i`` (at least ``1 / n_users``). Higher = less popular recommendations."""
    if not len(items):
        return 0.0
    share = np.maximum(np.asarray(n_ratings, dtype=np.float64)[list(items)], 1.0) / n_users
    return float(np.mean(-np.log2(np.minimum(share, 1.0))))


def rank_agreement(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Kendall's tau and Spearman's rho between two scorings of the same policies."""
    from scipy.stats import kendalltau, spearmanr

    if len(a) != len(b) or len(a) < 2:
        raise ValueError("rank_agreement needs two equally long lists of at least 2 scores")
    tau = kendalltau(a, b)
    rho = spearmanr(a, b)
    return {
        "kendall_tau": float(tau.statistic),
        "kendall_p": float(tau.pvalue),
        "spearman_rho": float(rho.statistic),
        "n_policies": len(a),
    }
