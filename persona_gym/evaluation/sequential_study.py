"""The sequential-fidelity study of ``persona-gym evaluate`` (``studies.sequential``).

Every test rating of the protocol users is predicted with the rolling window: the user's real
previous ``k`` interactions in time order, earlier test ratings included (what the environment
does with an episode's ratings). Rows: the real ratings, the simulator's expected rating, its
collaborative prior alone (no SLM) and matrix factorisation; columns: the mood and similarity
slopes of :mod:`persona_gym.evaluation.sequential` with their intervals, and the ratio of each
row's slope to the real one. Beside them: RMSE and within-user Pearson under the rolling window,
and the paired difference simulator - prior alone. The real slopes over every user of the
dataset are the second reference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from persona_gym.evaluation.sequential import (
    paired_rmse_difference,
    reference_predictions,
    sequence_features,
    sequential_slopes,
    slope_ratios,
    within_user_pearson,
)
from persona_gym.ratings import expected
from persona_gym.simulator.cf_models import BiasedMF, fit_frame
from persona_gym.simulator.memory import Interaction
from persona_gym.simulator.rater import check_distribution

log = logging.getLogger(__name__)

ROWS = ("real", "simulator", "prior", "mf")


def prior_only(simulator, users: Sequence[int], items: Sequence[int], windows) -> np.ndarray:
    """``(n, 5)`` rating distributions of the simulator's collaborative prior alone: each
    adapter's prior around the collaborative prediction (moved by its window term, if it has
    one), with the SLM's logits left out."""
    requests = [
        simulator.request(int(u), int(i), w) for u, i, w in zip(users, items, windows, strict=True)
    ]
    priors = simulator.model.priors
    out = np.zeros((len(requests), 5))
    adapters = np.array([r.adapter for r in requests])
    with torch.no_grad():
        for name in np.unique(adapters):
            index = np.flatnonzero(adapters == name)
            predictions = torch.tensor(
                [requests[i].cf_prediction for i in index], dtype=torch.float32
            )
            surprises = torch.tensor(
                [requests[i].surprise or 0.0 for i in index], dtype=torch.float32
            )
            logits = priors[name](torch.zeros(len(index), 5), predictions, surprises)
            out[index] = logits.softmax(-1).double().numpy()
    return out


def all_ratings(data, catalog) -> pd.DataFrame:
    """Every rating of the logged data (train, test, background) with its catalogue index and
    an ``is_test`` flag, sorted by user then time."""
    frames = [data.train, data.test, data.background]
    cols = ["user_id", "item_id", "rating", "timestamp"]
    frame = pd.concat([f[cols] for f in frames if f is not None and len(f)], ignore_index=True)
    frame["item_index"] = catalog.indices_of(frame["item_id"])
    frame["is_test"] = False
    frame.loc[len(data.train) : len(data.train) + len(data.test) - 1, "is_test"] = True
    return frame.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(
        drop=True
    )


def rolling_windows(frame: pd.DataFrame, rows: np.ndarray, k: int) -> list[tuple[Interaction, ...]]:
    """The real previous ``k`` interactions of each row (same user, time order)."""
    users = frame["user_id"].to_numpy()
    items = frame["item_index"].to_numpy()
    ratings = frame["rating"].to_numpy(dtype=np.float64)
    times = frame["timestamp"].to_numpy()
    out = []
    for row in rows:
        start = row
        while start > row - k and start > 0 and users[start - 1] == users[row]:
            start -= 1
        out.append(
            tuple(
                Interaction(int(items[j]), float(ratings[j]), int(times[j]))
                for j in range(start, row)
            )
        )
    return out


