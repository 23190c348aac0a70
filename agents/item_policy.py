"""A MaskablePPO policy that scores the catalogue through item vectors (the RL agent of persona-gym).

A plain ``MultiInputPolicy`` maps its state to 1,682 (ML-100k) or 3,706 (ML-1M) independent
logits and must learn every item from scratch. :class:`ItemScoringPolicy` scores item ``i`` in
state ``s`` as

    logit(s, i) = h(s) · W e_i  +  c_i  +  a · cf(u, i)

* ``e_i``: the item's fixed features (:class:`CFFeatures.item_side`): its collaborative factors
  and bias, log popularity and the leading principal components of its text embedding;
* ``h(s)``: an MLP of the observation (profile, recent movies and ratings, step) and the user's
  collaborative vector, so the ranking can follow what happened in the episode;
* ``c_i``: a learned per-item correction; ``a``: a learned weight (starting at 0) of the
  collaborative prediction ``cf(u, i)``, the dot product of the user's and the item's vectors;
* with the catalogue's text embeddings (``item_embeddings``, what the observation shows of the
  window's movies), a window term ``sum_j m_j cos(i, j) (alpha + beta r_j) / sum_j m_j`` over
  the observation's recent movies ``j``: how much to recommend what resembles what was just
  watched (``alpha``) and how much more when it was rated above what MF expected of it
  (``beta``, on the residual ``r_j`` = rating - MF prediction, the movie found by its
  embedding). Both start at 0: the sequence effects a static ranking misses.

The agent therefore knows what the matrix-factorisation baseline knows (the same ``BiasedMF``
fitted on train + background) and learns, from the simulated users' ratings alone, how far to
trust it and what to add. The collaborative user vector reaches the policy as the observation key
``"user"`` (:func:`add_user_features`), added by :class:`agents.sb3_env.SB3VecEnv` in training
and by :class:`agents.policies.SB3Policy` in evaluation.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from gymnasium import spaces
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from persona_gym.errors import ConfigError
from persona_gym.io import atomic_write
from persona_gym.simulator.cf_models import BiasedMF

__all__ = [
    "CFFeatures",
    "ItemInputs",
    "ItemScorer",
    "ItemScoringPolicy",
    "StateExtractor",
    "add_user_features",
]

USER_KEY = "user"
CF_GAIN = 30.0


@dataclass
class CFFeatures:
    """The collaborative vectors of users and items, from the MF baseline's ``BiasedMF``.

    ``user_vectors[u] · item_vectors[i]`` is the MF prediction of user ``u`` for catalogue item
    ``i`` (before clipping to 1..5); ``item_side`` holds standardised item features for the
    policy's learned scorer.
    """

    user_ids: np.ndarray  # (n_users,) int64, sorted
    user_vectors: np.ndarray  # (n_users, f + 2) float32: [p_u, mu + b_u, 1]
    item_vectors: np.ndarray  # (n_items, f + 2) float32: [q_i, 1, b_i]
    item_side: np.ndarray  # (n_items, F) float32

    @classmethod
    def fit(
        cls,
        model: BiasedMF,
        item_ids: np.ndarray,
        n_ratings: np.ndarray,
        item_embeddings: np.ndarray,
        n_text: int = 16,
        seed: int = 0,
    ) -> CFFeatures:
        """From a fitted ``BiasedMF`` and the catalogue (ids, training counts, text embeddings)."""
        items = BiasedMF.lookup(model.items_, item_ids)
        known = items >= 0
        q = np.where(known[:, None], model.q_[np.maximum(items, 0)], 0.0)
        bi = np.where(known, model.bi_[np.maximum(items, 0)], 0.0)
        item_vectors = np.c_[q, np.ones(len(items)), bi]
        user_vectors = np.c_[model.p_, model.mu_ + model.bu_, np.ones(len(model.users_))]
        text = np.asarray(item_embeddings, dtype=np.float64)
        text = text - text.mean(axis=0)
        n_text = min(n_text, *text.shape)
        _, _, vt = np.linalg.svd(
            text[np.random.default_rng(seed).permutation(len(text))], full_matrices=False
        )
        side = np.c_[q, bi, np.log1p(np.asarray(n_ratings, dtype=np.float64)), text @ vt[:n_text].T]
        side = (side - side.mean(axis=0)) / np.maximum(side.std(axis=0), 1e-6)
        return cls(
            model.users_.astype(np.int64),
            user_vectors.astype(np.float32),
            item_vectors.astype(np.float32),
            side.astype(np.float32),
        )

    @classmethod
    def from_ratings(
        cls,
        ratings: pd.DataFrame,
        catalog: Any,
        item_embeddings: np.ndarray,
        factors: int = 5,
        reg: float = 5.0,
        reg_bias: float = 5.0,
        seed: int = 0,
    ) -> CFFeatures:
        """Fit the MF baseline's model (``agents.policies.MFPolicy``'s settings) on ``ratings``
        (train + background) and build the features of ``catalog``'s items."""
        model = BiasedMF(factors=factors, reg=reg, reg_bias=reg_bias, seed=seed).fit(ratings)
        return cls.fit(model, catalog.item_ids, catalog.n_ratings, item_embeddings, seed=seed)

    def save(self, path: str | Path) -> None:
        """Write the arrays to ``path`` (``.npz``, atomically)."""
        arrays = {f.name: getattr(self, f.name) for f in fields(self)}
        atomic_write(path, lambda tmp: tmp.write_bytes(_npz_bytes(arrays)))

    @classmethod
    def load(cls, path: str | Path) -> CFFeatures:
        """Read what :meth:`save` wrote (a clear error if the file is not such an archive)."""
        fix = "retrain the agent (`persona-gym train-agent --policy items`)"
        try:
            with np.load(path) as data:
                features = cls(**{f.name: data[f.name] for f in fields(cls)})
        except (OSError, KeyError, ValueError, EOFError) as err:
            raise ConfigError(
                f"{path}: not the collaborative features of an items policy ({err}); {fix}"
            ) from err
        problem = features._problem()
        if problem is not None:
            raise ConfigError(f"{path}: {problem}; {fix}")
        return features

    def _problem(self) -> str | None:
        """What makes the arrays unusable (``None``: nothing)."""
        n_users, n_items = len(self.user_ids), len(self.item_vectors)
        if self.user_vectors.ndim != 2 or len(self.user_vectors) != n_users:
            return f"user_vectors of shape {self.user_vectors.shape} for {n_users} user_ids"
        if self.item_vectors.ndim != 2 or self.item_vectors.shape[1] != self.user_vectors.shape[1]:
            return (
                f"item_vectors of shape {self.item_vectors.shape} do not match "
                f"user_vectors {self.user_vectors.shape}"
            )
        if self.item_side.ndim != 2 or len(self.item_side) != n_items:
            return f"item_side of shape {self.item_side.shape} for {n_items} items"
        for name in ("user_vectors", "item_vectors", "item_side"):
            if not np.isfinite(getattr(self, name)).all():
                return f"{name} holds NaN or infinite values"
        return None

    @property
    def dim(self) -> int:
        return int(self.user_vectors.shape[1])

    def users(self, user_ids: np.ndarray) -> np.ndarray:
        """``(B, f + 2)`` user vectors (zeros but the constant for users MF never saw)."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        rows = BiasedMF.lookup(self.user_ids, user_ids)
        out = np.zeros((len(user_ids), self.dim), dtype=np.float32)
        out[:, -1] = 1.0
        out[rows >= 0] = self.user_vectors[rows[rows >= 0]]
        return out


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    # numpy's stub types savez's keywords as `allow_pickle: bool` plus `**kwds: ArrayLike`, so
    # mypy matches a dict of arrays against the bool; the names here are array names only
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def add_user_features(
    obs: dict[str, np.ndarray], user_ids: np.ndarray, features: CFFeatures
) -> dict[str, np.ndarray]:
    """The observation batch with the users' collaborative vectors under ``"user"``."""
    return {**obs, USER_KEY: features.users(user_ids)}


