"""Baseline recommendation policies behind one interface, batched over (vector) environments.

A policy scores every catalogue item for each row of a :class:`Batch` (observations, the env's
action masks, the users, and their episode states); masked items score ``-inf``; the action is
the best-scoring allowed item. The same scores rank items for the logged-data evaluation.

* :class:`RandomPolicy`          uniform over the allowed items (its own seeded generator).
* :class:`MostPopularPolicy`     the most-rated unseen item (train + background ratings).
* :class:`ItemMeanPolicy`        the best shrunk item mean (``ItemMean``, fitted like the baseline).
* :class:`MFPolicy`              the best predicted rating of biased matrix factorisation,
  fitted on train + background (the user's own training ratings included).
* :class:`SimulatorGreedyPolicy` the reference upper bound: the user model's own expected rating
  for the top ``n_candidates`` items of the MF policy (scoring all items would cost the
  simulator ~200k tokens per step), with the episode's short-term window.
* :class:`SB3Policy`             a trained stable-baselines3 / sb3-contrib model (``agents.train``).

Ties are broken toward the lower catalogue index, so deterministic policies are reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from persona_gym.envs.core import EpisodeState, RecCore
from persona_gym.ratings import RATING_VALUES
from persona_gym.simulator.cf_models import BiasedMF, ItemMean
from persona_gym.simulator.rater import check_distribution

if TYPE_CHECKING:
    from agents.item_policy import CFFeatures

__all__ = [
    "BASELINES",
    "Batch",
    "ItemMeanPolicy",
    "MFPolicy",
    "MostPopularPolicy",
    "Policy",
    "RandomPolicy",
    "SB3Policy",
    "SimulatorGreedyPolicy",
    "WindowGreedyPolicy",
    "make_policy",
]


@dataclass
class Batch:
    """What a policy sees for ``B`` users at one step.

    Attributes:
        obs: the env's batched observation dict (arrays with a leading ``B`` axis).
        masks: ``(B, n_items)`` bool, true where an item may be recommended.
        user_ids: ``(B,)`` the users (``info["user_id"]``).
        states: the episode states (only the simulator-greedy policy reads them).
    """

    obs: dict[str, np.ndarray]
    masks: np.ndarray
    user_ids: np.ndarray
    states: Sequence[EpisodeState] = ()


class Policy:
    """Scores items for a batch; acts greedily on the scores.

    ``logged_eval`` is false for policies too costly to replay on logged data.
    """

    name = "policy"
    logged_eval = True

    def scores(self, batch: Batch) -> np.ndarray:
        """``(B, n_items)`` float scores, ``-inf`` where masked; higher = recommend first."""
        raise NotImplementedError

    def act(self, batch: Batch) -> np.ndarray:
        """``(B,)`` item indices: the best-scoring allowed item of each row."""
        return self.scores(batch).argmax(axis=1)

    def seed(self, seed: int | None) -> None:
        """Reseed the policy's own randomness (deterministic policies have none)."""


