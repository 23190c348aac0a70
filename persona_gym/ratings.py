"""The rating scale: whole stars 1..5, what is derived from a distribution over them, and the
error of predicted ratings.

A rater answers with ``(n, 5)`` probabilities, column ``j`` for the rating ``j + 1``. Every
module that turns such a distribution into a number, or a rating into an observation, goes
through here. :func:`rmse` and :func:`mae` (over the finite predictions: a NaN prediction is an
unrelated answer, counted by ``persona_gym.evaluation.metrics.urr``) score predicted ratings
for the evaluation and for the user model's own tuning (the collaborative models).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "MAX_RATING",
    "MIN_RATING",
    "N_LEVELS",
    "RATING_TOKENS",
    "RATING_VALUES",
    "clip",
    "expected",
    "mae",
    "paired",
    "rmse",
    "sample",
    "to_unit",
]

MIN_RATING = 1
MAX_RATING = 5
N_LEVELS = MAX_RATING - MIN_RATING + 1
RATING_VALUES = np.arange(MIN_RATING, MAX_RATING + 1, dtype=np.float64)  # (5,) 1.0 .. 5.0
RATING_TOKENS = tuple(str(r) for r in range(MIN_RATING, MAX_RATING + 1))  # what the SLM answers


def expected(probs: np.ndarray) -> np.ndarray:
    """Expected rating of each distribution: ``(n, 5) -> (n,)``."""
    return np.asarray(probs) @ RATING_VALUES


def sample(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One rating drawn from each distribution, one uniform of ``rng`` per row (same rng state,
    same draws); rows need not be normalised."""
    probs = np.asarray(probs)
    cdf = probs.cumsum(-1)
    u = rng.random(len(probs)) * cdf[:, -1]
    return (u[:, None] >= cdf).sum(-1).clip(0, N_LEVELS - 1) + float(MIN_RATING)


def clip(values: np.ndarray | float) -> np.ndarray:
    """Ratings clipped into the scale."""
    return np.clip(values, float(MIN_RATING), float(MAX_RATING))


def to_unit(rating: float) -> float:
    """A rating mapped linearly onto [0, 1] (1 -> 0, 5 -> 1), as observations show it."""
    return (float(rating) - MIN_RATING) / (MAX_RATING - MIN_RATING)


def paired(pred, real) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and real ratings as float64 vectors of one length; ``ValueError`` if their
    lengths differ or a real rating is NaN (a prediction may be NaN)."""
    pred = np.asarray(pred, dtype=np.float64).ravel()
    real = np.asarray(real, dtype=np.float64).ravel()
    if pred.shape != real.shape:
        raise ValueError(f"predictions {pred.shape} and real ratings {real.shape} differ in length")
    if np.isnan(real).any():
        raise ValueError("real ratings contain NaN")
    return pred, real


def rmse(pred, real) -> float:
    """Root mean squared error over finite predictions (NaN if there are none)."""
    pred, real = paired(pred, real)
    ok = np.isfinite(pred)
    return float(np.sqrt(np.mean((pred[ok] - real[ok]) ** 2))) if ok.any() else float("nan")


def mae(pred, real) -> float:
    """Mean absolute error over finite predictions (NaN if there are none)."""
    pred, real = paired(pred, real)
    ok = np.isfinite(pred)
    return float(np.mean(np.abs(pred[ok] - real[ok]))) if ok.any() else float("nan")
