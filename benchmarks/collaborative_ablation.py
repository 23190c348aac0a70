"""The collaborative signal's options side by side, chosen on the validation slice (no SLM).

Each option is fitted on the protocol split's train part minus its validation slice (the last
20% of each selected user's training interactions) plus the background users, and scored on
that slice; the chosen option (the simulator's: the MF + item-kNN blend, its weight picked on
the slice) is then refitted on all of train + background and scored on the test split, beside
the others, for the record only. The gain rows scale the blend's movie-to-movie part around the
user's level (``mu + b_u``) and pass it through a rating prior fitted on the slice: its
likelihood chooses the gain, next to its expected rating's RMSE and within-user spread. The prior
rows pass the prediction through the simulator's
rating prior (fitted on the out-of-fold predictions of the training interactions, with and
without the window surprise) and score its expected rating. Writes
``benchmarks/collaborative/ablation.json`` and prints a table.

    python benchmarks/collaborative_ablation.py
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from persona_gym.catalog import ItemCatalog
from persona_gym.data import load_dataset, protocol_split
from persona_gym.evaluation.metrics import rmse, within_user
from persona_gym.io import atomic_write_json
from persona_gym.ratings import RATING_VALUES
from persona_gym.simulator.cf_models import (
    DEFAULT_GRIDS,
    BiasedMF,
    ItemKNN,
    fit_frame,
    tune,
    validation_split,
)
from persona_gym.simulator.collaborative import (
    BLENDS,
    fit_collaborative,
    gain_nlls,
    gained,
    user_level,
)
from persona_gym.simulator.rating_prior import fit_rating_prior

HERE = Path(__file__).parent


def _surprises(frame: pd.DataFrame, predictions: np.ndarray, window: int = 3) -> np.ndarray:
    """Per row (time-ordered within user), the mean residual of the user's previous ``window``."""
    residual = pd.Series(frame["rating"].to_numpy() - predictions, index=frame.index)
    return (
        residual.groupby(frame["user_id"])
        .transform(lambda s: s.shift(1).rolling(window, min_periods=1).mean())
        .fillna(0.0)
        .to_numpy()
    )


def _prior_expectation(fit_pred, fit_surprise, fit_rating, pred, surprise) -> np.ndarray:
    prior = fit_rating_prior(fit_pred, fit_surprise, fit_rating)
    with torch.no_grad():
        probs = (
            prior(
                torch.zeros(len(pred), 5),
                torch.tensor(pred, dtype=torch.float32),
                torch.tensor(surprise, dtype=torch.float32),
            )
            .softmax(-1)
            .numpy()
        )
    return probs @ RATING_VALUES


