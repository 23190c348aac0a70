"""``PriorRater``: the simulator's collaborative prior without the SLM, for fast prototyping.

``gym.make("PersonaML100K-v0", rater="prior")`` rates with each persona's collaborative prior
(:class:`~persona_gym.simulator.rating_prior.RatingPrior`): a discretised Gaussian over 1..5 around the
collaborative model's prediction for the user under their persona's taste, moved by a window
term (the mean residual of the window's ratings times a fitted ``memory``). Its seven numbers per
persona are fitted at load on the persona's logged histories (:func:`fit_rating_prior`, L-BFGS,
deterministic), with the same windows the environment shows.

It has the SLM users' interface, users, windows and personas, so a policy prototyped on it runs
unchanged on them; what it lacks is what the SLM reads from the window beyond a mean residual
(which movies, how similar to the candidate) and the movie's text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from persona_gym.artifacts import Artifacts, load_artifacts
from persona_gym.catalog import ItemCatalog
from persona_gym.ratings import RATING_VALUES
from persona_gym.simulator.adapter_names import adapter_of
from persona_gym.simulator.memory import Interaction, logged_history
from persona_gym.simulator.rating_prior import RatingPrior, fit_rating_prior

RATINGS = np.asarray(RATING_VALUES, dtype=np.float64)

__all__ = ["PriorRater"]


class PriorRater:
    """Simulated users rated by their persona's collaborative prior (module docstring).

    Args:
        artifacts: a loaded artifacts directory with a collaborative model.
        window_size: the short-term window read per rating (the artifacts' by default).
    """

    def __init__(self, artifacts: Artifacts, window_size: int | None = None):
        self.artifacts = artifacts
        self.collaborative = artifacts.require_collaborative()
        self._window = int(
            artifacts.prompt_config.window_size if window_size is None else window_size
        )
        self._histories = {u: logged_history(artifacts.memories, u) for u in artifacts.user_ids}
        self._adapter = {
            u: adapter_of("persona", u, artifacts.user_persona) for u in artifacts.user_ids
        }
        own = self.collaborative.user_factors[
            np.maximum(self.collaborative.user_rows(artifacts.user_ids), 0)
        ]
        self._taste = {
            u: (t if (t := artifacts.taste(u, self._adapter[u])) is not None else own[n])
            for n, u in enumerate(artifacts.user_ids)
        }
        self.priors = self._fit_priors()
        # (bias (5,), precision, memory) per persona: the prior's formula, evaluated in numpy
        self._params = {
            name: (
                prior.bias.detach().double().numpy(),
                float(prior.log_precision.detach().exp()),
                float(prior.memory.detach()),
            )
            for name, prior in self.priors.items()
        }

    @classmethod
    def load(cls, artifacts_dir: str | Path) -> PriorRater:
        return cls(load_artifacts(artifacts_dir))

    def _fit_priors(self) -> dict[str, RatingPrior]:
        """Each persona's prior, fitted on its training users' logged ratings with their windows."""
        rows: dict[str, tuple[list, list, list]] = {}
        for user in self.artifacts.training_user_ids:
            history = self._histories[user]
            if not history:
                continue
            items = np.array([x.item_index for x in history])
            ratings = np.array([x.rating for x in history])
            predicted = self._predict(np.full(len(items), user), items)
            residual = ratings - predicted
            cumulative = np.r_[0.0, np.cumsum(residual)]
            position = np.arange(len(items))
            start = np.maximum(0, position - self._window)
            count = position - start
            surprise = np.where(
                count > 0, (cumulative[position] - cumulative[start]) / np.maximum(count, 1), 0.0
            )
            predictions, surprises, targets = rows.setdefault(self._adapter[user], ([], [], []))
            predictions.extend(predicted)
            surprises.extend(surprise)
            targets.extend(np.rint(ratings).astype(np.int64))
        return {name: fit_rating_prior(*values) for name, values in sorted(rows.items())}

    def _predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        taste = np.array([self._taste[int(u)] for u in users]).reshape(len(users), -1)
        return self.collaborative.predict(users, items, taste)

    # -- the Rater protocol -------------------------------------------------------------------
    @property
    def source(self) -> str:
        return f"{self.artifacts.root} (collaborative prior alone)"

    @property
    def catalog(self) -> ItemCatalog:
        return self.artifacts.catalog

    @property
    def item_embeddings(self) -> np.ndarray:
        return self.artifacts.item_embeddings

    @property
    def user_ids(self) -> list[int]:
        return self.artifacts.user_ids

    @property
    def training_user_ids(self) -> list[int]:
        return self.artifacts.training_user_ids

    @property
    def window_size(self) -> int:
        return self._window

    def profile(self, user_id: int) -> str:
        return self.artifacts.profiles[int(user_id)]

    def persona(self, user_id: int) -> int:
        return int(self.artifacts.user_persona.get(int(user_id), -1))

    def adapter_of(self, user_id: int) -> str:
        """The persona whose prior rates ``user_id`` (named like its adapter)."""
        return self._adapter[int(user_id)]

    def history(self, user_id: int) -> tuple[Interaction, ...]:
        return self._histories[int(user_id)]

    def rate(
        self,
        user_ids: Sequence[int],
        items: Sequence[int],
        windows: Sequence[Sequence[Interaction]] | None = None,
    ) -> np.ndarray:
        """``(n, 5)`` rating distributions, one per ``(user, item, window)``."""
        users = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        unknown = [int(u) for u in users if int(u) not in self._adapter]
        if unknown:
            raise KeyError(f"user {unknown[0]} is not a simulated user of {self.artifacts.root}")
        candidates = np.asarray(items, dtype=np.int64).reshape(-1)
        windows = windows if windows is not None else [()] * len(users)
        lengths = np.array([min(len(w), self._window) for w in windows])
        flat = [x for w, n in zip(windows, lengths, strict=True) if n for x in tuple(w)[-n:]]
        owner = np.repeat(np.arange(len(users)), lengths)
        surprise = np.zeros(len(users))
        if flat:
            residual = np.array([x.rating for x in flat]) - self._predict(
                users[owner], np.array([x.item_index for x in flat])
            )
            surprise = np.bincount(owner, weights=residual, minlength=len(users)) / np.maximum(
                lengths, 1
            )
        predictions = self._predict(users, candidates)
        adapters = np.array([self._adapter[int(u)] for u in users])
        logits = np.zeros((len(users), 5))
        for name in np.unique(adapters):
            index = np.flatnonzero(adapters == name)
            bias, precision, memory = self._params[name]
            centre = predictions[index] + memory * surprise[index]
            logits[index] = bias - precision * (RATINGS[None, :] - centre[:, None]) ** 2
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True)