def user_space(features: CFFeatures) -> spaces.Box:
    """The observation space of the ``"user"`` key."""
    return spaces.Box(-np.inf, np.inf, (features.dim,), np.float32)


def _shape(space: spaces.Space[Any]) -> tuple[int, ...]:
    """The shape of a flat space (``Box``, ``Discrete``, ...; a nested ``Dict`` has none)."""
    assert space.shape is not None, f"{space} has no shape"
    return space.shape


def _feature_keys(observation_space: spaces.Dict) -> list[str]:
    """The order :class:`StateExtractor` flattens the keys in: the user vector first."""
    return [USER_KEY] + sorted(k for k in observation_space.spaces if k != USER_KEY)


def _feature_slices(observation_space: spaces.Dict) -> dict[str, slice]:
    """Where each key lies in :class:`StateExtractor`'s flat features."""
    out, start = {}, 0
    for key in _feature_keys(observation_space):
        size = int(np.prod(_shape(observation_space.spaces[key])))
        out[key], start = slice(start, start + size), start + size
    return out


class StateExtractor(BaseFeaturesExtractor):
    """Flattens the observation dict: the user vector first, then every other key (sorted)."""

    def __init__(self, observation_space: spaces.Dict):
        self.keys = _feature_keys(observation_space)
        dim = max(at.stop for at in _feature_slices(observation_space).values())
        super().__init__(observation_space, features_dim=dim)

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([observations[k].flatten(1) for k in self.keys], dim=1)


