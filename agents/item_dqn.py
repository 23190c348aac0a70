"""MaskableDQN with an item-scoring Q-network: the value-based RL agent of persona-gym.

The Q-value of recommending movie ``i`` in state ``s`` is

    Q(s, i) = v(s) + cf(u, i) + h(s) · W e_i + c_i + window term

with the terms of :mod:`agents.item_policy` (``cf(u, i)``: MF's predicted rating, in stars;
``h(s) · W e_i + c_i``: a learned correction from the movie's vectors and a per-movie one; the
window term: how much the recent movies, and how they were rated against MF's expectation, move
the movies like them) plus ``v(s)``, the state's level. Every part but ``cf`` starts at 0, so
the greedy policy starts as MF-greedy and learns where the users depart from it.

Why a value-based learner: the simulated users leave about a tenth of a star between MF's top
movies and the best of them, under rating noise of about one star. A regression on the rating a
movie earned (DQN's target) updates that movie's value from each rating; a policy gradient
(PPO) spreads the same rating over a softmax of the whole catalogue through a noisy advantage,
and on these users it drifted below MF (``benchmarks/README.md``, "Why the residual start
stalls at MF"). Exploration samples uniformly among the current ``EXPLORE_TOP`` best allowed
movies with probability epsilon (SB3's linear schedule), and every action respects the env's
action mask (SB3's DQN samples the whole action space and ignores masks). The replay buffer
holds no masks, so with ``gamma > 0`` the next state's value is the maximum over every movie,
the ones already recommended included.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from sb3_contrib.common.maskable.utils import get_action_masks
from stable_baselines3 import DQN
from stable_baselines3.common.noise import ActionNoise
from stable_baselines3.dqn.policies import DQNPolicy, QNetwork
from torch import nn

from agents.item_policy import ItemInputs, ItemScorer, StateExtractor

__all__ = ["EXPLORE_TOP", "ItemQPolicy", "MaskableDQN"]

EXPLORE_TOP = 20  # exploration draws among this many best allowed movies (simulator-greedy's 20)


class _ItemQ(nn.Module):
    """``Q(s, ·) = v(s) + scorer([h(s), features])`` for every movie (module docstring)."""

    def __init__(self, features_dim: int, hidden: int, scorer: ItemScorer):
        super().__init__()
        self.state = nn.Sequential(
            nn.Linear(features_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.value = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value.weight)
        nn.init.zeros_(self.value.bias)
        self.scorer = scorer

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.state(features)
        return self.value(h) + self.scorer(torch.cat([h, features], dim=1))


class ItemQPolicy(ItemInputs, DQNPolicy):
    """DQN policy whose Q-network scores every movie through its vectors (module docstring).

    Extra keyword arguments (saved with the model): ``item_side``, ``item_vectors``,
    ``item_embeddings``, ``item_gain``, ``hidden`` and ``dim`` as
    :class:`agents.item_policy.ItemScoringPolicy`'s; the weight on MF's prediction starts at 1
    (Q-values are in stars).
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Discrete,
        lr_schedule: Any,
        item_side: np.ndarray,
        item_vectors: np.ndarray,
        item_embeddings: np.ndarray | None = None,
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
        kwargs.setdefault("features_extractor_class", StateExtractor)
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def make_q_net(self) -> QNetwork:
        args = self._update_features_extractor(self.net_args, features_extractor=None)
        q = QNetwork(**{**args, "net_arch": []})
        assert isinstance(self.observation_space, spaces.Dict)  # __init__ took a Dict
        scorer = self._item_scorer(self.observation_space, cf_start=1.0)
        nn.init.zeros_(scorer.query.weight)  # the learned correction starts at 0, not near it
        # SB3 types QNetwork.q_net as nn.Sequential (its MLP); any module mapping the
        # extracted features to one value per action serves QNetwork.forward
        q.q_net = _ItemQ(args["features_dim"], self.hidden, scorer)  # type: ignore[assignment]
        return q.to(self.device)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(self._item_parameters())
        return data


class MaskableDQN(DQN):
    """SB3's DQN acting within the env's action masks, exploring among the top movies."""

    def _sample_action(
        self, learning_starts: int, action_noise: ActionNoise | None = None, n_envs: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self._last_obs is not None and self.env is not None, "learn() sets them"
        masks = get_action_masks(self.env)
        obs, _ = self.policy.obs_to_tensor(self._last_obs)
        with torch.no_grad():
            q = self.q_net(obs).cpu().numpy()
        q = np.where(masks, q, -np.inf)
        actions = q.argmax(axis=1)
        eps = 1.0 if self.num_timesteps < learning_starts else self.exploration_rate
        for row in np.flatnonzero(np.random.random(len(q)) < eps):
            order = np.argsort(-q[row], kind="stable")[:EXPLORE_TOP]
            allowed = order[np.isfinite(q[row, order])]
            if len(allowed):
                actions[row] = np.random.choice(allowed)
        return actions, actions