def sequential_study(simulator, data, k: int = 3, chunk: int = 256, n_boot: int = 1000) -> dict:
    """``studies.sequential`` of the report (module docstring) for a loaded ``UserSimulator``
    and the protocol's logged data."""
    frame = all_ratings(data, simulator.catalog)
    reference = reference_predictions(frame)
    residual = frame["rating"].to_numpy(np.float64) - reference
    features = sequence_features(
        frame, residual, simulator.catalog.genres, simulator.item_embeddings, k
    )
    users_all = frame["user_id"].to_numpy()
    real_all = {
        name: sequential_slopes(
            residual, features["mood"].to_numpy(), features[name].to_numpy(), users_all, n_boot
        )
        for name in ("genre", "text")
    }
    rows = np.flatnonzero(frame["is_test"].to_numpy())
    test = frame.iloc[rows]
    users = test["user_id"].to_numpy()
    items = test["item_index"].to_numpy()
    real = test["rating"].to_numpy(np.float64)
    windows = rolling_windows(frame, rows, k)
    sim = np.zeros(len(rows))
    prior = np.zeros(len(rows))
    for start in range(0, len(rows), chunk):
        part = slice(start, start + chunk)
        probs = simulator.rate(users[part], items[part], windows[part])
        sim[part] = expected(check_distribution(probs, simulator.source, n_rows=len(probs)))
        prior[part] = expected(prior_only(simulator, users[part], items[part], windows[part]))
        log.info("sequential study: %d/%d test ratings", min(start + chunk, len(rows)), len(rows))
    mf_model = BiasedMF().fit(fit_frame(data.train, data.background))
    mf = mf_model.predict(test["user_id"].to_numpy(), test["item_id"].to_numpy())
    predictions = {"real": real, "simulator": sim, "prior": prior, "mf": mf}
    mood = features["mood"].to_numpy()[rows]
    out: dict = {"k": k, "n": int(len(rows)), "n_users": int(len(np.unique(users)))}
    for name, values in predictions.items():
        e = values - reference[rows]
        genre = sequential_slopes(e, mood, features["genre"].to_numpy()[rows], users, n_boot)
        text = sequential_slopes(e, mood, features["text"].to_numpy()[rows], users, n_boot)
        out[name] = {
            "mood": genre["mood"],
            "similarity": genre["similarity"],
            "text_similarity": text["similarity"],
        }
    e_real = real - reference[rows]
    out["ratio"] = {}
    for name in ("simulator", "prior", "mf"):
        e = predictions[name] - reference[rows]
        genre = slope_ratios(e, e_real, mood, features["genre"].to_numpy()[rows], users, n_boot)
        text = slope_ratios(e, e_real, mood, features["text"].to_numpy()[rows], users, n_boot)
        out["ratio"][name] = {
            "mood": genre["mood"],
            "similarity": genre["similarity"],
            "text_similarity": text["similarity"],
        }
    out["real_all_users"] = {
        "mood": real_all["genre"]["mood"],
        "similarity": real_all["genre"]["similarity"],
        "text_similarity": real_all["text"]["similarity"],
        "n": int(np.isfinite(features["mood"]).sum()),
    }
    out["rmse_rolling"] = {
        name: float(np.sqrt(np.mean((predictions[name] - real) ** 2)))
        for name in ("simulator", "prior", "mf")
    }
    out["rmse_rolling"]["simulator_minus_prior"] = paired_rmse_difference(
        sim, prior, real, users, n_boot
    )
    out["pearson_rolling"] = {
        name: within_user_pearson(predictions[name], real, users)
        for name in ("simulator", "prior", "mf")
    }
    return out


def _ratio_cell(ratio: dict) -> str:
    return f"{ratio['ratio']:.2f} [{ratio['low']:.2f}, {ratio['high']:.2f}]"


def sequential_table(study: dict) -> str:
    """The study as the report's markdown table."""

    def cell(row: str, effect: str) -> str:
        v = study[row][effect]
        return f"{v['slope']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]"

    lines = [
        f"Rolling window k={study['k']}, {study['n']} test ratings of {study['n_users']} users; "
        "slopes of the residual on mood and similarity, user fixed effects, 95% bootstrap over users.",
        "",
        "| row | mood | genre similarity | text similarity | ratio to real, mood / genre / text "
        "(95% interval, same bootstrap draws) | RMSE | within-user Pearson |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        ratio = (
            " / ".join(
                _ratio_cell(study["ratio"][row][e])
                for e in ("mood", "similarity", "text_similarity")
            )
            if row != "real"
            else "1"
        )
        rmse = f"{study['rmse_rolling'][row]:.4f}" if row != "real" else ""
        pearson = f"{study['pearson_rolling'][row]:.3f}" if row != "real" else ""
        lines.append(
            f"| {row} | {cell(row, 'mood')} | {cell(row, 'similarity')} | {cell(row, 'text_similarity')} "
            f"| {ratio} | {rmse} | {pearson} |"
        )
    all_users = study["real_all_users"]
    d = study["rmse_rolling"]["simulator_minus_prior"]
    lines += [
        f"| real, all users ({all_users['n']} ratings) | {all_users['mood']['slope']:+.3f} "
        f"[{all_users['mood']['low']:+.3f}, {all_users['mood']['high']:+.3f}] | "
        f"{all_users['similarity']['slope']:+.3f} [{all_users['similarity']['low']:+.3f}, "
        f"{all_users['similarity']['high']:+.3f}] | {all_users['text_similarity']['slope']:+.3f} | | | |",
        "",
        f"Simulator - prior alone, RMSE under the rolling window: {d['mean']:+.4f} "
        f"[{d['low']:+.4f}, {d['high']:+.4f}] (paired, bootstrap over users).",
    ]
    return "\n".join(lines)