class _Extractor(nn.Module):
    """Actor latent = [MLP(state), the raw features (user vector first)]; critic latent =
    MLP(state)."""

    def __init__(self, features_dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.latent_dim_pi = hidden + features_dim
        self.latent_dim_vf = hidden

        def mlp() -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(features_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
            )

        self.policy_net, self.value_net = mlp(), mlp()

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_actor(features), self.forward_critic(features)

    def forward_actor(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.policy_net(features), features], dim=1)

    def forward_critic(self, features: torch.Tensor) -> torch.Tensor:
        return self.value_net(features)


class ItemScorer(nn.Module):
    """``logits = h · W e_i + c_i + a · (user · item_vector_i)`` for every catalogue item, plus
    the window term (:class:`_WindowTerm`) when given one."""

    # registered buffers (nn.Module's __getattr__ types them as `Tensor | Module`)
    item_side: torch.Tensor
    item_vectors: torch.Tensor

    def __init__(
        self,
        hidden: int,
        user_dim: int,
        item_side: np.ndarray,
        item_vectors: np.ndarray,
        dim: int,
        window: _WindowTerm | None = None,
        cf_start: float = 0.0,
        item_gain: float = 1.0,
    ):
        super().__init__()
        self.hidden, self.user_dim = hidden, user_dim
        self.register_buffer("item_side", torch.as_tensor(item_side, dtype=torch.float32))
        self.register_buffer("item_vectors", torch.as_tensor(item_vectors, dtype=torch.float32))
        self.query = nn.Linear(hidden, dim)
        nn.init.normal_(
            self.query.weight, std=0.01
        )  # start near uniform, as SB3's 0.01 action-net gain
        nn.init.zeros_(self.query.bias)
        self.keys = nn.Linear(item_side.shape[1], dim, bias=False)
        self.item_bias = nn.Parameter(torch.zeros(len(item_side)))
        self.item_gain = item_gain
        self.cf_weight = nn.Parameter(torch.tensor(cf_start / CF_GAIN))
        self.window = window

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        h, raw = latent[:, : self.hidden], latent[:, self.hidden :]
        user = raw[:, : self.user_dim]
        learned = self.query(h) @ self.keys(self.item_side).T
        # the gain lets Adam's ~lr-sized steps move the weight to a useful sharpness in a few
        # hundred updates (the MF predictions of one user span only about 2 stars)
        logits = (
            learned
            + self.item_gain * self.item_bias
            + CF_GAIN * self.cf_weight * (user @ self.item_vectors.T)
        )
        if self.window is not None:
            logits = logits + self.window(raw, user, self.item_vectors)
        return logits