def _masked(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    return np.where(masks, scores, -np.inf)


class RandomPolicy(Policy):
    """Uniform over the allowed items."""

    name = "random"

    def __init__(self, seed: int | None = 0):
        self.rng = np.random.default_rng(seed)

    def seed(self, seed: int | None) -> None:
        self.rng = np.random.default_rng(seed)

    def scores(self, batch: Batch) -> np.ndarray:
        return _masked(self.rng.random(batch.masks.shape), batch.masks)


class _StaticItemPolicy(Policy):
    """One score per item, the same for every user."""

    item_scores: np.ndarray

    def scores(self, batch: Batch) -> np.ndarray:
        return _masked(np.broadcast_to(self.item_scores, batch.masks.shape), batch.masks)


class MostPopularPolicy(_StaticItemPolicy):
    """The most-rated item (train + background) the user has not seen."""

    name = "most-popular"

    def __init__(self, core: RecCore):
        self.item_scores = core.catalog.n_ratings.astype(np.float64)


class ItemMeanPolicy(_StaticItemPolicy):
    """The best item mean, shrunk toward the global mean by ``shrinkage`` pseudo-ratings (so an
    item with one 5-star rating does not win)."""

    name = "item-mean"

    def __init__(self, core: RecCore, ratings: pd.DataFrame, shrinkage: float = 10.0):
        model = ItemMean(shrinkage).fit(ratings)
        ids = core.catalog.item_ids
        self.item_scores = model.predict(np.zeros(len(ids), dtype=np.int64), ids)


class MFPolicy(Policy):
    """The highest rating predicted by biased matrix factorisation (``BiasedMF``)."""

    name = "mf"

    def __init__(
        self,
        core: RecCore,
        ratings: pd.DataFrame,
        factors: int = 5,
        reg: float = 5.0,
        reg_bias: float = 5.0,
        seed: int = 0,
    ):
        self.model = BiasedMF(factors=factors, reg=reg, reg_bias=reg_bias, seed=seed).fit(ratings)
        self.item_ids = core.catalog.item_ids
        self._cache: dict[int, np.ndarray] = {}

    def user_scores(self, user_id: int) -> np.ndarray:
        scores = self._cache.get(user_id)
        if scores is None:
            ids = self.item_ids
            scores = self.model.predict(np.full(len(ids), user_id, dtype=np.int64), ids)
            self._cache[user_id] = scores
        return scores

    def scores(self, batch: Batch) -> np.ndarray:
        return _masked(np.stack([self.user_scores(int(u)) for u in batch.user_ids]), batch.masks)


class WindowGreedyPolicy(Policy):
    """The obvious sequence-aware heuristic: MF's predicted rating plus ``weight`` times the
    mean genre Jaccard similarity of the item with the window's liked movies (rated at least
    ``like``), so what follows a liked movie looks like it. A fixed rule, not learned."""

    name = "window-greedy"

    def __init__(self, core: RecCore, mf: MFPolicy, weight: float = 0.15, like: float = 4.0):
        self.core, self.mf, self.weight, self.like = core, mf, float(weight), float(like)
        names = sorted({g for genres in core.catalog.genres for g in genres})
        column = {g: j for j, g in enumerate(names)}
        self.genres = np.zeros((len(core.catalog), len(names)))
        for i, genres in enumerate(core.catalog.genres):
            self.genres[i, [column[g] for g in genres]] = 1.0
        self.sizes = self.genres.sum(axis=1)

    def scores(self, batch: Batch) -> np.ndarray:
        if len(batch.states) != len(batch.user_ids):
            raise ValueError("WindowGreedyPolicy needs the episode states in the Batch")
        out = self.mf.scores(batch).copy()
        for r, state in enumerate(batch.states):
            liked = [x.item_index for x in self.core.window(state) if x.rating >= self.like]
            if liked:
                inter = self.genres @ self.genres[liked].T  # (n_items, n_liked)
                union = self.sizes[:, None] + self.sizes[liked][None, :] - inter
                out[r] += self.weight * (inter / np.maximum(union, 1.0)).mean(axis=1)
        return out


class SimulatorGreedyPolicy(Policy):
    """Reference upper bound: the simulated user's own expected rating of the MF policy's top
    ``n_candidates`` allowed items, given the episode's window (one simulator call per step)."""

    name = "simulator-greedy"
    logged_eval = False  # the top-k replay would cost ~200k simulator ratings on ML-100k

    def __init__(self, core: RecCore, mf: MFPolicy, n_candidates: int = 20):
        self.core, self.mf, self.n_candidates = core, mf, int(n_candidates)

    def scores(self, batch: Batch) -> np.ndarray:
        if len(batch.states) != len(batch.user_ids):
            raise ValueError("SimulatorGreedyPolicy needs the episode states in the Batch")
        prior = self.mf.scores(batch)
        n = min(self.n_candidates, prior.shape[1])
        top = np.argsort(-prior, axis=1, kind="stable")[:, :n]
        users, items, windows, rows = [], [], [], []
        for r, state in enumerate(batch.states):
            allowed = [int(i) for i in top[r] if batch.masks[r, i]]
            users += [state.user_id] * len(allowed)
            items += allowed
            windows += [self.core.window(state)] * len(allowed)
            rows += [r] * len(allowed)
        out = np.full(prior.shape, -np.inf)
        if items:
            rater = self.core.rater
            probs = check_distribution(
                rater.rate(users, items, windows), rater.source, n_rows=len(items)
            )
            # below any candidate: the MF order, squashed into (-1, 0)
            finite = np.isfinite(prior)
            out[finite] = -1.0 / (1.0 + np.exp(-prior[finite]))
            out[rows, items] = probs @ RATING_VALUES
        return out


def _verify_shipped(folder: Path) -> None:
    """All of the shipped agent's files (evaluation and curve too) against its manifest."""
    from agents.runs import SHIPPED_AGENT, SHIPPED_FILES, verify_files

    if folder.resolve() == SHIPPED_AGENT.resolve():
        verify_files(folder, [n for n in SHIPPED_FILES if (folder / n).is_file()])


def check_env(
    model: Any, features: CFFeatures | None, config: dict, core: RecCore, where: Path
) -> None:
    """Refuse, in one line, a model whose observation or action space (or dataset) is not
    ``core``'s: a model of another environment would fail only at its first prediction."""
    from agents.item_policy import USER_KEY, user_space
    from persona_gym.errors import ConfigError
    from persona_gym.registry import ENVS

    env_id = config.get("env_id", "?")
    expected = dict(core.observation_space.spaces)
    if features is not None:
        expected[USER_KEY] = user_space(features)
    problem = None
    if getattr(model.action_space, "n", None) != core.action_space.n:
        problem = f"actions {model.action_space}, this environment {core.action_space}"
    else:
        have = dict(getattr(model.observation_space, "spaces", {}))
        for key in sorted(set(have) | set(expected)):
            shape = have[key].shape if key in have else None
            want = expected[key].shape if key in expected else None
            if shape != want:
                problem = (
                    f"observation {key!r} of shape {shape}, this environment {want} "
                    f"(obs_window {core.config.obs_window})"
                )
                break
    if problem is None:
        registered = {e.env_id: e.dataset for e in ENVS}
        dataset = config.get("env_kwargs", {}).get("dataset", registered.get(env_id))
        if dataset is not None and dataset != core.config.dataset:
            problem = f"dataset {dataset!r}, this environment {core.config.dataset!r}"
    if problem is not None:
        raise ConfigError(
            f"{where} was trained on {env_id} with other settings ({problem}); evaluate it on "
            "the environment it was trained on (--env, --artifacts and --env-kwargs of its "
            "run.json), or train an agent for this one with `persona-gym train-agent`"
        )


class SB3Policy(Policy):
    """A trained PPO / DQN / MaskablePPO model as a policy.

    Scores are the policy's action logits (PPO, MaskablePPO) or Q-values (DQN) for the
    observation; the env's mask is applied on top (for MaskablePPO exactly as in training).
    """

    def __init__(self, model: Any, name: str, features: CFFeatures | None = None):
        self.model, self.name, self.features = model, name, features

    @classmethod
    def load(
        cls, path: str | Path, name: str | None = None, core: RecCore | None = None
    ) -> SB3Policy:
        """Load ``model.zip`` (or a run folder holding one) written by ``persona-gym train-agent``
        or :func:`agents.runs.ship_agent`. The files are checked against the folder's manifest;
        with ``core``, a model trained on another environment is refused here, not at the first
        prediction."""
        from agents.runs import FEATURES_FILE, load_model, read_run, verify_files

        path = Path(path)
        zip_path = path / "model.zip" if path.is_dir() else path
        folder = zip_path.parent
        run = read_run(folder)
        if not zip_path.is_file():
            raise FileNotFoundError(
                f"{zip_path}: no trained model; train one with "
                "`persona-gym train-agent` (or pass the run folder)"
            )
        items = run["config"].get("policy", "mlp") == "items"
        verify_files(folder, ["run.json", zip_path.name, *([FEATURES_FILE] if items else [])])
        _verify_shipped(folder)
        model = load_model(run["algo"], zip_path)
        features = None
        if items:
            from agents.item_policy import CFFeatures

            features = CFFeatures.load(folder / FEATURES_FILE)
        if core is not None:
            check_env(model, features, run["config"], core, zip_path)
        return cls(
            model,
            name or f"{run['algo']}:s{run['config']['seed']}:{run.get('timesteps', '?')}",
            features,
        )

    def scores(self, batch: Batch) -> np.ndarray:
        import torch

        from agents.item_policy import add_user_features

        policy = self.model.policy
        raw = (
            batch.obs
            if self.features is None
            else add_user_features(batch.obs, batch.user_ids, self.features)
        )
        obs, _ = policy.obs_to_tensor(raw)
        with torch.no_grad():
            if hasattr(policy, "q_net"):
                values = policy.q_net(obs)
            else:
                values = policy.get_distribution(obs).distribution.logits
        return _masked(values.cpu().numpy().astype(np.float64), batch.masks)


BASELINES = ("random", "most-popular", "item-mean", "mf", "window-greedy", "simulator-greedy")


def make_policy(
    name: str,
    core: RecCore,
    ratings: pd.DataFrame | None = None,
    seed: int = 0,
    mf: MFPolicy | None = None,
) -> Policy:
    """A baseline by name (``BASELINES``), ``"agent"`` (the trained agent shipped with the
    package, :data:`agents.runs.SHIPPED_AGENT`) or a trained model (a run folder or ``model.zip``).

    ``ratings``: the train + background ratings (``fit_frame``) the data-driven baselines fit on.
    """
    if name == "random":
        return RandomPolicy(seed)
    if name == "most-popular":
        return MostPopularPolicy(core)
    if name in ("item-mean", "mf", "window-greedy", "simulator-greedy"):
        if ratings is None:
            raise ValueError(
                f"policy {name!r} needs the training ratings (fit_frame(train, background))"
            )
        if name == "item-mean":
            return ItemMeanPolicy(core, ratings)
        mf = mf or MFPolicy(core, ratings, seed=seed)
        if name == "window-greedy":
            return WindowGreedyPolicy(core, mf)
        return mf if name == "mf" else SimulatorGreedyPolicy(core, mf)
    if name == "agent":
        from agents.runs import SHIPPED_AGENT

        return SB3Policy.load(SHIPPED_AGENT, name="agent", core=core)
    path = Path(name)
    if path.exists():
        return SB3Policy.load(path, core=core)
    raise ValueError(
        f"unknown policy {name!r}: choose from {list(BASELINES)}, 'agent' (the shipped "
        "agent) or give a run folder / model.zip written by `persona-gym train-agent`"
    )
