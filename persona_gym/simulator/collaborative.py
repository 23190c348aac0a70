"""The collaborative signal the simulated users are given: matrix factorisation + item kNN.

A small language model reads titles and profiles, but what a user will think of a movie is
mostly in who else liked it. As LLM recommenders do (CoLLM, LLaRA, BinLLM), the simulator hands
the SLM a collaborative model fitted on the data it may use (the simulated users' TRAINING
interactions plus the other users' ratings, never a held-out rating):

* its prediction for the (user, candidate) pair, as a numeric cue next to the answer;
* the window's surprise: how the user's recent ratings deviated from the model's predictions
  (the short-term mood the model cannot see);
* each item's factors and bias, appended to the item's text embedding in the soft item tokens.

A persona adapter can own part of its users' taste (``PromptConfig.persona_taste = s``): its
users are clustered on their MF user factors (``persona-gym personas --features taste``), ``c_k``
is the mean factor vector of persona ``k``'s training users (:func:`persona_tastes`) and ``A`` an
orthonormal basis of the axes that separate the personas (the span of the centred ``c_k``,
:func:`taste_axes`). Under persona ``k``'s adapter a user's prediction uses
``p_u - s (p_u - c_k) A^T A`` in place of their own factors ``p_u``
(:meth:`CollaborativeModel.taste_of`): on the persona axes the user moves a share ``s`` toward
their persona's centre, elsewhere they keep their own taste, so the predictions keep their spread
over movies. Rated by another persona's adapter, the user gets that persona's taste: the adapter
carries something of its own users.

The prediction is a blend ``(1 - w) * MF + w * kNN`` of two baselines of
:mod:`persona_gym.simulator.cf_models`, :class:`~persona_gym.simulator.cf_models.BiasedMF`
and :class:`~persona_gym.simulator.cf_models.ItemKNN` (they err differently: the factors see
global taste, the neighbourhood the user's own ratings of similar movies), with its part that
varies from movie to movie scaled by a gain ``g`` around the user's level ``mu + b_u``:
``mu + b_u + g (blend - mu - b_u)``. Each baseline is tuned on the validation slice of the
training part exactly as its baseline is, and ``w`` is chosen on the same slice, then ``g``: the
gain whose prediction the rating prior (:mod:`persona_gym.simulator.rating_prior`, the discretised
Gaussian the simulator reads it through) fits best, by that prior's likelihood of the validation
ratings. Regularised factors and a prior that smooths over five stars both pull the expected
rating toward the user's level; the later ratings of the validation slice ask for more of the
movie-to-movie part than the out-of-fold training rows do. The item tokens carry the MF
factors. Training prompts must not show a
prediction fitted on their own label: :func:`fit_collaborative` also returns out-of-fold
predictions of every training interaction (``folds`` random folds of the simulated users'
training rows, background always in the fit), which the training prompts and the logged
history's window use instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from persona_gym.catalog import ItemCatalog
from persona_gym.io import atomic_write
from persona_gym.ratings import rmse
from persona_gym.simulator.cf_models import (
    DEFAULT_GRIDS,
    BiasedMF,
    ItemKNN,
    fit_frame,
    tune,
    validation_split,
)
from persona_gym.simulator.rating_prior import fit_rating_prior

__all__ = [
    "CF_FILE",
    "GAINS",
    "CollaborativeModel",
    "fit_collaborative",
    "gain_nlls",
    "gained",
    "load_collaborative",
    "persona_tastes",
    "taste_axes",
    "user_level",
]

CF_FILE = "collaborative.npz"


@dataclass(frozen=True)
class CollaborativeModel:
    """``mu + b_u + g (blend - mu - b_u)`` with ``blend = (1 - w) (mu + b_u + b_i + p_u . q_i)
    + w kNN(u, i)``, over the catalogue's indices (items the fit never saw have zero bias and
    factors; users it never saw predict the MF item side only, without the gain)."""

    mu: float
    user_ids: np.ndarray  # (U,) int64, sorted
    user_bias: np.ndarray  # (U,)
    user_factors: np.ndarray  # (U, F)
    item_bias: np.ndarray  # (n_items,) in catalogue order
    item_factors: np.ndarray  # (n_items, F)
    params: dict  # {"mf": ..., "knn": ..., "blend": w, "gain": g} (no "gain": 1)
    knn: np.ndarray  # (U, n_items) float32: the item-kNN prediction of every fitted user
    # out-of-fold predictions of the logged training interactions, keyed user * n_items + item
    logged_keys: np.ndarray  # (L,) int64, sorted
    logged_predictions: np.ndarray  # (L,)

    def user_rows(self, user_ids) -> np.ndarray:
        """Row of each user id in the user arrays, -1 for users the fit never saw."""
        ids = np.asarray(user_ids, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.user_ids, ids), 0, max(len(self.user_ids) - 1, 0))
        return np.where(len(self.user_ids) and self.user_ids[pos] == ids, pos, -1)

    def predict(self, user_ids, item_indices, taste: np.ndarray | None = None) -> np.ndarray:
        """Predicted ratings of ``(user id, catalogue index)`` pairs, clipped to 1..5.

        A pair that is a logged training interaction gets its out-of-fold prediction (the one
        its training prompt showed), any other pair the full fit's. ``taste``: ``(F,)`` or
        ``(n, F)`` user factors used in place of the users' own (:meth:`taste_of`); a logged
        pair's out-of-fold prediction moves by the same difference. Users the fit never saw
        have no user side, so ``taste`` leaves them alone.
        """
        users = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        items = np.asarray(item_indices, dtype=np.int64).reshape(-1)
        rows = self.user_rows(users)
        known = rows >= 0
        safe = np.maximum(rows, 0)
        factors = self.user_factors[safe]
        dot = np.einsum("nf,nf->n", factors, self.item_factors[items])
        value = self.mu + self.item_bias[items] + np.where(known, self.user_bias[safe] + dot, 0.0)
        w = float(self.params["blend"])
        value = np.where(known, (1.0 - w) * value + w * self.knn[safe, items], value)
        shift = np.zeros(len(users))
        if taste is not None:
            moved = np.broadcast_to(np.asarray(taste, dtype=np.float64), factors.shape)
            shift = np.where(
                known,
                (1.0 - w) * np.einsum("nf,nf->n", moved - factors, self.item_factors[items]),
                0.0,
            )
        if len(self.logged_keys):
            keys = users * len(self.item_bias) + items
            pos = np.clip(np.searchsorted(self.logged_keys, keys), 0, len(self.logged_keys) - 1)
            value = np.where(self.logged_keys[pos] == keys, self.logged_predictions[pos], value)
        value = value + shift
        gain = float(self.params.get("gain", 1.0))
        if gain != 1.0:
            value = np.where(known, gained(self.mu + self.user_bias[safe], value, gain), value)
        return np.clip(value, 1.0, 5.0)

    def taste_of(
        self, user_id: int, persona_taste: np.ndarray, share: float, axes: np.ndarray
    ) -> np.ndarray:
        """``p_u - share (p_u - c) A^T A``: the user's factors moved a ``share`` toward a persona's
        mean factors ``c`` along the ``(n_axes, F)`` orthonormal ``axes`` ``A`` (:func:`taste_axes`),
        unchanged across them (``p_u`` = 0 for a user the fit never saw)."""
        row = int(self.user_rows([user_id])[0])
        own = self.user_factors[row] if row >= 0 else np.zeros(self.user_factors.shape[1])
        axes = np.asarray(axes, dtype=np.float64).reshape(-1, len(own))
        return own - share * ((own - np.asarray(persona_taste, dtype=np.float64)) @ axes.T) @ axes

    def cues(
        self, user_id: int, candidate: int, window, taste: np.ndarray | None = None
    ) -> tuple[float, float]:
        """The prompt's collaborative cues for one request: the candidate's predicted rating
        and the window's :meth:`surprise` (both with ``taste``, see :meth:`predict`)."""
        return (
            float(self.predict([user_id], [candidate], taste)[0]),
            self.surprise(user_id, window, taste),
        )

    def surprise(self, user_id: int, window, taste: np.ndarray | None = None) -> float:
        """Mean of (rating - prediction) over a window of interactions; 0 for an empty one."""
        if not len(window):
            return 0.0
        predicted = self.predict([user_id] * len(window), [x.item_index for x in window], taste)
        return float(np.mean([x.rating for x in window] - predicted))

    def item_features(self) -> np.ndarray:
        """``(n_items, F + 1)``: each catalogue item's factors and bias."""
        return np.c_[self.item_factors, self.item_bias].astype(np.float32)

    def save(self, path: str | Path) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(
                    handle,
                    mu=np.float64(self.mu),
                    user_ids=self.user_ids,
                    user_bias=self.user_bias,
                    user_factors=self.user_factors,
                    item_bias=self.item_bias,
                    item_factors=self.item_factors,
                    params=np.array(json.dumps(self.params, sort_keys=True)),
                    knn=self.knn,
                    logged_keys=self.logged_keys,
                    logged_predictions=self.logged_predictions,
                )

        atomic_write(Path(path), write)


