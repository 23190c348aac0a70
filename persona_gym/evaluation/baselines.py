"""The collaborative-filtering baselines of the simulator evaluation: :func:`run_baselines`.

The models, their grids and their tuning are the user model's
(:mod:`persona_gym.simulator.cf_models`, whose docstring describes them): each baseline is tuned
on the validation slice of the training part, refitted on all of train + background and only
then asked about the test pairs.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from persona_gym.ratings import mae, rmse
from persona_gym.simulator.cf_models import (
    DEFAULT_GRIDS,
    BiasedMF,
    fit_frame,
    tune,
    validation_split,
)

log = logging.getLogger(__name__)

__all__ = ["run_baselines"]


def run_baselines(
    train: pd.DataFrame,
    background: pd.DataFrame | None,
    test: pd.DataFrame,
    seed: int = 0,
    grids: dict | None = None,
    val_fraction: float = 0.2,
    subsets: dict[str, np.ndarray] | None = None,
) -> dict:
    """Tune on the validation slice, refit on train + background, score the test pairs.

    ``test`` needs ``user_id, item_id, rating``. ``subsets`` maps a name to a boolean mask over
    ``test`` rows for extra scores (e.g. the rows the simulator was evaluated on).
    Returns ``{name: {"params", "val_rmse", "rmse", "mae", "n", "predictions", "subsets"}}``
    (``predictions`` aligned with ``test`` rows).
    """
    grids = grids or DEFAULT_GRIDS
    fit_part, validation = validation_split(train, val_fraction)
    tune_on = fit_frame(fit_part, background)
    full = fit_frame(train, background)
    real = test["rating"].to_numpy(np.float64)
    results = {}
    for name, (cls, grid) in grids.items():
        extra = {"seed": seed} if cls is BiasedMF else None
        params, val_rmse, trials = (
            tune(cls, grid, tune_on, validation, extra)
            if len(validation)
            else ({k: v[0] for k, v in grid.items()}, float("nan"), [])
        )
        model = cls(**params, **(extra or {})).fit(full)
        pred = model.predict(test["user_id"], test["item_id"])
        entry = {
            "params": model.params(),
            "val_rmse": val_rmse,
            "trials": trials,
            "n": int(len(test)),
            "rmse": rmse(pred, real),
            "mae": mae(pred, real),
            "predictions": pred,
            "subsets": {},
        }
        for subset, mask in (subsets or {}).items():
            mask = np.asarray(mask, dtype=bool)
            entry["subsets"][subset] = {
                "n": int(mask.sum()),
                "rmse": rmse(pred[mask], real[mask]),
                "mae": mae(pred[mask], real[mask]),
            }
        log.info(
            "baseline %s %s: val RMSE %.4f, test RMSE %.4f MAE %.4f",
            name,
            params,
            val_rmse,
            entry["rmse"],
            entry["mae"],
        )
        results[name] = entry
    return results
