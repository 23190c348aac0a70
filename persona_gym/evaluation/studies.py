"""The figures ``persona-gym evaluate`` adds beyond the configurations: each user's first 3 test
ratings, the collaborative prior alone, and the simulator studies (persona specificity, memory
slope, reward landscape; :mod:`persona_gym.evaluation.fidelity`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from persona_gym.evaluation.configs import EvalConfig, select_test
from persona_gym.evaluation.metrics import fidelity_report, mae, rmse
from persona_gym.ratings import expected
from persona_gym.simulator.memory import logged_history
from persona_gym.simulator.rater import check_distribution

if TYPE_CHECKING:
    from persona_gym.data.protocol import EvalData
    from persona_gym.simulator.prompt_config import PromptConfig

log = logging.getLogger(__name__)


class Simulators(Protocol):
    """What the studies need of the loaded models (``training.evaluate.SharedModels``): a
    simulator per configuration and prompt."""

    def simulator(self, config: EvalConfig, prompt: PromptConfig) -> Any: ...


def prior_alone(
    priors: dict,
    artifacts,
    rows: pd.DataFrame,
    full_test: pd.DataFrame,
    personas: np.ndarray,
    windows: dict[int, tuple],
) -> dict:
    """The simulator's collaborative prior without the SLM's logits: what the SLM adds is the
    difference between this row and the simulator's. ``windows``: each user's evaluator window
    (its surprise moves the prior's centre)."""
    import torch

    cf = artifacts.collaborative
    taste = {u: artifacts.taste(u, artifacts.adapter_of(u)) for u in windows}
    surprise = {u: cf.surprise(u, window, taste[u]) for u, window in windows.items()}

    def probs_of(frame: pd.DataFrame) -> np.ndarray:
        users = frame["user_id"].to_numpy(np.int64)
        own = cf.user_factors[np.maximum(cf.user_rows(users), 0)]
        factors = np.array(
            [own[n] if taste[int(u)] is None else taste[int(u)] for n, u in enumerate(users)]
        )
        predictions = torch.tensor(
            cf.predict(users, frame["item_index"], factors.reshape(own.shape))
        )
        surprises = torch.tensor([surprise[int(u)] for u in users])
        out = np.zeros((len(frame), 5))
        adapters = np.array([artifacts.adapter_of(int(u)) for u in users])
        with torch.no_grad():
            for name in np.unique(adapters):
                index = np.flatnonzero(adapters == name)
                logits = priors[name](
                    torch.zeros(len(index), 5), predictions[index], surprises[index]
                )
                out[index] = logits.softmax(-1).double().numpy()
        return out

    real = rows["rating"].to_numpy(np.float64)
    probs = probs_of(rows)
    full = expected(probs_of(full_test))
    return {
        "params": {"from": "each adapter's learned prior"},
        "val_rmse": float("nan"),
        "full_test": {
            "n": int(len(full_test)),
            "rmse": rmse(full, full_test["rating"]),
            "mae": mae(full, full_test["rating"]),
        },
        "evaluated_rows": fidelity_report(  # takes any array-like `groups` (np.asarray)
            rows["user_id"].to_numpy(),
            real,
            probs=probs,
            groups=personas,
        ),
        "first_3": first_3(rows, expected(probs), real),
    }


def first_3(rows: pd.DataFrame, pred: np.ndarray, real: np.ndarray) -> dict:
    """RMSE and MAE on each user's first 3 evaluated test interactions (the shipped report's
    historical 600-row subset)."""
    first = rows.groupby("user_id").cumcount().to_numpy() < 3
    return {
        "n": int(first.sum()),
        "rmse": rmse(pred[first], real[first]),
        "mae": mae(pred[first], real[first]),
    }


def simulator_studies(
    models: Simulators,
    artifacts,
    data: EvalData,
    full_test: pd.DataFrame,
    prompt,
    seed: int,
    per_user: int,
    chunk_users: int,
) -> dict:
    """Persona specificity, memory slope and reward landscape of the persona simulator."""
    from persona_gym.evaluation import fidelity

    simulators: dict = {}

    def rate(variant, users, items, windows, gaps=None):
        if variant not in simulators:
            simulators[variant] = models.simulator(EvalConfig(variant, variant, "Ms+Ml"), prompt)
        simulator = simulators[variant]
        users = np.asarray(users, dtype=np.int64)
        probs = np.zeros((len(users), 5))
        unique = list(dict.fromkeys(users.tolist()))
        for start in range(0, len(unique), chunk_users):
            index = np.flatnonzero(np.isin(users, unique[start : start + chunk_users]))
            probs[index] = check_distribution(
                simulator.rate(
                    users[index].tolist(),
                    [int(items[i]) for i in index],
                    [windows[i] for i in index],
                    None if gaps is None else [int(gaps[i]) for i in index],
                ),
                simulator.source,
                n_rows=len(index),
            )
        return probs

    k = prompt.window_size
    histories = {u: logged_history(artifacts.memories, u) for u in artifacts.user_ids}
    last = {u: (h[-k:] if k else ()) for u, h in histories.items()}
    rows = select_test(full_test, per_user)
    out: dict[str, Any] = {"rows_per_user": per_user}
    log.info(
        "studies: persona specificity on %d rows x %d adapters",
        len(rows),
        len(set(artifacts.user_persona.values())),
    )
    out["persona_specificity"] = fidelity.persona_specificity(
        rate,
        rows["user_id"].to_numpy(),
        rows["item_index"].to_numpy(),
        rows["rating"].to_numpy(np.float64),
        [last[int(u)] for u in rows["user_id"]],
        artifacts.user_persona,
        rows["gap"].to_numpy(),
    )
    catalog = artifacts.catalog
    global_mean = float(
        np.average(catalog.mean_rating, weights=np.maximum(catalog.n_ratings, 1e-9))
    )
    item_bias = catalog.mean_rating - global_mean
    memories = artifacts.memories
    history = pd.concat(
        [
            memories[["user_id", "item_index", "rating", "timestamp"]].assign(is_test=False),
            full_test[["user_id", "item_index", "rating", "timestamp"]].assign(is_test=True),
        ],
        ignore_index=True,
    )
    user_mean = memories.groupby("user_id")["rating"].mean().to_dict()
    log.info("studies: memory slope")
    out["memory"] = fidelity.memory_slope(rate, history, user_mean, item_bias, per_user)
    seen = history.groupby("user_id")["item_index"].agg(set).to_dict()
    cf = artifacts.collaborative
    log.info("studies: reward landscape")
    out["landscape"] = fidelity.landscape(
        rate, seen, len(catalog), last, cf.predict if cf is not None else None, seed=seed
    )
    return out