def persona_tastes(
    model: CollaborativeModel, user_persona: dict[int, int], users
) -> dict[int, np.ndarray]:
    """Each persona's taste: the mean MF factors of its members among ``users`` (the users its
    adapter trains on) that the fit saw."""
    tastes = {}
    for persona in sorted(set(user_persona.values())):
        members = [u for u in users if user_persona.get(int(u)) == persona]
        rows = model.user_rows(members)
        rows = rows[rows >= 0]
        tastes[persona] = (
            model.user_factors[rows].mean(0) if len(rows) else np.zeros(model.user_factors.shape[1])
        )
    return tastes


def taste_axes(tastes: dict[int, np.ndarray]) -> np.ndarray:
    """``(n_axes, F)``: an orthonormal basis of the span of the personas' centred tastes (the
    axes that separate them; at most K - 1 for K personas, none for one)."""
    centres = np.stack([np.asarray(t, dtype=np.float64) for _, t in sorted(tastes.items())])
    centred = centres - centres.mean(0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[singular > 1e-9 * singular.max(initial=0.0)]


def load_collaborative(path: str | Path) -> CollaborativeModel:
    """Read a model written by :meth:`CollaborativeModel.save`; fail with the file and the fix."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run `persona-gym distill --out {path.parent}` "
            "(this version writes the collaborative model with the tables)"
        )
    with np.load(path) as data:
        if "knn" not in data:
            raise ValueError(
                f"{path} was written by an older version (no item-kNN part); "
                f"re-run `persona-gym distill --out {path.parent}`"
            )
        model = CollaborativeModel(
            float(data["mu"]),
            data["user_ids"].astype(np.int64),
            data["user_bias"],
            data["user_factors"],
            data["item_bias"],
            data["item_factors"],
            json.loads(str(data["params"])),
            data["knn"],
            data["logged_keys"].astype(np.int64),
            data["logged_predictions"],
        )
    if model.knn.shape != (len(model.user_ids), len(model.item_bias)):
        raise ValueError(
            f"{path}: the kNN table is {model.knn.shape}, expected "
            f"{(len(model.user_ids), len(model.item_bias))}; re-run `persona-gym distill`"
        )
    arrays = (
        model.user_bias,
        model.user_factors,
        model.item_bias,
        model.item_factors,
        model.knn,
        model.logged_predictions,
    )
    if not all(np.isfinite(a).all() for a in arrays) or not np.isfinite(model.mu):
        raise ValueError(
            f"{path}: non-finite values in the collaborative model; re-run `persona-gym distill`"
        )
    return model


def _to_catalog(model: BiasedMF, catalog: ItemCatalog) -> tuple[np.ndarray, np.ndarray]:
    rows = model.lookup(model.items_, catalog.item_ids)
    known = rows >= 0
    bias = np.where(known, model.bi_[np.maximum(rows, 0)], 0.0)
    factors = np.where(known[:, None], model.q_[np.maximum(rows, 0)], 0.0)
    return bias, factors


BLENDS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))
GAINS = (1.0, 1.1, 1.2, 1.3, 1.4, 1.5)


def _blend(mf: np.ndarray, knn: np.ndarray, w: float) -> np.ndarray:
    return np.clip((1.0 - w) * mf + w * knn, 1.0, 5.0)


def gained(level: np.ndarray, blend: np.ndarray, gain: float) -> np.ndarray:
    """``level + gain (blend - level)``, clipped to 1..5."""
    return np.clip(level + gain * (blend - level), 1.0, 5.0)


def user_level(mf: BiasedMF, users, fallback: np.ndarray) -> np.ndarray:
    """``mu + b_u`` of a fitted MF per user, ``fallback`` where the fit never saw the user."""
    seen = mf.lookup(mf.users_, users)
    return np.where(seen >= 0, mf.mu_ + mf.bu_[np.maximum(seen, 0)], fallback)


def gain_nlls(level: np.ndarray, blend: np.ndarray, ratings: np.ndarray) -> dict[float, float]:
    """Per gain of :data:`GAINS`, the likelihood that chooses it: a rating prior fitted to the
    gained predictions and the 1..5 ``ratings``, its mean negative log-likelihood of them."""
    ratings = np.asarray(ratings, dtype=np.int64)
    scores = {}
    for g in GAINS:
        predictions = gained(level, blend, g)
        prior = fit_rating_prior(predictions, np.zeros(len(ratings)), ratings)
        with torch.no_grad():
            scores[g] = float(
                prior.nll(
                    torch.as_tensor(predictions, dtype=torch.float32),
                    torch.zeros(len(ratings)),
                    torch.tensor(ratings),
                )
            )
    return scores


def fit_collaborative(
    train: pd.DataFrame,
    background: pd.DataFrame,
    catalog: ItemCatalog,
    seed: int = 0,
    folds: int = 5,
    params: dict | None = None,
) -> CollaborativeModel:
    """Tune and fit the collaborative model, with out-of-fold predictions of ``train``.

    ``train`` is the simulated users' training part (``user_id, item_id, rating, timestamp``;
    :meth:`~persona_gym.data.splits.Split.simulated_train`), ``background`` the other users'
    ratings. MF and kNN are tuned on the validation slice, then the blend weight (of
    :data:`BLENDS`, by RMSE) and the gain (of :data:`GAINS`, by the rating prior's likelihood) on
    the same slice. The out-of-fold prediction of a
    ``train`` row comes from models fitted without that row's fold (``folds`` seeded random folds).
    ``params``: the ``params`` of an earlier fit on the same data (a shipped simulator's
    ``collaborative.json``), which skips the tuning and gives the same model.
    """
    if params is None:
        fit_part, validation = validation_split(train, 0.2)
        tune_on = fit_frame(fit_part, background)
        mf_params, _, _ = tune(
            *DEFAULT_GRIDS["matrix factorisation"], tune_on, validation, {"seed": seed}
        )
        knn_params, _, _ = tune(*DEFAULT_GRIDS["item kNN"], tune_on, validation)
        pairs = validation["user_id"], validation["item_id"]
        mf = BiasedMF(**mf_params, seed=seed).fit(tune_on)
        mf_val = mf.predict(*pairs)
        knn_val = ItemKNN(**knn_params).fit(tune_on).predict(*pairs)
        w = min(BLENDS, key=lambda b: rmse(_blend(mf_val, knn_val, b), validation["rating"]))
        blend_val = _blend(mf_val, knn_val, w)
        level = user_level(mf, validation["user_id"], blend_val)
        nlls = gain_nlls(level, blend_val, validation["rating"].to_numpy(np.int64))
        gain = min(nlls, key=nlls.__getitem__)
    else:
        mf_params = {k: v for k, v in params["mf"].items() if k != "seed"}
        knn_params, w, gain = params["knn"], float(params["blend"]), float(params.get("gain", 1.0))

    full_data = fit_frame(train, background)
    full = BiasedMF(**mf_params, seed=seed).fit(full_data)
    knn = ItemKNN(**knn_params).fit(full_data)
    fold = np.random.default_rng([seed, folds]).integers(0, folds, len(train))
    oof = np.zeros(len(train))
    for f in range(folds):
        held = fold == f
        if not held.any():
            continue
        part = fit_frame(train[~held], background)
        rows = train[held]["user_id"], train[held]["item_id"]
        oof[held] = _blend(
            BiasedMF(**mf_params, seed=seed).fit(part).predict(*rows),
            ItemKNN(**knn_params).fit(part).predict(*rows),
            w,
        )
    bias, factors = _to_catalog(full, catalog)
    keys = train["user_id"].to_numpy(np.int64) * len(catalog) + catalog.indices_of(
        train["item_id"]
    ).astype(np.int64)
    order = np.argsort(keys, kind="stable")
    params = {"mf": full.params(), "knn": knn.params(), "blend": float(w), "gain": float(gain)}
    return CollaborativeModel(
        full.mu_,
        full.users_,
        full.bu_,
        full.p_,
        bias,
        factors,
        params,
        _knn_table(knn, full.users_, catalog),
        keys[order],
        oof[order],
    )


def _knn_table(knn: ItemKNN, user_ids: np.ndarray, catalog: ItemCatalog) -> np.ndarray:
    """``(len(user_ids), n_items)``: the kNN prediction of every user for every catalogue item."""
    items = np.asarray(catalog.item_ids, dtype=np.int64)
    table = np.empty((len(user_ids), len(items)), dtype=np.float32)
    for row, user in enumerate(user_ids):
        table[row] = knn.predict(np.full(len(items), user), items)
    return table
