"""How many personas the data tells apart when each owns part of its users' taste (no SLM).

The simulator's persona adapters own a share ``s`` of their users' collaborative taste
(``PromptConfig.persona_taste``): under persona ``k``'s adapter a user's MF factors ``p_u`` move
a share ``s`` toward ``c_k``, the mean factors of the persona's users (who are clustered on those
factors, ``persona-gym personas --features taste``), along the axes that separate the personas
(:func:`persona_gym.simulator.collaborative.taste_axes`). For each K and ``s`` this scores the
collaborative prediction alone under every persona's taste, on the validation slice (the last
20% of each protocol user's training interactions; the model refitted without it), and reports
the share of users whose own persona fits their validation ratings best (RMSE), the RMSE and the
mean within-user std of the predictions under their own persona. The choice, on the validation
slice only: the largest K whose share is at least 60% at some ``s``, then the largest ``s`` whose
RMSE is within 0.25% of the users' own factors'. The test split is scored for the record only.
Writes ``benchmarks/collaborative/persona_taste.json`` and prints a table.

    python benchmarks/persona_taste.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans

from persona_gym.catalog import ItemCatalog
from persona_gym.data import load_dataset, protocol_split
from persona_gym.evaluation.metrics import rmse
from persona_gym.io import atomic_write_json
from persona_gym.simulator.cf_models import validation_split
from persona_gym.simulator.collaborative import CollaborativeModel, fit_collaborative, taste_axes

HERE = Path(__file__).parent
SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
KS = (2, 3, 4, 6)
TARGET = 0.6
RMSE_COST = 0.0025  # the largest relative RMSE cost of the users' own factors the choice accepts


def persona_rows(
    cf: CollaborativeModel,
    users: np.ndarray,
    rows: pd.DataFrame,
    catalog: ItemCatalog,
    k: int,
    share: float,
    seed: int,
) -> dict:
    """Own-persona share and RMSE of ``rows`` with the users clustered into ``k`` tastes."""
    factors = cf.user_factors[cf.user_rows(users)]
    labels = KMeans(k, n_init=10, random_state=seed).fit_predict(factors)
    persona = dict(zip(users.tolist(), labels.tolist(), strict=True))
    centroids = {p: factors[labels == p].mean(0) for p in range(k)}
    axes = taste_axes(centroids)
    ids = rows["user_id"].to_numpy(np.int64)
    items = catalog.indices_of(rows["item_id"])
    real = rows["rating"].to_numpy(np.float64)
    predictions = np.stack(
        [
            cf.predict(
                ids,
                items,
                np.stack([cf.taste_of(u, centroids[p], share, axes) for u in ids.tolist()]),
            )
            for p in range(k)
        ],
        1,
    )
    errors = pd.DataFrame((predictions - real[:, None]) ** 2).groupby(ids).mean()
    own = errors.index.map(persona).to_numpy()
    own_prediction = predictions[np.arange(len(ids)), [persona[u] for u in ids.tolist()]]
    return {
        "own_best_share": float(np.mean(errors.to_numpy().argmin(1) == own)),
        "rmse": rmse(own_prediction, real),
        "within_user_std": within_user_std(own_prediction, ids),
        "sizes": np.bincount(labels, minlength=k).tolist(),
    }


def within_user_std(predictions: np.ndarray, users: np.ndarray) -> float:
    """Mean over users of the std of their predictions (the report's within-user std)."""
    return float(pd.Series(predictions).groupby(users).std().mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "collaborative" / "persona_taste.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dataset = load_dataset("ml-100k")
    split = protocol_split(dataset)
    catalog = ItemCatalog.from_frames(dataset.items, split.item_stats())
    users = np.array(sorted(split.train["user_id"].unique()), dtype=np.int64)
    fit_part, validation = validation_split(split.train, 0.2)
    scored = {
        "validation": (
            fit_collaborative(fit_part, split.background, catalog, seed=args.seed),
            validation,
        ),
        "test (for the record)": (
            fit_collaborative(split.train, split.background, catalog, seed=args.seed),
            split.test,
        ),
    }
    result: dict = {"target_share": TARGET, "rows": {}}
    print(f"{'slice':22s} {'K':>2s} {'s':>5s} {'own best':>9s} {'RMSE':>7s} {'std':>6s}")
    for name, (cf, rows) in scored.items():
        own = cf.predict(rows["user_id"], catalog.indices_of(rows["item_id"]))
        result["rows"][name] = {
            "own_factors_rmse": rmse(own, rows["rating"].to_numpy(np.float64)),
            "own_factors_std": within_user_std(own, rows["user_id"].to_numpy()),
            "runs": [],
        }
        for k in KS:
            for share in SHARES:
                run = {
                    "k": k,
                    "share": share,
                    **persona_rows(cf, users, rows, catalog, k, share, args.seed),
                }
                result["rows"][name]["runs"].append(run)
                print(
                    f"{name:22s} {k:2d} {share:5.2f} {run['own_best_share']:9.2f} {run['rmse']:7.4f} "
                    f"{run['within_user_std']:6.3f}"
                )
        row = result["rows"][name]
        print(
            f"{name:22s} each user's own factors: RMSE {row['own_factors_rmse']:.4f} std {row['own_factors_std']:.3f}"
        )
    runs = result["rows"]["validation"]["runs"]
    ks = [r["k"] for r in runs if r["own_best_share"] >= TARGET]
    result["chosen_k"] = max(ks) if ks else None
    limit = (1 + RMSE_COST) * result["rows"]["validation"]["own_factors_rmse"]
    shares = [r["share"] for r in runs if r["k"] == result["chosen_k"] and r["rmse"] <= limit]
    result["chosen_share"] = max(shares) if shares else None
    print(
        f"chosen: K={result['chosen_k']} (the largest with a validation share >= {TARGET:.0%}), "
        f"s={result['chosen_share']} (the largest within {RMSE_COST:.2%} of the own factors' validation RMSE)"
    )
    atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
