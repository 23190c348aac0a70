"""The RLlib example's env creator (RLlib itself runs in .venv-rllib: `make rllib-example`)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

import persona_gym  # noqa: F401  (registers the ids)
from agents.rllib_example import make_env


def test_the_creator_gives_the_native_vector_env_with_flat_observations(trained_tiny_artifacts):
    slm_kwargs = {
        "artifacts": str(trained_tiny_artifacts),
        "dataset": "synthetic",
        "mask_rated": False,
        "leave_rule": "threshold",
        "leave_prob": 0.0,
        "obs_window": 3,
        "dtype": "float32",
    }
    vec = make_env({"env_id": "PersonaML100K-v0", "env_kwargs": slm_kwargs, "num_envs": 3})
    assert vec.num_envs == 3 and type(vec.unwrapped).__name__ == "PersonaRecVectorEnv"
    obs, info = vec.reset(seed=0)
    assert isinstance(vec.single_observation_space, gym.spaces.Box) and obs.shape == (
        3,
        vec.single_observation_space.shape[0],
    )
    obs, reward, terminated, truncated, info = vec.step(np.array([0, 1, 2]))
    assert reward.shape == (3,) and np.isfinite(reward).all()
    single = make_env({"env_id": "PersonaML100K-v0", "env_kwargs": slm_kwargs})
    assert isinstance(single.observation_space, gym.spaces.Box)
    assert single.observation_space.shape == vec.single_observation_space.shape
