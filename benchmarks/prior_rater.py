"""Fidelity of ``rater="prior"`` (the collaborative prior with its window term, no SLM) on the
protocol's full test split: RMSE with the evaluator's window (each user's last k logged ratings)
and with the rolling window, within-user Pearson, and the sequential slopes of
:mod:`persona_gym.evaluation.sequential` beside the real ones.

    python benchmarks/prior_rater.py [ARTIFACTS]     # default: the shipped ml-100k
"""

from __future__ import annotations

import json
import sys

import numpy as np

from persona_gym.artifacts.shipped import resolve_artifacts
from persona_gym.data.protocol import logged_data
from persona_gym.evaluation.sequential import (
    reference_predictions,
    sequence_features,
    sequential_slopes,
    within_user_pearson,
)
from persona_gym.evaluation.sequential_study import all_ratings, rolling_windows
from persona_gym.ratings import expected
from persona_gym.simulator.prior_rater import PriorRater


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    root = resolve_artifacts(args[0] if args else "ml-100k")
    rater = PriorRater.load(root)
    data = logged_data(rater.artifacts)
    frame = all_ratings(data, rater.catalog)
    reference = reference_predictions(frame)
    residual = frame["rating"].to_numpy(np.float64) - reference
    k = rater.window_size
    features = sequence_features(frame, residual, rater.catalog.genres, rater.item_embeddings, k)
    rows = np.flatnonzero(frame["is_test"].to_numpy())
    test = frame.iloc[rows]
    users, items = test["user_id"].to_numpy(), test["item_index"].to_numpy()
    real = test["rating"].to_numpy(np.float64)
    static = [rater.history(int(u))[-k:] for u in users]
    rolling = rolling_windows(frame, rows, k)
    out = {}
    for name, windows in (("evaluator_window", static), ("rolling_window", rolling)):
        pred = expected(rater.rate(users, items, windows))
        e = pred - reference[rows]
        slopes = sequential_slopes(
            e, features["mood"].to_numpy()[rows], features["genre"].to_numpy()[rows], users
        )
        out[name] = {
            "rmse": float(np.sqrt(np.mean((pred - real) ** 2))),
            "within_user_pearson": within_user_pearson(pred, real, users),
            **slopes,
        }
    e_real = real - reference[rows]
    out["real"] = sequential_slopes(
        e_real, features["mood"].to_numpy()[rows], features["genre"].to_numpy()[rows], users
    )
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
