"""A leave model fitted on MovieLens sessions: when do real users stop rating?

A user's ratings, in time order, are cut into **sessions** wherever two consecutive ratings are
more than ``gap`` seconds apart (default :data:`DEFAULT_GAP_SECONDS`, one hour); the last rating
of a session is a **leave**. :func:`fit_leave_model` fits a seeded logistic regression of
P(leave after this rating) on what an episode of the environment shows (:data:`FEATURES`):

* ``rating``: the rating just given;
* ``mean_last3``: the mean of the session's last 3 ratings (this one included);
* ``log_position``: ``log1p`` of the number of ratings given in the session so far;
* ``rating_minus_user_mean``: the rating minus the user's mean rating (in the data the model
  is fitted on; in the environment, the mean of the user's logged history).

The end of a user's table also ends a session, so a table cut at an arbitrary time (the
protocol split's train part) counts its last rating as a leave; that is 1 row per user.

:func:`calibration` compares predicted and observed session-end rates per probability bin on
held-out sessions. The environment's ``leave_rule="model"`` (``EnvConfig``) uses the model
shipped in :data:`SHIPPED_LEAVE_MODEL`, fitted by ``benchmarks/leave_model.py``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from persona_gym.io import atomic_write_json

__all__ = [
    "DEFAULT_GAP_SECONDS",
    "FEATURES",
    "SHIPPED_LEAVE_MODEL",
    "LeaveModel",
    "calibration",
    "episode_features",
    "fit_leave_model",
    "load_leave_model",
    "session_features",
    "sessions",
]

logger = logging.getLogger(__name__)

DEFAULT_GAP_SECONDS = 3600
FEATURES = ("rating", "mean_last3", "log_position", "rating_minus_user_mean")
SHIPPED_LEAVE_MODEL = Path(__file__).parent / "default_artifacts" / "leave_model.json"
_FORMAT = "persona-gym-leave-model/1"


def sessions(ratings: pd.DataFrame, gap: float = DEFAULT_GAP_SECONDS) -> pd.DataFrame:
    """The ratings in ``(user_id, timestamp, item_id)`` order with their session columns.

    Adds ``session`` (a running id, unique across users), ``position`` (0-based index in the
    session) and ``leave`` (true for the session's last rating). A new session starts at a
    user's first rating and wherever the gap to the previous rating exceeds ``gap`` seconds.
    """
    if gap <= 0:
        raise ValueError(f"session gap must be > 0 seconds, got {gap}")
    df = ratings.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    df = df.reset_index(drop=True)
    user = df["user_id"].to_numpy()
    ts = df["timestamp"].to_numpy(dtype=np.int64)
    new_user = np.r_[True, user[1:] != user[:-1]]
    starts = new_user | np.r_[True, np.diff(ts) > gap]
    session = np.cumsum(starts) - 1
    df["session"] = session
    df["position"] = df.groupby("session").cumcount()
    df["leave"] = np.r_[session[1:] != session[:-1], True]
    return df


def session_features(ratings: pd.DataFrame, gap: float = DEFAULT_GAP_SECONDS) -> pd.DataFrame:
    """:func:`sessions` plus one column per feature of :data:`FEATURES`."""
    df = sessions(ratings, gap)
    r = df["rating"].astype(np.float64)
    df["rating"] = r
    df["mean_last3"] = r.groupby(df["session"]).transform(
        lambda s: s.rolling(3, min_periods=1).mean()
    )
    df["log_position"] = np.log1p(df["position"].to_numpy() + 1.0)
    df["rating_minus_user_mean"] = r - r.groupby(df["user_id"]).transform("mean")
    return df


def episode_features(episode_ratings: Sequence[float], user_mean: float) -> np.ndarray:
    """The :data:`FEATURES` after the last of ``episode_ratings`` (the episode is one session;
    ``user_mean`` is the mean of the user's logged ratings)."""
    if not episode_ratings:
        raise ValueError("episode_features needs at least one rating")
    rating = float(episode_ratings[-1])
    last3 = float(np.mean(episode_ratings[-3:]))
    return np.array([rating, last3, math.log1p(len(episode_ratings)), rating - user_mean])


@dataclass(frozen=True)
class LeaveModel:
    """A logistic model of P(leave after this rating).

    Attributes:
        coefficients: one weight per feature, in ``features`` order.
        intercept: the logit's constant.
        features: the feature names (:data:`FEATURES` for a fitted model).
        gap: the session gap in seconds the model was fitted with.
        metadata: what it was fitted on (counts, data name), free-form JSON.
    """

    coefficients: tuple[float, ...]
    intercept: float
    features: tuple[str, ...] = FEATURES
    gap: float = DEFAULT_GAP_SECONDS
    metadata: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        values = (*self.coefficients, self.intercept, self.gap)
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            raise ValueError(
                f"LeaveModel: coefficients, intercept and gap must be finite numbers, "
                f"got {self.coefficients}, {self.intercept}, {self.gap}"
            )
        if len(self.coefficients) != len(self.features):
            raise ValueError(
                f"LeaveModel: {len(self.coefficients)} coefficients for "
                f"{len(self.features)} features {self.features}"
            )
        if tuple(self.features) != FEATURES:
            raise ValueError(f"LeaveModel: features must be {FEATURES}, got {self.features}")
        if self.gap <= 0:
            raise ValueError(f"LeaveModel.gap must be > 0, got {self.gap}")

    def probability(self, features: np.ndarray) -> np.ndarray | float:
        """P(leave) of one feature vector ``(n_features,)`` (a float) or of rows ``(n, f)``."""
        x = np.asarray(features, dtype=np.float64)
        logit = x @ np.asarray(self.coefficients) + self.intercept
        p = 1.0 / (1.0 + np.exp(-logit))
        return float(p) if x.ndim == 1 else p

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (what :meth:`save` writes)."""
        return {
            "format": _FORMAT,
            "features": list(self.features),
            "coefficients": [float(c) for c in self.coefficients],
            "intercept": float(self.intercept),
            "gap_seconds": float(self.gap),
            "metadata": self.metadata or {},
        }

    def save(self, path: str | Path) -> Path:
        """Write the model as JSON, atomically."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LeaveModel:
        """Read a model :meth:`save` wrote; ``ValueError`` naming the file when it is invalid."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != _FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {_FORMAT!r}")
            return cls(
                tuple(float(c) for c in data["coefficients"]),
                float(data["intercept"]),
                tuple(data["features"]),
                float(data["gap_seconds"]),
                dict(data.get("metadata") or {}),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{path}: not a valid leave model ({error}); refit it with "
                "`python benchmarks/leave_model.py`"
            ) from error


def load_leave_model(path: str | Path | None = None) -> LeaveModel:
    """The model at ``path``, or the shipped one (:data:`SHIPPED_LEAVE_MODEL`) for ``None``."""
    return LeaveModel.load(SHIPPED_LEAVE_MODEL if path is None else path)


def fit_leave_model(
    ratings: pd.DataFrame,
    gap: float = DEFAULT_GAP_SECONDS,
    C: float = 1.0,
    seed: int = 0,
    metadata: dict[str, Any] | None = None,
) -> LeaveModel:
    """Fit the logistic leave model on ``ratings`` (training data only: the caller's job).

    ``C`` is scikit-learn's inverse L2 strength; ``seed`` its ``random_state``.
    """
    from sklearn.linear_model import LogisticRegression

    df = session_features(ratings, gap)
    y = df["leave"].to_numpy()
    if y.all() or not y.any():
        raise ValueError(
            "fit_leave_model needs both session ends and continuations; "
            f"got {int(y.sum())} leaves in {len(y)} ratings"
        )
    clf = LogisticRegression(C=C, random_state=seed, max_iter=1000)
    clf.fit(df[list(FEATURES)].to_numpy(), y)
    meta = {
        "n_ratings": len(df),
        "n_sessions": int(df["session"].nunique()),
        "n_users": int(df["user_id"].nunique()),
        "leave_rate": float(y.mean()),
        **(metadata or {}),
    }
    model = LeaveModel(
        tuple(float(c) for c in clf.coef_[0]), float(clf.intercept_[0]), FEATURES, float(gap), meta
    )
    logger.info(
        "leave model on %d ratings (%d sessions): coefficients %s, intercept %.3f",
        meta["n_ratings"],
        meta["n_sessions"],
        model.coefficients,
        model.intercept,
    )
    return model


def calibration(
    model: LeaveModel, held_out: pd.DataFrame, n_bins: int = 10, strategy: str = "quantile"
) -> dict[str, Any]:
    """Predicted vs observed session-end rate on held-out ratings, per probability bin.

    Sessions are cut with the model's own gap. Bins are ``"quantile"`` (equal counts: leave
    probabilities are small, so equal-width bins would put nearly everything in the first) or
    ``"uniform"`` (equal width on [0, 1]); empty bins are left out. Returns ``{"bins": [{"lo", "hi", "mean_predicted", "observed", "count"}...],
    "brier", "base_rate_brier", "n", "leave_rate", "mean_predicted"}``; ``base_rate_brier`` is
    the Brier score of always predicting the held-out leave rate (a reference).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    df = session_features(held_out, model.gap)
    p = np.asarray(model.probability(df[list(FEATURES)].to_numpy()))
    y = df["leave"].to_numpy(dtype=np.float64)
    if strategy == "quantile":
        edges = np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1))
    elif strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    else:
        raise ValueError(f"strategy must be 'quantile' or 'uniform', got {strategy!r}")
    which = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        sel = which == b
        if sel.any():
            bins.append(
                {
                    "lo": float(edges[b]),
                    "hi": float(edges[b + 1]),
                    "mean_predicted": float(p[sel].mean()),
                    "observed": float(y[sel].mean()),
                    "count": int(sel.sum()),
                }
            )
    rate = float(y.mean())
    return {
        "bins": bins,
        "strategy": strategy,
        "brier": float(np.mean((p - y) ** 2)),
        "base_rate_brier": float(np.mean((rate - y) ** 2)),
        "n": len(y),
        "leave_rate": rate,
        "mean_predicted": float(p.mean()),
    }