class _WindowTerm(nn.Module):
    """``gain · sum_j m_j cos(i, j) (alpha + beta r_j) / max(sum_j m_j, 1)`` for every item
    ``i`` and the observation's recent movies ``j`` (module docstring).

    ``recent``, ``mask`` and ``ratings``: where the observation's ``recent_items`` (``w x D``
    embeddings), ``recent_mask`` and ``recent_ratings`` (on [0, 1]) lie in the flat features.
    """

    # registered buffers
    embeddings: torch.Tensor
    centre: torch.Tensor
    units: torch.Tensor

    def __init__(self, item_embeddings: np.ndarray, recent: slice, mask: slice, ratings: slice):
        super().__init__()
        emb = torch.as_tensor(np.asarray(item_embeddings), dtype=torch.float32)
        self.register_buffer("embeddings", emb)
        # similarities around the catalogue's mean: text embeddings share a large common part
        self.register_buffer("centre", emb.mean(dim=0))
        self.register_buffer("units", self._unit(emb))  # the catalogue's side, computed once
        self.recent, self.mask, self.ratings = recent, mask, ratings
        self.alpha = nn.Parameter(torch.zeros(()))
        self.beta = nn.Parameter(torch.zeros(()))

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x - self.centre, dim=-1)

    def forward(
        self, raw: torch.Tensor, user: torch.Tensor, item_vectors: torch.Tensor
    ) -> torch.Tensor:
        d = self.embeddings.shape[1]
        recent = raw[:, self.recent].reshape(len(raw), -1, d)  # (B, w, D)
        mask = raw[:, self.mask]  # (B, w)
        stars = 1.0 + 4.0 * raw[:, self.ratings]
        # the window's movies: the catalogue rows their embeddings are (exact: the env shows them)
        index = (recent @ self.embeddings.T).argmax(dim=-1)  # (B, w)
        expected = (user[:, None, :] * item_vectors[index]).sum(-1).clamp(1.0, 5.0)
        weight = mask * (self.alpha + self.beta * (stars - expected))
        weight = weight / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        similarity = self.units @ self._unit(recent).transpose(1, 2)  # (B, n, w)
        return CF_GAIN * (similarity @ weight[:, :, None])[:, :, 0]