def _prior_rmse(fit_pred, fit_surprise, fit_rating, pred, surprise, real) -> float:
    return rmse(_prior_expectation(fit_pred, fit_surprise, fit_rating, pred, surprise), real)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "collaborative" / "ablation.json")
    args = parser.parse_args()

    ds = load_dataset("ml-100k")
    split = protocol_split(ds)
    fit_part, val = validation_split(split.train, 0.2)
    tune_on = fit_frame(fit_part, split.background)
    mf_params, _, _ = tune(*DEFAULT_GRIDS["matrix factorisation"], tune_on, val, {"seed": 0})
    knn_params, _, _ = tune(*DEFAULT_GRIDS["item kNN"], tune_on, val)
    pairs = val["user_id"], val["item_id"]
    mf_model = BiasedMF(**mf_params, seed=0).fit(tune_on)
    mf = mf_model.predict(*pairs)
    knn = ItemKNN(**knn_params).fit(tune_on).predict(*pairs)
    y = val["rating"].to_numpy(np.float64)
    rows = {"matrix factorisation": rmse(mf, y), "item kNN": rmse(knn, y)}
    blends = {float(w): rmse(np.clip((1 - w) * mf + w * knn, 1, 5), y) for w in BLENDS}
    best = min(blends, key=lambda w: blends[w])
    rows[f"MF + kNN blend (w={best})"] = blends[best]
    blend = np.clip((1 - best) * mf + best * knn, 1, 5)
    level = user_level(mf_model, val["user_id"], blend)
    rating_val = val["rating"].to_numpy(np.int64)
    nlls = gain_nlls(level, blend, rating_val)
    gains = {}
    for g, nll in nlls.items():
        pred = gained(level, blend, g)
        expected = _prior_expectation(
            pred, np.zeros_like(pred), rating_val, pred, np.zeros_like(pred)
        )
        gains[float(g)] = {
            "prior_nll": nll,
            "prior_rmse": rmse(expected, y),
            "prior_within_user_std": within_user(val["user_id"], expected, y)["std_pred"],
        }

    catalog = ItemCatalog.from_frames(ds.items, split.item_stats())
    model = fit_collaborative(split.train, split.background, catalog, seed=0)
    gain = float(model.params["gain"])
    plain = replace(model, params={**model.params, "gain": 1.0})
    train = split.train.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    oof = model.predict(train["user_id"], catalog.indices_of(train["item_id"]))
    test = split.test.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    test_pred = model.predict(test["user_id"], catalog.indices_of(test["item_id"]))
    # the evaluator's window of a test rating: the user's last 3 training interactions
    last = train.assign(res=train["rating"].to_numpy() - oof).groupby("user_id").tail(3)
    test_surprise = (
        test["user_id"].map(last.groupby("user_id")["res"].mean()).fillna(0.0).to_numpy()
    )
    surprise = _surprises(train, oof)
    rating = train["rating"].round().astype(int).to_numpy()
    real = test["rating"].to_numpy(np.float64)
    test_rows = {
        "matrix factorisation": rmse(
            BiasedMF(**mf_params, seed=0)
            .fit(fit_frame(split.train, split.background))
            .predict(test["user_id"], test["item_id"]),
            real,
        ),
        "item kNN": rmse(
            ItemKNN(**knn_params)
            .fit(fit_frame(split.train, split.background))
            .predict(test["user_id"], test["item_id"]),
            real,
        ),
        f"MF + kNN blend (w={best})": rmse(
            plain.predict(test["user_id"], catalog.indices_of(test["item_id"])), real
        ),
        f"  with the gain (g={gain})": rmse(test_pred, real),
        "blend through the prior, no memory": _prior_rmse(
            oof, np.zeros_like(oof), rating, test_pred, np.zeros_like(test_pred), real
        ),
        "blend through the prior, memory": _prior_rmse(
            oof, surprise, rating, test_pred, test_surprise, real
        ),
    }
    rows[f"  with the gain (g={gain})"] = rmse(gained(level, blend, gain), y)
    expected = _prior_expectation(oof, surprise, rating, test_pred, test_surprise)
    test_std = within_user(test["user_id"], expected, real)["std_pred"]
    result = {
        "validation_rmse": rows,
        "blend_weights_validation_rmse": blends,
        "chosen_blend": best,
        "gains_validation": gains,
        "chosen_gain": gain,
        "test_rmse_for_the_record": test_rows,
        "test_prior_memory_within_user_std": test_std,
        "mf_params": mf_params,
        "knn_params": knn_params,
        "n_validation": int(len(val)),
        "n_test": int(len(test)),
    }
    atomic_write_json(args.out, result)
    print(f"{'option':45s} {'val RMSE':>9s} {'test RMSE':>10s}")
    for name in test_rows:
        val_rmse = f"{rows[name]:.4f}" if name in rows else "-"
        print(f"{name:45s} {val_rmse:>9s} {test_rows[name]:10.4f}")
    print(
        "blend weights on validation: " + ", ".join(f"{w:.1f}:{v:.4f}" for w, v in blends.items())
    )
    print(
        f"{'gain':>5s} {'val prior NLL':>14s} {'val prior RMSE':>15s} {'val within-user std':>20s}"
    )
    for g, row in gains.items():
        print(
            f"{g:5.1f} {row['prior_nll']:14.4f} {row['prior_rmse']:15.4f} {row['prior_within_user_std']:20.4f}"
        )
    print(f"test, the prior with memory: within-user std of its expected rating {test_std:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
