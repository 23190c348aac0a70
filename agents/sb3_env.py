"""Stable-Baselines3 view of :class:`persona_gym.envs.PersonaRecVectorEnv`.

SB3 has its own ``VecEnv`` API (autoreset inside ``step`` with ``terminal_observation`` in the
info, lists of info dicts). :class:`SB3VecEnv` adapts the native vector env to it, so every
step of all sub-environments is ONE batched simulator call (wrapping single envs in SB3's
``DummyVecEnv`` would call the rating model once per sub-environment). ``env_method(
"action_masks")`` serves sb3-contrib's MaskablePPO.

With ``features`` (:class:`agents.item_policy.CFFeatures`) each observation also carries the
user's collaborative vector under ``"user"`` (what :class:`~agents.item_policy.ItemScoringPolicy`
reads).

Seeding: ``seed(s)`` (SB3 calls it with the algorithm's seed) makes the next ``reset`` seed
sub-environment ``i`` with ``s + i``, like ``gym.make_vec``; later resets continue each
sub-environment's generator.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices

from agents.item_policy import USER_KEY, CFFeatures, add_user_features, user_space
from persona_gym.envs import PersonaRecVectorEnv
from persona_gym.registry import env_config_name
from persona_gym.simulator.rater import Rater

__all__ = ["SB3VecEnv"]


class SB3VecEnv(VecEnv):
    """``num_envs`` simulated users in SB3's ``VecEnv`` API (see module docstring).

    Args:
        env_id: a registered id (``PersonaML100K-v0``, ``PersonaML1M-v0``).
        num_envs: sub-environments stepped together.
        rater: the simulated users (``None``: the env config's SLM simulator).
        features: adds the users' collaborative vectors to the observations (module docstring).
        **overrides: :class:`~persona_gym.envs.config.EnvConfig` fields (``dtype="bfloat16"``).
    """

    def __init__(
        self,
        env_id: str = "PersonaML100K-v0",
        num_envs: int = 8,
        rater: Rater | None = None,
        features: CFFeatures | None = None,
        **overrides: Any,
    ):
        self.venv = PersonaRecVectorEnv(
            num_envs, config=env_config_name(env_id), rater=rater, **overrides
        )
        self.env_id = env_id
        self.render_mode = None
        self.features = features
        space = self.venv.single_observation_space
        if features is not None:
            assert isinstance(space, spaces.Dict)  # PersonaRecVectorEnv's observations are a Dict
            space = spaces.Dict({**space.spaces, USER_KEY: user_space(features)})
        super().__init__(num_envs, space, self.venv.single_action_space)
        self._actions: np.ndarray | None = None

    def _with_users(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.features is None:
            return obs
        users = np.array([s.user_id for s in self.venv.states if s is not None], dtype=np.int64)
        return add_user_features(obs, users, self.features)

    @property
    def core(self):
        """The shared episode logic (simulator, catalogue) of the sub-environments."""
        return self.venv.core

    def reset(self):
        seeds = self._seeds if any(s is not None for s in self._seeds) else None
        obs, infos = self.venv.reset(seed=seeds)
        self.reset_infos = _split_infos(infos, self.num_envs)
        self._reset_seeds()
        return self._with_users(obs)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs)

    def step_wait(self):
        obs, rewards, terminated, truncated, infos = self.venv.step(self._actions)
        obs = self._with_users(obs)
        dones = terminated | truncated
        out = _split_infos(infos, self.num_envs)
        for i in np.flatnonzero(dones):
            out[i]["terminal_observation"] = {k: v[i] for k, v in obs.items()}
            out[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
        if dones.any():  # SB3 semantics: a finished sub-environment returns its next first obs
            obs, reset_infos = self.venv.reset(options={"reset_mask": dones})
            obs = self._with_users(obs)
            for j, info in enumerate(_split_infos(reset_infos, self.num_envs)):
                if dones[j]:
                    self.reset_infos[j] = info
        return obs, rewards.astype(np.float32), dones, out

    def action_masks(self) -> np.ndarray:
        """``(num_envs, n_items)`` bool."""
        return self.venv.action_masks()

    def close(self) -> None:
        self.venv.close()

    # -- attribute access SB3 and sb3-contrib use ---------------------------------------------
    def has_attr(self, attr_name: str) -> bool:
        return attr_name == "action_masks" or hasattr(self.venv, attr_name)

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        value = (
            getattr(self, attr_name)
            if attr_name == "render_mode"
            else getattr(self.venv, attr_name)
        )
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        raise AttributeError(f"SB3VecEnv does not set sub-environment attributes ({attr_name!r})")

    def env_method(
        self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs
    ) -> list[Any]:
        rows = list(self._get_indices(indices))
        if method_name == "action_masks":
            masks = self.action_masks()
            return [masks[i] for i in rows]
        raise AttributeError(
            f"SB3VecEnv supports env_method('action_masks') only, not {method_name!r}"
        )

    def env_is_wrapped(self, wrapper_class, indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]


def _split_infos(infos: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Gymnasium's dict of arrays (with ``_key`` masks) -> SB3's list of per-env dicts."""
    out: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, values in infos.items():
        if key.startswith("_"):
            continue
        present = infos.get(f"_{key}", np.ones(n, dtype=bool))
        for i in range(n):
            if present[i]:
                out[i][key] = values[i]
    return out