class ItemInputs:
    """What an item policy (:class:`ItemScoringPolicy`, ``agents.item_dqn.ItemQPolicy``) scores
    movies from, checked, kept and saved with the model: the item arrays, the corrections' gain
    and the widths of its networks."""

    item_side: np.ndarray
    item_vectors: np.ndarray
    item_embeddings: np.ndarray | None
    item_gain: float
    hidden: int
    dim: int

    def _keep_item_inputs(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Discrete,
        item_side: np.ndarray,
        item_vectors: np.ndarray,
        item_embeddings: np.ndarray | None,
        item_gain: float,
        hidden: int,
        dim: int,
    ) -> None:
        """Refuse, in one line, an observation without the user vector or item arrays with
        another row count than the action space has movies; keep the inputs."""
        owner = type(self).__name__
        if USER_KEY not in observation_space.spaces:
            raise ValueError(
                f"{owner} needs the observation key {USER_KEY!r} "
                "(train with `persona-gym train-agent --policy items`)"
            )
        arrays: dict[str, np.ndarray | None] = {
            "item_side": item_side,
            "item_vectors": item_vectors,
            "item_embeddings": item_embeddings,
        }
        for name, array in arrays.items():
            if array is not None and len(array) != action_space.n:
                raise ValueError(
                    f"{owner}: {len(array)} rows of {name} for Discrete({action_space.n})"
                )
        self.item_side, self.item_vectors = np.asarray(item_side), np.asarray(item_vectors)
        self.item_embeddings = None if item_embeddings is None else np.asarray(item_embeddings)
        self.item_gain, self.hidden, self.dim = float(item_gain), int(hidden), int(dim)

    def _item_parameters(self) -> dict[str, Any]:
        """The kept inputs, for the policy's ``_get_constructor_parameters``."""
        return dict(
            item_side=self.item_side,
            item_vectors=self.item_vectors,
            item_embeddings=self.item_embeddings,
            item_gain=self.item_gain,
            hidden=self.hidden,
            dim=self.dim,
        )

    def _item_scorer(self, observation_space: spaces.Dict, cf_start: float) -> ItemScorer:
        """The movie scorer, with the window term when the catalogue's embeddings are kept."""
        window = None
        if self.item_embeddings is not None:
            at = _feature_slices(observation_space)
            window = _WindowTerm(
                self.item_embeddings, at["recent_items"], at["recent_mask"], at["recent_ratings"]
            )
        return ItemScorer(
            self.hidden,
            int(_shape(observation_space.spaces[USER_KEY])[0]),
            self.item_side,
            self.item_vectors,
            self.dim,
            window,
            cf_start,
            self.item_gain,
        )


class ItemScoringPolicy(ItemInputs, MaskableActorCriticPolicy):
    """MaskablePPO actor-critic whose logits score items through their vectors (module docstring).

    Extra keyword arguments (``policy_kwargs``, saved with the model):
        item_side: ``(n_items, F)`` standardised item features (``CFFeatures.item_side``).
        item_vectors: ``(n_items, f + 2)`` collaborative item vectors (``CFFeatures.item_vectors``).
        item_embeddings: ``(n_items, D)`` the catalogue's text embeddings as the observation
            shows them (``RecCore.item_embeddings``): adds the window term; ``None`` (agents
            trained before it) leaves it out.
        cf_start: the starting weight on MF's predicted rating, in logits per star (0: uniform).
        item_gain: multiplies the per-item corrections ``c_i``, so Adam's lr-sized steps move
            them that many times faster (1: agents trained before it).
        hidden: width of the state MLPs.
        dim: width of the item/state embedding the two sides meet in.
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Discrete,
        lr_schedule: Any,
        item_side: np.ndarray,
        item_vectors: np.ndarray,
        item_embeddings: np.ndarray | None = None,
        cf_start: float = 0.0,
        item_gain: float = 1.0,
        hidden: int = 64,
        dim: int = 32,
        **kwargs: Any,
    ):
        self._keep_item_inputs(
            observation_space,
            action_space,
            item_side,
            item_vectors,
            item_embeddings,
            item_gain,
            hidden,
            dim,
        )
        self.cf_start = float(cf_start)
        kwargs.setdefault("features_extractor_class", StateExtractor)
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build_mlp_extractor(self) -> None:
        # SB3 types the attribute as its MlpExtractor; its docs' custom-network example assigns
        # any module with latent_dim_pi/vf and forward_actor/critic, as _Extractor is
        self.mlp_extractor = _Extractor(  # type: ignore[assignment]
            self.features_dim, self.hidden
        )

    def _build(self, lr_schedule: Any) -> None:
        super()._build(lr_schedule)
        assert isinstance(self.observation_space, spaces.Dict)  # __init__ took a Dict
        self.action_net = self._item_scorer(self.observation_space, self.cf_start)
        # SB3 types optimizer_class as type[Optimizer], whose base __init__ takes no `lr`; every
        # concrete optimizer (Adam by default) does, and SB3's own _build passes it the same way
        self.optimizer = self.optimizer_class(  # type: ignore[call-arg]
            self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs
        )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(self._item_parameters(), cf_start=self.cf_start)
        return data
